// The memory side of the page: when each turn's update ran, a heat map of the STM, and the
// stateless comparison. Everything here only renders what GET /v1/conversations/{id}/memory
// returned; app.js decides when to ask.

const WAIT_THRESHOLD_MS = 1; // below this a lock or queue hand-off, not a wait for an update

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

function ms(value) {
  return value === null || value === undefined ? "…" : `${value.toFixed(1)} ms`;
}

// One row per turn of the current branch; "next turn waited" is read from the next turn's
// own record (how long it waited for this turn's update to be stored before it could start).
export function renderTiming(tbody, turns) {
  tbody.replaceChildren();
  turns.forEach((turn, i) => {
    const row = document.createElement("tr");
    row.dataset.turn = String(i + 1);
    const header = document.createElement("th");
    header.scope = "row";
    header.textContent = String(i + 1);
    row.append(header);
    const update = turn.update;
    if (turn.imported) {
      cell(row, "memory loaded from a file", "span").colSpan = 4;
    } else if (!update) {
      cell(row, turn.pending ? "updating…" : "—", "span").colSpan = 4;
    } else {
      cell(row, ms(update.answer_ms), "answer-done");
      cell(row, ms(update.started_ms), "update-started");
      cell(row, ms(update.finished_ms), "update-finished");
      const next = turns[i + 1] && turns[i + 1].update;
      let waited = "—";
      if (next) {
        waited = next.waited_ms >= WAIT_THRESHOLD_MS ? `yes, ${ms(next.waited_ms)}` : "no";
      }
      cell(row, waited, "next-waited");
    }
    tbody.append(row);
  });
}

// Dark blue (0) to yellow (the largest value shown): readable for most colour vision.
function colour(t) {
  const hue = 230 - 180 * t;
  const light = 18 + 55 * t;
  return `hsl(${hue}, 80%, ${light}%)`;
}

// `label` names the state for people ("after turn 2"): the page's own turn numbers.
export function drawHeatmap(canvas, caption, summary, field, label) {
  const values = summary && summary[field];
  const context = canvas.getContext("2d");
  if (!values) {
    context.clearRect(0, 0, canvas.width, canvas.height);
    const why = summary ? "no earlier state to compare with" : "no memory yet";
    canvas.setAttribute("aria-label", `Heat map: ${why}.`);
    caption.textContent = summary ? "This memory has no earlier state to compare with." : "";
    return;
  }
  const [layers, slots, dim] = summary.shape;
  const cellWidth = Math.max(2, Math.floor(640 / slots));
  const cellHeight = Math.max(8, Math.floor(96 / layers));
  canvas.width = slots * cellWidth;
  canvas.height = layers * cellHeight;
  let [min, max, where] = [Infinity, -Infinity, [0, 0]];
  values.forEach((row, l) =>
    row.forEach((v, s) => {
      min = Math.min(min, v);
      if (v > max) [max, where] = [v, [l, s]];
    }),
  );
  // Scaled from the smallest to the largest value shown: slots differ by little next to
  // their size, and the differences are what the map is for.
  const span = max - min;
  values.forEach((row, l) =>
    row.forEach((v, s) => {
      context.fillStyle = colour(span > 0 ? (v - min) / span : 0.5);
      context.fillRect(s * cellWidth, l * cellHeight, cellWidth, cellHeight);
    }),
  );
  canvas.dataset.layers = String(layers);
  canvas.dataset.slots = String(slots);
  const what = field === "change_norms" ? "change at the last update" : "norm";
  const text =
    `STM ${label}: ${layers} layers × ${slots} slots × ${dim}; slot ${what} from ` +
    `${min.toFixed(3)} to ${max.toFixed(3)}, largest at layer ${where[0] + 1}, ` +
    `slot ${where[1] + 1}.`;
  canvas.setAttribute("aria-label", text);
  caption.textContent = `${text} Rows are layers, columns are slots; brighter is larger.`;
}

export function renderComparison(table, summaryLine, rows) {
  const tbody = table.tBodies[0];
  tbody.replaceChildren();
  for (const r of rows) {
    const row = document.createElement("tr");
    const header = document.createElement("th");
    header.scope = "row";
    header.textContent = String(r.turn);
    row.append(header);
    cell(row, r.rxt === null ? "— (replayed)" : String(r.rxt), "rxt-tokens");
    cell(row, r.stateless === null ? "unknown" : String(r.stateless), "stateless-tokens");
    tbody.append(row);
  }
  table.hidden = false;
  const last = rows[rows.length - 1];
  if (!last || last.rxt === null || last.stateless === null) {
    summaryLine.textContent = "";
    return;
  }
  summaryLine.textContent =
    `This turn RxT read ${last.rxt} prompt tokens; a stateless model would have re-read ` +
    `${last.stateless} (${(last.stateless / last.rxt).toFixed(1)}×), and that grows every turn.`;
}
