"""What the demo trains: data sizes, the recipe, and the jobs that run it.

The demo writes an ordinary recipe (``OUT/recipe.yaml``) and runs every stage of it with
``rxt train``, so a user can re-run, resume or vary any stage by hand. Stages:

- ``joint`` → ``sft`` → ``memory`` → ``smat-warmup`` → ``smat``: the RxT curriculum. The SMAT
  warm-up trains on two-turn dialogues only (a fact, then its question): before the decoder has
  learnt to read memory, long dialogues give almost no usable signal, and a model trained on the
  mix from the start stayed at chance (measured; see ``docs/training.md``).
- ``stateless-full``, ``stateless-current`` (each after its ``-warmup``): the baselines,
  parameter-matched, trained on exactly RxT's SMAT schedule: the same dialogues at every step.
- With ``ablations`` (``rxt demo --ablations``), two more SMAT-length runs:
  ``ablation-no-memory-*`` (no stage 3: the warm-up and SMAT start from stage 2) and
  ``ablation-horizon-1`` (SMAT with gradient horizon 1). Off by default: the 20-minute budget
  goes to the main comparison, RxT against the baselines.

- With a time budget (``budget_s``; ``rxt demo`` sets 18 minutes), ``calibrate-*``: each main
  stage run briefly from the same model to time its steps; then the main stages get as many
  steps as the rest of the budget allows (:mod:`rxt.demo.budget`).

SMAT and the full-history baseline log a learning curve (``eval.jsonl``: recall of the
validation dialogues every ``eval_every`` steps). The training mix holds long dialogues too (up
to ``long_max_distance`` turns between a fact and its question), and a second test split asks
only at distances ``long_test_distances``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CALIBRATION",
    "SIZED",
    "DemoPlan",
    "Job",
    "by_stage",
    "jobs",
    "model_overrides",
    "recipe",
    "sized_jobs",
]


@dataclass(frozen=True)
class DemoPlan:
    preset: str = "tiny"
    # Decoder and encoder FFN widths: 224:32 holds exactly tiny's 128:128 parameter count with
    # 37% more of it in the decoder; on three seeds it beat 128:128 on Shakespeare perplexity
    # (-0.7, -1.3, -2.1) with recall within noise (+0.03, +0.04, -0.01)
    # (benchmarks/decoder_split.py, docs/training.md).
    ffn_dims: tuple[int, int] = (224, 32)
    # ``(field, value)`` overrides of the preset's memory config (e.g. ``("num_slots", 64)``):
    # none in the demo; benchmarks/decoder_split.py --memory varies them.
    memory: tuple[tuple[str, Any], ...] = ()
    vocab_size: int = 512  # probe recall was higher at 512 than at 1024 (docs/training.md)
    # Every text encoded as " " + text, so a value has the same ids in "My dog is called Rex."
    # and in the answer "Rex": recall +0.007 to +0.044 on four of four seeds, fewer answers wrong
    # at the first token (benchmarks/memory_learning.py --prefix-space, docs/training.md).
    prefix_space: bool = True
    max_turns: int = 9  # probe dialogues: 2..max_turns turns, facts asked 1..max_turns-1 back
    train_dialogues: int = 20000
    # Asked facts per training probe dialogue (the test and validation splits keep 1..3).
    train_facts: tuple[int, int] = (5, 8)
    warmup_dialogues: int = 20000  # two-turn dialogues (SMAT warm-up, and mixed into SMAT)
    test_dialogues: int = 300
    shakespeare_dialogues: int = 1500  # 0 = leave the real corpus out
    shakespeare_test: int = 200
    # Casual human conversation (the Chit Chat corpus): a second real-text corpus, trained on
    # and held out by conversation like Shakespeare by play. 0 = leave it out.
    chitchat_dialogues: int = 1500
    chitchat_test: int = 200
    joint_steps: int = 300
    sft_steps: int = 200
    memory_steps: int = 150
    warmup_steps: int = 300
    # SMAT steps of RxT and of each baseline (the same for all three). With ``budget_s`` set
    # (``rxt demo``'s default), rxt.demo.budget chooses them instead, from measured step times:
    # as many as the budget allows, within [min_smat_steps, max_smat_steps].
    smat_steps: int = 1100
    budget_s: float | None = None
    min_smat_steps: int = 500
    max_smat_steps: int = 12000
    calibration_steps: int = 40  # steps of each main stage timed before choosing
    # The full-history baseline's first this-many steps run before the current-turn baseline,
    # the rest (resumed from a checkpoint) after RxT's SMAT on the other worker, so both
    # workers end together; rxt.demo.budget sets it from the measured step times. None: whole.
    full_first_steps: int | None = None
    batch_size: int = 16
    lr: float = 3e-3
    latency_turns: int = 24
    latency_repeats: int = 3
    valid_dialogues: int = 100  # the learning curves' dialogues (a split of their own)
    eval_every: int = 275  # steps between learning-curve points
    long_train_dialogues: int = 400  # up to long_max_distance turns back, mixed into training
    long_test_dialogues: int = 100  # probes at long_test_distances only
    long_max_distance: int = 32
    long_test_distances: tuple[int, ...] = (16, 32)
    ablations: bool = False  # the two ablation runs (each as long as SMAT)

    @classmethod
    def quick(cls) -> DemoPlan:
        """Seconds, not minutes: every stage and report runs, nothing is learnt."""
        return cls(
            vocab_size=300,
            max_turns=5,
            train_dialogues=200,
            warmup_dialogues=100,
            test_dialogues=12,
            shakespeare_dialogues=40,
            shakespeare_test=6,
            chitchat_dialogues=40,
            chitchat_test=6,
            joint_steps=4,
            sft_steps=3,
            memory_steps=3,
            warmup_steps=3,
            smat_steps=4,
            min_smat_steps=2,
            max_smat_steps=8,
            calibration_steps=4,
            batch_size=4,
            latency_turns=4,
            latency_repeats=1,
            valid_dialogues=6,
            eval_every=2,
            long_train_dialogues=10,
            long_test_dialogues=6,
            long_max_distance=8,
            long_test_distances=(6, 8),
        )

    @classmethod
    def long(cls) -> DemoPlan:
        """``rxt demo --long``: the main comparison at a longer budget (run once per seed,
        without the current-turn baseline; 57 min on a 2-core Xeon, docs/training.md)."""
        return cls(smat_steps=3000, eval_every=500)


@dataclass(frozen=True)
class Job:
    """One ``rxt train`` run: ``steps`` steps of recipe stage ``stage`` (default: ``name``).
    A stage split in two parts has one job per part: the first stops after ``stop_at`` with a
    checkpoint, the second resumes it at ``first_step``; stopped and resumed trains exactly as
    one run (:func:`rxt.training.loop.train`)."""

    name: str
    steps: int
    after: tuple[str, ...]
    stage: str = ""
    first_step: int = 0
    stop_at: int | None = None

    def __post_init__(self) -> None:
        if not self.stage:
            object.__setattr__(self, "stage", self.name)


# The stages as long as SMAT: with a budget, their length is chosen after everything else ran.
SIZED = frozenset(
    ("smat", "stateless-full", "stateless-current", "ablation-no-memory", "ablation-horizon-1")
)

# Each main stage's timing run (only with a budget): the stage, started from the same model,
# for ``calibration_steps`` steps; what it measures sizes the stage (rxt.demo.budget).
CALIBRATION = {
    "calibrate-smat": "smat",
    "calibrate-stateless-full": "stateless-full",
    "calibrate-stateless-current": "stateless-current",
}


def _train(steps: int, lr: float, log_every: int = 25) -> dict[str, Any]:
    return {
        "steps": steps,
        "lr": lr,
        "warmup_steps": max(1, min(50, steps // 5)),
        "log_every": max(1, min(log_every, steps)),
    }


def model_overrides(plan: DemoPlan) -> dict[str, Any]:
    """The recipe's ``model.overrides``: the plan's FFN widths (and memory overrides, if any)
    on top of its preset."""
    decoder, encoder = plan.ffn_dims
    overrides: dict[str, Any] = {"decoder": {"ffn_dim": decoder}, "encoder": {"ffn_dim": encoder}}
    if plan.memory:
        overrides["memory"] = dict(plan.memory)
    return overrides


def recipe(plan: DemoPlan, data: dict[str, list[str]], seed: int = 0) -> dict[str, Any]:
    """The recipe as a dict (written as YAML). ``data``: file lists for ``text`` (tokenizer and
    stage 1), ``interactions`` (stage 2), ``dialogues`` (stages 3-4 and baselines), ``warmup``
    (two-turn dialogues) and ``valid`` (the learning curves' dialogues). The ablation stages
    are always in the recipe (to run by hand); :func:`jobs` schedules them only when asked.
    ``seed`` seeds every stage: the data order, a fresh model's weights, dropout."""
    # Length groups: rows padded per group of similar length, 1.5x faster SMAT steps here.
    smat = {"batch_size": plan.batch_size, "length_groups": 4}
    # Learning curves of RxT and the full-history baseline, on the validation split.
    curve = {"data": data["valid"], "every": plan.eval_every}
    stages: dict[str, Any] = {
        "joint": {
            "data": data["text"],
            "config": {"batch_size": 32},
            "train": _train(plan.joint_steps, plan.lr),
        },
        "sft": {
            "data": data["interactions"],
            "config": {"batch_size": 32, "answer_only": True},
            "train": _train(plan.sft_steps, plan.lr),
        },
        "memory": {
            "data": data["dialogues"],
            "config": {"batch_size": plan.batch_size},
            "train": _train(plan.memory_steps, plan.lr),
        },
        "smat-warmup": {
            "kind": "smat",
            "data": data["warmup"],
            "config": smat,
            "train": _train(plan.warmup_steps, plan.lr),
        },
        "smat": {
            "from": "smat-warmup",
            "data": data["dialogues"],
            "config": smat,
            "train": _train(plan.smat_steps, plan.lr),
            "eval": curve,
        },
        "ablation-no-memory-warmup": {
            "kind": "smat",
            "from": "sft",
            "data": data["warmup"],
            "config": smat,
            "train": _train(plan.warmup_steps, plan.lr),
        },
        "ablation-no-memory": {
            "kind": "smat",
            "from": "ablation-no-memory-warmup",
            "data": data["dialogues"],
            "config": smat,
            "train": _train(plan.smat_steps, plan.lr),
        },
        "ablation-horizon-1": {
            "kind": "smat",
            "from": "smat-warmup",
            "data": data["dialogues"],
            "config": {**smat, "gradient_horizon": 1},
            "train": _train(plan.smat_steps, plan.lr),
        },
    }
    # The baselines follow RxT's SMAT schedule step for step: the same two-turn warm-up, then
    # the same mix, the same dialogues at every step (one stream rule), the same answer tokens.
    for mode in ("full", "current"):
        stages[f"stateless-{mode}-warmup"] = {
            "kind": f"stateless-{mode}",
            "data": data["warmup"],
            "config": smat,
            "train": _train(plan.warmup_steps, plan.lr),
        }
        stages[f"stateless-{mode}"] = {
            "from": f"stateless-{mode}-warmup",
            "data": data["dialogues"],
            "config": smat,
            "train": _train(plan.smat_steps, plan.lr),
        }
        if mode == "full":
            stages["stateless-full"]["eval"] = curve
    if plan.budget_s is not None:
        steps = plan.calibration_steps
        for name, main in CALIBRATION.items():
            # Four log windows: the first holds start-up, the median of the rest is the time.
            train = _train(steps, plan.lr, log_every=max(1, steps // 4))
            timing = {k: v for k, v in stages[main].items() if k != "eval"}
            stages[name] = {**timing, "kind": main, "train": train}
    for stage in stages.values():
        stage["seed"] = seed
        stage["train"]["seed"] = seed
    return {
        "model": {"preset": plan.preset, "overrides": model_overrides(plan)},
        "tokenizer": {
            "vocab_size": plan.vocab_size,
            "prefix_space": plan.prefix_space,
            "data": data["text"],
        },
        "stages": stages,
    }


def jobs(plan: DemoPlan) -> list[Job]:
    """Every training run, with what it waits for, in the order a free worker picks them.
    With two workers (the default), one trains the RxT chain while the other trains the
    full-history baseline and then the current-turn baseline: the chain is listed first, so a
    worker that frees up takes it whenever it is ready. Two one-thread processes on two cores
    trained more steps in the budget than three (measured job times in docs/training.md); the
    ablations, when asked for, follow.

    Three main stages on two workers leave one worker idle at the end (RxT's SMAT alone is
    shorter than both baselines). With ``full_first_steps`` the full-history baseline is cut
    in two: its first part runs before the current-turn baseline, the rest after RxT's SMAT,
    on the worker that trained it (McNaughton's wrap-around; :func:`rxt.demo.budget.wrap_split`
    chooses the cut so both workers end together)."""
    full = [Job("stateless-full", plan.smat_steps, ("stateless-full-warmup",))]
    rest: list[Job] = []
    first = plan.full_first_steps
    if first is not None:
        if not 0 < first < plan.smat_steps:
            raise ValueError(f"full_first_steps: must be in (0, {plan.smat_steps}), got {first}")
        after = ("stateless-full-warmup",)
        full = [Job("stateless-full-first", first, after, "stateless-full", stop_at=first)]
        rest = [
            Job(
                "stateless-full",
                plan.smat_steps - first,
                ("stateless-full-first",),
                first_step=first,
            )
        ]
    main = [
        Job("joint", plan.joint_steps, ()),
        Job("stateless-full-warmup", plan.warmup_steps, ()),
        Job("sft", plan.sft_steps, ("joint",)),
        Job("memory", plan.memory_steps, ("sft",)),
        Job("smat-warmup", plan.warmup_steps, ("memory",)),
        Job("smat", plan.smat_steps, ("smat-warmup",)),
        *full,
        Job("stateless-current-warmup", plan.warmup_steps, ()),
        Job("stateless-current", plan.smat_steps, ("stateless-current-warmup",)),
        *rest,
    ]
    if plan.budget_s is not None:
        # The baselines' timing runs start once their warm-ups end; the current-turn one also
        # waits for RxT's warm-up, so it runs beside RxT's: each is timed with the other core
        # busy, as the stages it sizes will run.
        k = plan.calibration_steps
        main += [
            Job("calibrate-stateless-full", k, ("stateless-full-warmup",)),
            Job("calibrate-smat", k, ("smat-warmup",)),
            Job("calibrate-stateless-current", k, ("stateless-current-warmup", "smat-warmup")),
        ]
    if not plan.ablations:
        return main
    return [
        *main,
        Job("ablation-no-memory-warmup", plan.warmup_steps, ("sft",)),
        Job("ablation-no-memory", plan.smat_steps, ("ablation-no-memory-warmup",)),
        Job("ablation-horizon-1", plan.smat_steps, ("smat-warmup",)),
    ]


def data_files(out: Path, corpora: Sequence[str] = ()) -> dict[str, list[str]]:
    """Recipe data lists, relative to ``out`` (where the recipe lives); ``corpora``: the real-text
    corpora written (``shakespeare``, ``chitchat``), trained on beside the probes."""
    probes = ["data/probes-train.jsonl", "data/probes-long-train.jsonl", "data/warmup.jsonl"]
    real = [f"data/{name}-train.jsonl" for name in corpora]
    text, dialogues = [*probes, *real], [*probes, *real]
    return {
        "text": text,
        "interactions": dialogues,
        "dialogues": dialogues,
        "warmup": ["data/warmup.jsonl"],
        "valid": ["data/probes-valid.jsonl"],
    }


def sized_jobs(plan: DemoPlan) -> list[Job]:
    """The jobs of the stages whose length the budget chooses (phase 2), in order."""
    return [j for j in jobs(plan) if j.stage in SIZED]


def by_stage(job_times: dict[str, float], plan: DemoPlan) -> dict[str, float]:
    """Job times with a stage's parts (a cut full-history baseline) summed under its name."""
    out = dict(job_times)
    for job in jobs(plan):
        if job.name != job.stage and job.name in out:
            out[job.stage] = out.get(job.stage, 0.0) + out.pop(job.name)
    return out
