"""``rxt eval MODEL_DIR``: a saved model on held-out dialogues."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rxt.cli.common import set_threads

MEMORY_MODES = ["on", "off", "swapped"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl")
    parser.add_argument("--json", dest="json_out", metavar="OUT.json")
    parser.add_argument("--memory", nargs="+", default=list(MEMORY_MODES), choices=MEMORY_MODES)
    parser.add_argument("--limit", type=int, help="only the first N dialogues")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--no-reward", dest="reward", action="store_false", help="skip generating every reply"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def cmd_eval(
    *,
    model_dir: str,
    data: str,
    json_out: str | None = None,
    memory: Sequence[str] = tuple(MEMORY_MODES),
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    reward: bool = True,
    device: str = "cpu",
    threads: int | None = None,
) -> int:
    """Recall by distance and kind, perplexity, accuracy, reward and the recall errors of a saved
    model on a JSONL file."""
    from rxt.data.dialogue import read_dialogues
    from rxt.eval.evaluate import evaluate_model_dir, summary_lines

    set_threads(threads)
    dialogues = read_dialogues(data)
    if limit is not None:
        dialogues = dialogues[:limit]
    systems = evaluate_model_dir(
        model_dir,
        dialogues,
        memory_modes=memory,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        reward=reward,
        device=device,
    )
    report = {"model_dir": model_dir, "data": data, "dialogues": len(dialogues), "systems": systems}
    for name, entry in systems.items():
        print("\n".join(summary_lines(name, entry)))
    if json_out:
        from rxt.results import write_json

        write_json(json_out, report)
        print(f"report: {json_out}")
    return 0
