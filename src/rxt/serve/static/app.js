// The chat page: a conversation on this server's Responses API, with its memory beside it.
//
// The page keeps the current branch of turns. Each turn continues from `head`, the stored
// state the next message reads: the last turn's response id (previous_response_id), an older
// turn's after "Continue from here" (the server forks), or an uploaded state's conversation.
// After a reply has streamed, the page polls the memory summary of the version that turn will
// be stored as: it appears once the asynchronous memory update has been committed.

import { ApiError, conversationPath, createApi } from "./api.js";
import { drawHeatmap, renderComparison, renderTiming } from "./memory.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("server-status"),
  keyRow: $("key-row"),
  key: $("api-key"),
  log: $("log"),
  note: $("fork-note"),
  form: $("composer"),
  message: $("message"),
  send: $("send"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  reset: $("reset"),
  download: $("download"),
  upload: $("upload"),
  error: $("error"),
  timing: $("timing").tBodies[0],
  heatMode: $("heat-mode"),
  heatmap: $("heatmap"),
  heatCaption: $("heat-caption"),
  compare: $("compare"),
  comparison: $("comparison"),
  comparisonSummary: $("comparison-summary"),
};

const api = createApi(() => ui.key.value.trim());
const state = { model: null, turns: [], head: null, busy: false, summary: null };
const POLL_MS = 50;
const COMMIT_TIMEOUT_MS = 30000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showError(error) {
  ui.error.textContent = error ? String(error.message || error) : "";
}

function say(text) {
  ui.status.textContent = text;
}

function setBusy(busy) {
  state.busy = busy;
  ui.send.disabled = busy;
  ui.reset.disabled = busy;
  ui.upload.disabled = busy;
  ui.log.setAttribute("aria-busy", String(busy));
  for (const button of ui.log.querySelectorAll("button.fork")) button.disabled = busy;
  refreshButtons();
}

function refreshButtons() {
  const stored = Boolean(state.summary) && !state.busy;
  ui.download.disabled = !stored;
  ui.compare.disabled = !stored;
}

// ------------------------------------------------------------------ the log
function message(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "RxT" : "Memory";
  const p = document.createElement("p");
  p.className = "text";
  p.textContent = text;
  div.append(who, p);
  return div;
}

function addTurnView(turn) {
  const item = document.createElement("li");
  item.className = "turn";
  if (turn.imported) {
    item.append(message("system", `Memory loaded from ${turn.file}.`));
  } else {
    const reply = message("assistant", "");
    reply.dataset.state = "streaming";
    const fork = document.createElement("button");
    fork.type = "button";
    fork.className = "fork";
    fork.textContent = "Continue from here";
    fork.disabled = state.busy;
    fork.addEventListener("click", () => forkFrom(turn));
    reply.append(fork);
    item.append(message("user", turn.query), reply);
    turn.replyView = reply;
  }
  ui.log.append(item);
  turn.element = item;
  numberTurns();
}

function numberTurns() {
  state.turns.forEach((turn, i) => {
    turn.element.dataset.turn = String(i + 1);
    const fork = turn.element.querySelector("button.fork");
    if (fork) fork.setAttribute("aria-label", `Continue from turn ${i + 1} (fork)`);
  });
}

function renderTurns() {
  renderTiming(ui.timing, state.turns);
}

// ------------------------------------------------------------------ a turn
async function send(text) {
  if (state.busy || !text.trim()) return;
  showError(null);
  setBusy(true);
  const head = state.head;
  const turn = { query: text, reply: "", pending: true, deltas: 0 };
  state.turns.push(turn);
  addTurnView(turn);
  ui.message.value = "";
  ui.note.hidden = true;
  const body = {
    model: state.model,
    input: text,
    stream: true,
    temperature: Number(ui.temperature.value),
    max_output_tokens: Number(ui.maxTokens.value),
  };
  if (head && head.responseId) body.previous_response_id = head.responseId;
  else if (head) body.conversation = head.conversationId;
  say("Answering…");
  try {
    const shown = turn.replyView.querySelector(".text");
    for await (const event of api.stream("/v1/responses", body)) {
      if (event.type === "rxt.headers") turn.conversationId = event.conversation;
      else if (event.type === "response.created") turn.responseId = event.response.id;
      else if (event.type === "response.output_text.delta") {
        turn.reply += event.delta;
        turn.deltas += 1;
        shown.textContent = turn.reply;
        turn.replyView.dataset.deltas = String(turn.deltas);
      } else if (event.type === "error") throw new ApiError(0, event.message);
    }
    turn.replyView.dataset.state = "done";
    turn.replyView.dataset.responseId = turn.responseId;
    // The server forks when the head is not its conversation's latest state: a new
    // conversation whose first stored version is this turn's.
    const same = head && head.conversationId === turn.conversationId;
    turn.version = same ? head.version + 1 : 1;
    state.head = {
      conversationId: turn.conversationId,
      version: turn.version,
      responseId: turn.responseId,
    };
    say("Answered; the memory update runs now, in the background.");
  } catch (error) {
    state.turns.pop();
    turn.element.remove();
    ui.message.value = text;
    showError(error);
    say("The message was not answered.");
    setBusy(false);
    return;
  }
  renderTurns();
  setBusy(false);
  watchUpdate(turn);
}

