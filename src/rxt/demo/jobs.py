"""Run command-line jobs in parallel worker processes, respecting their dependencies.

Each job is an ordinary ``rxt`` command (``rxt train ...``, ``rxt eval ...``) in its own process
with one torch thread: on this class of machine two one-thread jobs side by side finish more work
than one job with two threads (calibration: a second thread speeds one job only ~1.4×). Output
goes to ``logs/NAME.log``; one progress bar counts the training steps of every job, read from
each stage's ``log.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JobError", "Task", "run_tasks"]


class JobError(RuntimeError):
    """A job failed; the message names it, its exit code and the tail of its log."""


@dataclass(frozen=True)
class Task:
    name: str
    args: tuple[str, ...]  # arguments of `python -m rxt`
    after: tuple[str, ...] = ()
    steps: int = 0  # training steps (progress); 0 = counts as one unit when done
    log_jsonl: Path | None = None  # where its training steps are logged
    first_step: int = 0  # the log's step when the job starts (it resumes a stage)


def _steps_done(task: Task) -> int:
    if task.log_jsonl is None or not task.log_jsonl.is_file():
        return 0
    try:
        with open(task.log_jsonl, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
        step = int(json.loads(lines[-1])["step"]) if lines else 0
        return max(step - task.first_step, 0)
    except (ValueError, KeyError, IndexError, OSError):
        return 0  # a line being written


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run_here(
    tasks: Sequence[Task], logs: Path, command: Callable[[list[str]], int]
) -> dict[str, float]:
    import contextlib

    finished: dict[str, float] = {}
    pending = list(tasks)
    while pending:
        task = next(t for t in pending if all(a in finished for a in t.after))
        pending.remove(task)
        start = time.perf_counter()
        log = logs / f"{task.name}.log"
        with (
            open(log, "w", encoding="utf-8") as fh,
            contextlib.redirect_stdout(fh),
            contextlib.redirect_stderr(fh),
        ):
            code = command(list(task.args))
        if code != 0:
            raise JobError(f"job {task.name!r} failed (exit code {code}); {log}:\n{_tail(log)}")
        finished[task.name] = time.perf_counter() - start
        print(f"      {task.name}: {finished[task.name]:.1f} s", flush=True)
    return finished


def run_tasks(
    tasks: Sequence[Task],
    logs: Path,
    *,
    workers: int = 2,
    progress: bool = True,
    description: str = "training",
    in_process: Callable[[list[str]], int] | None = None,
) -> dict[str, float]:
    """Run ``tasks`` (a job starts once everything in its ``after`` has finished), at most
    ``workers`` at a time; ``workers=0`` runs them one by one in this process through
    ``in_process`` (the ``rxt`` command's entry point, handed in by the command line so this
    module never imports it; no start-up cost per job: the quick demo). Returns each job's wall
    time in seconds. The first failure stops the others and raises :class:`JobError`."""
    names = {t.name for t in tasks}
    for task in tasks:
        missing = set(task.after) - names
        if missing:
            raise ValueError(f"job {task.name!r} waits for unknown job(s) {sorted(missing)}")
    logs.mkdir(parents=True, exist_ok=True)
    if workers == 0:
        if in_process is None:
            raise ValueError("workers=0 runs the jobs in this process: pass in_process")
        return _run_here(tasks, logs, in_process)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending = list(tasks)
    running: dict[str, tuple[Task, subprocess.Popen, float]] = {}
    finished: dict[str, float] = {}
    units = {t.name: max(t.steps, 1) for t in tasks}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(units.values()),
            desc=description,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
    shown = 0
    try:
        while pending or running:
            for task in list(pending):
                if len(running) >= workers:
                    break
                if all(a in finished for a in task.after):
                    pending.remove(task)
                    log = open(logs / f"{task.name}.log", "w", encoding="utf-8")  # noqa: SIM115
                    command = [sys.executable, "-m", "rxt", *task.args]
                    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                    log.close()  # the child holds its own descriptor
                    running[task.name] = (task, proc, time.perf_counter())
            if not running and pending:
                raise JobError(f"jobs {[t.name for t in pending]} wait for jobs that never ran")
            time.sleep(0.25)
            for name, (_task, proc, start) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:
                    raise JobError(
                        f"job {name!r} failed (exit code {code}); the end of "
                        f"{logs / f'{name}.log'}:\n{_tail(logs / f'{name}.log')}"
                    )
                finished[name] = time.perf_counter() - start
            if bar is not None:
                done = sum(units[n] for n in finished) + sum(
                    min(_steps_done(t), t.steps) for t, _, _ in running.values()
                )
                bar.update(done - shown)
                shown = done
                if running:
                    bar.set_postfix_str(", ".join(sorted(running)), refresh=False)
    finally:
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, _ in running.values():
            proc.wait()
        if bar is not None:
            bar.close()
    return finished
