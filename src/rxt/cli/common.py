"""What several commands share: the ``--threads`` flag and the benchmark results files."""

from __future__ import annotations


def set_threads(threads: int | None) -> None:
    """``--threads``: torch CPU threads of the calling thread (None: torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def write_results(path: str | None, result: dict) -> None:
    """The records (a plain list) to ``path``; summary, settings and environment beside it."""
    if not path:
        return
    from rxt.results import write_json

    write_json(path, result["records"])
    write_json(summary_path(path), {k: v for k, v in result.items() if k != "records"})
    print(f"records: {path}; summary: {summary_path(path)}")


def summary_path(path: str) -> str:
    """``OUT.json`` → ``OUT.summary.json`` (the records file stays a plain list)."""
    stem = path[:-5] if path.endswith(".json") else path
    return f"{stem}.summary.json"