// Poll the summary of the version this turn is stored as, until its update is committed.
async function watchUpdate(turn) {
  const path = conversationPath(turn.conversationId, `/memory?version=${turn.version}`);
  const deadline = performance.now() + COMMIT_TIMEOUT_MS;
  while (performance.now() < deadline) {
    try {
      const summary = await api.json(path);
      if (summary.response_id === turn.responseId) {
        turn.update = summary.memory_update;
        if (state.head && state.head.responseId === turn.responseId) showSummary(summary);
        say(`Turn ${state.turns.indexOf(turn) + 1}: memory updated.`);
      }
      break;
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) {
        showError(error);
        break;
      }
    }
    await sleep(POLL_MS);
  }
  turn.pending = false;
  renderTurns();
}

function showSummary(summary) {
  state.summary = summary;
  drawSummary();
  refreshButtons();
}

function drawSummary() {
  const summary = state.summary;
  let label = "";
  if (summary) {
    const index = state.turns.findIndex((t) => t.responseId && t.responseId === summary.response_id);
    if (index >= 0) label = `after turn ${index + 1}`;
    else label = summary.response_id ? `version ${summary.version}` : "as loaded from the file";
  }
  drawHeatmap(ui.heatmap, ui.heatCaption, summary, ui.heatMode.value, label);
}

async function refreshSummary() {
  const head = state.head;
  state.summary = null;
  drawSummary();
  refreshButtons();
  if (!head) return;
  try {
    showSummary(await api.json(conversationPath(head.conversationId, `/memory?version=${head.version}`)));
  } catch (error) {
    showError(error);
  }
}

// ------------------------------------------------------------------ what only state allows
function forkFrom(turn) {
  if (state.busy) return;
  const index = state.turns.indexOf(turn);
  for (const later of state.turns.slice(index + 1)) later.element.remove();
  state.turns = state.turns.slice(0, index + 1);
  state.head = {
    conversationId: turn.conversationId,
    version: turn.version,
    responseId: turn.responseId,
  };
  ui.note.textContent =
    `The next message continues from the memory after turn ${index + 1}: a fork. ` +
    "The original conversation stays on the server, unchanged.";
  ui.note.hidden = false;
  ui.comparison.hidden = true;
  ui.comparisonSummary.textContent = "";
  renderTurns();
  refreshSummary();
  ui.message.focus();
}

function resetConversation(note) {
  for (const turn of state.turns) turn.element.remove();
  state.turns = [];
  state.head = null;
  ui.comparison.hidden = true;
  ui.comparisonSummary.textContent = "";
  ui.note.textContent = note;
  ui.note.hidden = !note;
  showError(null);
  renderTurns();
  refreshSummary();
}

async function downloadState() {
  const head = state.head;
  if (!head) return;
  try {
    const path = conversationPath(head.conversationId, `/state?version=${head.version}`);
    const { blob, filename } = await api.download(path);
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = filename;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
    say(`Saved ${filename}.`);
  } catch (error) {
    showError(error);
  }
}

async function uploadState() {
  const file = ui.upload.files[0];
  if (!file) return;
  showError(null);
  try {
    const conversation = await api.upload("/v1/conversations/import", file);
    resetConversation("The next message continues from the uploaded memory.");
    const turn = { imported: true, file: file.name, conversationId: conversation.id };
    turn.version = conversation.turns;
    state.turns.push(turn);
    addTurnView(turn);
    state.head = { conversationId: conversation.id, version: conversation.turns, responseId: null };
    renderTurns();
    await refreshSummary();
    say(`Loaded ${file.name}.`);
  } catch (error) {
    showError(error);
  } finally {
    ui.upload.value = ""; // the same file can be chosen again
  }
}

async function compare() {
  const head = state.head;
  if (!head) return;
  try {
    const path = conversationPath(head.conversationId, `/memory?version=${head.version}&stateless=true`);
    const summary = await api.json(path);
    renderComparison(ui.comparison, ui.comparisonSummary, summary.prompt_tokens);
  } catch (error) {
    showError(error);
  }
}

// ------------------------------------------------------------------ start
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  send(ui.message.value);
});
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send(ui.message.value);
  }
});
ui.reset.addEventListener("click", () =>
  resetConversation("New conversation: the next message starts from a fresh memory."),
);
ui.download.addEventListener("click", downloadState);
ui.upload.addEventListener("change", uploadState);
ui.compare.addEventListener("click", compare);
ui.heatMode.addEventListener("change", drawSummary);

async function start() {
  try {
    const health = await api.json("/healthz");
    state.model = health.model;
    ui.keyRow.hidden = !!health.dev_mode;
    const keys = health.dev_mode ? "no API keys (local development mode)" : "API key required";
    say(`Model ${health.model} · ${keys}`);
    document.body.dataset.ready = "true";
  } catch (error) {
    say("The server did not answer.");
    showError(error);
  }
}

start();
