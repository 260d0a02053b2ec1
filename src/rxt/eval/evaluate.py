"""``rxt eval MODEL_DIR --data FILE.jsonl``: score a trained RxT or stateless baseline.

Every system is scored by the same protocol on the same dialogues (teacher forced, gold history;
see :mod:`rxt.eval.recall`) and its greedy replies by the same composite reward
(:func:`rxt.eval.reward.dialogue_rewards`), so the entries of one report compare directly.

An RxT directory yields ``rxt`` (memory on), ``rxt-memory-off`` (STM_0 at every turn) and
``rxt-memory-swapped`` (another dialogue's memory); a baseline directory (a ``transformers``
Llama saved by ``rxt train stateless-*``, with ``baseline.json`` naming its mode) yields
``stateless-full-history`` or ``stateless-current-turn``.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rxt.data.dialogue import Dialogue
from rxt.eval.errors import recall_errors
from rxt.eval.recall import RecallReport, evaluate_dialogues
from rxt.eval.reward import TextEmbedder, dialogue_rewards, reward_summary
from rxt.model.memory.gate_stats import record_gates
from rxt.tokenizer import RxTTokenizer

__all__ = ["SYSTEM_NAMES", "evaluate_model_dir", "summary_lines", "system_entry"]

SYSTEM_NAMES = {
    "on": "rxt",
    "off": "rxt-memory-off",
    "swapped": "rxt-memory-swapped",
    "full": "stateless-full-history",
    "current": "stateless-current-turn",
}


def system_entry(
    report: RecallReport,
    dialogues: Sequence[Dialogue],
    seconds: float,
    tokenizer: RxTTokenizer | None = None,
) -> dict:
    """One system's JSON entry: the recall report (distance and kind keys as str, NaN as null), the
    composite reward of its replies, and (with a tokenizer) what its wrong recall answers were
    (:func:`rxt.eval.errors.recall_errors`)."""
    entry: dict[str, Any] = {
        "recall_by_distance": {str(k): v for k, v in report.recall_by_distance.items()},
        "probes_by_distance": {str(k): v for k, v in report.probes_by_distance.items()},
        "recall_by_kind": {str(k): v for k, v in report.recall_by_kind.items()},
        "probes_by_kind": {str(k): v for k, v in report.probes_by_kind.items()},
        "recall": None if math.isnan(report.recall) else report.recall,
        "chance": None if math.isnan(report.chance) else report.chance,
        "perplexity": report.perplexity if math.isfinite(report.perplexity) else None,
        "accuracy": report.accuracy,
        "eval_seconds": round(seconds, 2),
    }
    if report.replies is not None and any(len(d.turns) > 1 for d in dialogues):
        rewards = dialogue_rewards(dialogues, report.replies, embedder=TextEmbedder())
        entry["reward"] = reward_summary(rewards)
    if report.replies is not None and tokenizer is not None and any(d.probes for d in dialogues):
        entry["errors"] = recall_errors(dialogues, report.replies, tokenizer)
    return entry


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_lines(name: str, entry: dict[str, Any], width: int = 100) -> list[str]:
    """A few human-readable lines for one system's entry (what ``rxt eval`` prints): the
    scores, recall by kind, and what the wrong answers were. Fields an entry lacks (an older
    JSON, ``--no-reward``, no probes) are left out."""
    reward = entry.get("reward", {}).get("mean")
    lines = [
        f"{name:<24} recall {_number(entry.get('recall'), 3)}  "
        f"ppl {entry.get('perplexity') or float('inf'):.3f}  "
        f"acc {_number(entry.get('accuracy'), 3)}  reward {_number(reward, 2)}"
    ]
    counts = entry.get("probes_by_kind", {})
    kinds = [
        f"{k} {v:.2f} ({counts.get(k, '?')})" for k, v in entry.get("recall_by_kind", {}).items()
    ]
    if kinds:
        lines += textwrap.wrap(
            ", ".join(kinds), width, initial_indent="  by kind: ", subsequent_indent=" " * 11
        )
    for layer, g in enumerate(entry.get("gate", [])):
        if g:
            lines.append(
                f"  gate G, layer {layer}: mean {g['mean']:.3f}, quantiles 1/10/50/90/99% "
                + "/".join(f"{g[q]:.3f}" for q in ("p01", "p10", "p50", "p90", "p99"))
            )
    errors = entry.get("errors")
    if errors:
        lines.append(
            f"  wrong {errors['wrong']}/{errors['probes']}: same pool absent "
            f"{errors['same_pool_absent']}, in dialogue {errors['same_pool_in_dialogue']}, "
            f"other pool {errors['other_pool']}, malformed {errors['not_a_value']}; "
            f"wrong at first token {errors['wrong_first_token']}"
        )
    return lines


def _model_type(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("model_type", "rxt"))
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{config}: unreadable ({err})") from None


def evaluate_model_dir(
    path: str | os.PathLike,
    dialogues: Sequence[Dialogue],
    *,
    memory_modes: Sequence[str] = ("on", "off", "swapped"),
    batch_size: int = 32,
    max_new_tokens: int = 16,
    reward: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """``{system name: entry}`` for the model saved at ``path`` (RxT or a baseline), evaluated
    on ``device``."""
    path = Path(path)
    systems: dict[str, dict[str, Any]] = {}
    if _model_type(path) != "rxt":
        from rxt.baselines import load_baseline
        from rxt.eval.stateless import evaluate_stateless

        model, tokenizer = load_baseline(path, device=device)
        if model.mode is None:
            raise ValueError(f"{path}: a transformers model without baseline.json (mode unknown)")
        clock = time.perf_counter()
        report = evaluate_stateless(
            model,
            tokenizer,
            dialogues,
            model.mode,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            replies=reward,
        )
        name = SYSTEM_NAMES[model.mode]
        seconds = time.perf_counter() - clock
        systems[name] = system_entry(report, dialogues, seconds, tokenizer)
        return systems

    from rxt.model.reactive_transformer import ReactiveTransformer

    model = ReactiveTransformer.from_pretrained(path, device=device)
    if model.tokenizer is None:
        raise FileNotFoundError(f"{path}: no tokenizer.json beside the model")
    for memory in memory_modes:
        clock = time.perf_counter()
        # G of every memory write along the gold history (memory on only): is the gate
        # selective, or stuck?
        recording = record_gates(model) if memory == "on" else nullcontext(None)
        with recording as gates:
            report = evaluate_dialogues(
                model,
                model.tokenizer,
                dialogues,
                memory=memory,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                seed=seed,
                replies=reward,
            )
        seconds = time.perf_counter() - clock
        entry = system_entry(report, dialogues, seconds, model.tokenizer)
        quantiles = gates.quantiles() if gates is not None else []
        if any(quantiles):
            entry["gate"] = quantiles
        systems[SYSTEM_NAMES[memory]] = entry
    return systems
