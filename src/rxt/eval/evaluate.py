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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rxt.data.dialogue import Dialogue
from rxt.eval.errors import recall_errors
from rxt.eval.recall import RecallReport, evaluate_dialogues
from rxt.eval.reward import TextEmbedder, dialogue_rewards, reward_summary
from rxt.tokenizer import RxTTokenizer

__all__ = ["SYSTEM_NAMES", "evaluate_model_dir", "system_entry"]

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
    """One system's JSON entry: the recall report (distance keys as str, NaN as null), the
    composite reward of its replies, and (with a tokenizer) what its wrong recall answers were
    (:func:`rxt.eval.errors.recall_errors`)."""
    entry: dict[str, Any] = {
        "recall_by_distance": {str(k): v for k, v in report.recall_by_distance.items()},
        "probes_by_distance": {str(k): v for k, v in report.probes_by_distance.items()},
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
        from rxt.baselines import evaluate_stateless, load_baseline

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
        systems[SYSTEM_NAMES[memory]] = system_entry(report, dialogues, seconds, model.tokenizer)
    return systems
