"""Where training reports: ``out_dir/log.jsonl`` (with a progress bar and TensorBoard) and the
file names of the loop's logs, and trimming them back to a resumed checkpoint's step."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["EVAL_FILE", "LOG_FILE", "Logger", "truncate_log"]

LOG_FILE = "log.jsonl"
EVAL_FILE = "eval.jsonl"  # the evaluator's results: {"step": n, ...} per evaluation


class Logger:
    """Rank 0's training log: a JSON line per log step in ``log.jsonl``, a progress bar (tqdm;
    plain lines on stderr without it) and TensorBoard scalars when TensorBoard is installed."""

    def __init__(self, out_dir: Path, start: int, total: int, progress: bool) -> None:
        self.path = out_dir / LOG_FILE
        self.bar = None
        self.plain = False
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            except ImportError:
                self.plain = True
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
        except ImportError:  # tensorboard is optional
            pass

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def record(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}")
        elif self.plain:
            print(
                f"step {entry['step']}: loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                f"grad_norm {entry['grad_norm']:.3f} tokens/s {entry['tokens_per_s']:.0f}",
                file=sys.stderr,
            )
        if self.tb is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint's step (written by a run that died after it)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
