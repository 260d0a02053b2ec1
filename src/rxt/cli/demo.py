"""``rxt demo``: train RxT and the baselines, evaluate them, write the report."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=None, help="output directory (runs/demo; with --long runs/demo-long)"
    )
    parser.add_argument("--quick", action="store_true", help="every step in under a minute")
    parser.add_argument(
        "--workers", type=int, default=2, help="parallel one-thread training processes"
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="RxT and the full-history baseline, 3000 SMAT steps, 3 seeds (57 min, 2-core Xeon)",
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also train the two ablations (no stage 3; gradient horizon 1): ~1.5x the time",
    )


def cmd_demo(
    out: str | None, quick: bool, workers: int, ablations: bool = False, long: bool = False
) -> int:
    """The demo into ``out``; jobs run in this process get the ``rxt`` entry point."""
    from rxt.cli import main
    from rxt.demo import run_demo

    if long:
        from rxt.demo.long import SEEDS, run_long_demo
        from rxt.demo.plan import DemoPlan

        if ablations:
            raise ValueError("--long runs the main comparison only; drop --ablations")
        run_long_demo(
            out or "runs/demo-long",
            workers=0 if quick else workers,
            plan=DemoPlan.quick() if quick else None,
            seeds=SEEDS[:2] if quick else SEEDS,
            in_process=main,
        )
        return 0
    run_demo(out or "runs/demo", quick=quick, workers=workers, ablations=ablations, in_process=main)
    return 0
