"""``rxt train STAGE``: one curriculum stage of a recipe (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import json

from rxt.cli.common import set_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rxt.training.recipe import STAGES

    parser.add_argument(
        "stage", help=f"a stage of the recipe: {', '.join(STAGES)}, or a named variant"
    )
    parser.add_argument("--config", dest="recipe", required=True, metavar="RECIPE.yaml")
    parser.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/STAGE/checkpoint")
    parser.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="end after this step with a checkpoint (the stage unfinished); --resume continues",
    )
    parser.add_argument("--init", metavar="MODEL_DIR", help="start from this model instead")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )


def cmd_train(
    *,
    stage: str,
    recipe: str,
    out: str,
    resume: bool = False,
    stop_at: int | None = None,
    init: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """One curriculum stage of a recipe (also under ``torchrun``: data-parallel)."""
    from rxt.training.run import run_stage

    set_threads(threads)
    last = run_stage(
        stage,
        recipe,
        out,
        resume=resume,
        init=init,
        progress=progress,
        device=device,
        stop_at=stop_at,
    )
    print(json.dumps({"stage": stage, **last}))
    return 0
