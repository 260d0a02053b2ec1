"""``rxt train STAGE --config RECIPE.yaml --out DIR``: run one curriculum stage of a recipe.

A run directory holds one sub-directory per stage; each model stage starts from the model the
previous stage saved (``--init`` overrides that, e.g. to skip stage 3 in an ablation)::

    DIR/tokenizer/tokenizer.json
    DIR/joint/model   <- built fresh from the recipe's model section and the tokenizer
    DIR/sft/model     <- DIR/joint/model
    DIR/memory/model  <- DIR/sft/model
    DIR/smat/model    <- DIR/memory/model
    DIR/stateless-full/model, DIR/stateless-current/model  <- fresh, parameter-matched Llamas

Each stage directory also holds the loop's ``checkpoint/``, ``log.jsonl`` and TensorBoard logs.
Under ``torchrun`` the same call trains data-parallel (see :mod:`rxt.training.loop`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rxt.data.dialogue import DataError, Dialogue, read_dialogues
from rxt.tokenizer import TOKENIZER_FILE, RxTTokenizer
from rxt.training.recipe import PREVIOUS, Recipe, RecipeError, build_dataclass, load_recipe

__all__ = ["BASELINE_CONTEXT", "fit_dialogues", "load_dialogue_files", "load_texts", "run_stage"]

BASELINE_CONTEXT = 4096  # tokens a stateless baseline can read (RoPE: no parameters depend on it)


def load_dialogue_files(files: Sequence[Path], key: str, recipe: Recipe) -> list[Dialogue]:
    if not files:
        raise recipe.error(key, "no data files")
    dialogues: list[Dialogue] = []
    for path in files:
        if path.suffix != ".jsonl":
            raise recipe.error(key, f"{path}: dialogue stages need JSONL files")
        try:
            dialogues.extend(read_dialogues(path))
        except FileNotFoundError:
            raise recipe.error(key, f"{path}: no such file") from None
        except DataError as err:  # already names file:line:field
            raise recipe.error(key, str(err)) from None
    return dialogues


def load_texts(files: Sequence[Path], key: str, recipe: Recipe) -> Iterator[str]:
    """Every text of ``files``: the system prompt, queries and answers of JSONL dialogues, or
    the non-empty lines of a text file."""
    if not files:
        raise recipe.error(key, "no data files")
    for path in files:
        if path.suffix == ".jsonl":
            for dialogue in load_dialogue_files([path], key, recipe):
                if dialogue.system:
                    yield dialogue.system
                for turn in dialogue.turns:
                    yield turn.query
                    yield turn.answer
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield line.strip()
        except FileNotFoundError:
            raise recipe.error(key, f"{path}: no such file") from None
        except UnicodeDecodeError as err:
            raise recipe.error(key, f"{path}: not UTF-8 ({err})") from None


def fit_dialogues(
    dialogues: Sequence[Dialogue], tokenizer: RxTTokenizer, max_len: int
) -> tuple[list[Dialogue], int]:
    """Cut each dialogue before its first interaction longer than ``max_len`` tokens (a turn
    cannot be skipped without changing what the memory holds); dialogues left empty are
    dropped. Returns the kept dialogues and how many were cut or dropped."""
    kept, cut = [], 0
    for d in dialogues:
        n = 0
        for turn in d.turns:
            if len(tokenizer.encode_interaction(turn.query, turn.answer).input_ids) > max_len:
                break
            n += 1
        if n < len(d.turns):
            cut += 1
            probes = tuple(p for p in d.probes if p.turn < n)
            d = dataclasses.replace(d, turns=d.turns[:n], probes=probes) if n else None
        if d is not None:
            kept.append(d)
    return kept, cut


def _dialogues(spec_data, key: str, recipe: Recipe, tokenizer: RxTTokenizer, max_len: int):
    dialogues = load_dialogue_files(spec_data, key, recipe)
    kept, cut = fit_dialogues(dialogues, tokenizer, max_len)
    if cut:
        warnings.warn(
            f"{key}: {cut} of {len(dialogues)} dialogues cut before an interaction longer than "
            f"max_seq_len={max_len} tokens",
            stacklevel=2,
        )
    if not kept:
        raise recipe.error(key, f"no dialogue has a first turn within {max_len} tokens")
    return kept


def _tokenizer(out: Path) -> RxTTokenizer:
    path = out / "tokenizer" / TOKENIZER_FILE
    if not path.is_file():
        raise RecipeError(f"{path}: missing; run `rxt train tokenizer` with this --out first")
    return RxTTokenizer.from_file(path)


def _start_model(stage: str, recipe: Recipe, out: Path, init: str | None):
    """The model a stage starts from: ``init``, the recipe's ``from`` stage, the previous stage
    of the curriculum, or (stage 1) a fresh one."""
    from rxt.model.reactive_transformer import ReactiveTransformer

    tokenizer = _tokenizer(out)
    spec = recipe.stage(stage)
    source = Path(init) if init else None
    if source is None and (spec.start or spec.kind != "joint"):
        source = out / (spec.start or PREVIOUS[spec.kind]) / "model"
    if source is None:
        torch.manual_seed(recipe.stage(stage).seed)
        model = ReactiveTransformer(recipe.model_config(tokenizer.vocab_size))
        model.tokenizer = tokenizer
        return model
    if init and not source.is_dir():
        raise RecipeError(f"--init {source}: not a model directory")
    if not source.is_dir():
        raise RecipeError(
            f"{source}: no model to start stage {stage!r} from; run stage "
            f"{spec.start or PREVIOUS.get(spec.kind, 'joint')!r} first or pass --init"
        )
    model = ReactiveTransformer.from_pretrained(source)
    if model.tokenizer is None:
        model.tokenizer = tokenizer
    return model


def _build(stage: str, recipe: Recipe, out: Path, init: str | None) -> tuple[Any, Any]:
    """(model, stage object) for a model stage."""
    spec = recipe.stage(stage)
    key = f"stages.{stage}"
    kind = spec.kind
    if kind in ("joint", "sft"):
        from rxt.training.stages.joint import (
            JointConfig,
            JointStage,
            interaction_sequences,
            text_sequences,
        )

        config = build_dataclass(JointConfig, spec.config, recipe, f"{key}.config")
        model = _start_model(stage, recipe, out, init)
        max_len = model.config.max_seq_len
        if kind == "joint":
            texts = list(load_texts(spec.data, f"{key}.data", recipe))
            sequences = text_sequences(texts, model.tokenizer, max_len)
        else:
            dialogues = load_dialogue_files(spec.data, f"{key}.data", recipe)
            sequences = interaction_sequences(dialogues, model.tokenizer, max_len)
        return model, JointStage(sequences, model.tokenizer, config, seed=spec.seed, name=kind)
    if kind == "memory":
        from rxt.training.stages.memory import MemoryPretrainConfig, MemoryPretrainStage

        config = build_dataclass(MemoryPretrainConfig, spec.config, recipe, f"{key}.config")
        model = _start_model(stage, recipe, out, init)
        max_len = model.config.max_seq_len
        dialogues = _dialogues(spec.data, f"{key}.data", recipe, model.tokenizer, max_len)
        return model, MemoryPretrainStage(dialogues, model.tokenizer, config, seed=spec.seed)
    if kind == "smat":
        from rxt.training.stages.smat import SmatConfig, SmatStage

        config = build_dataclass(SmatConfig, spec.config, recipe, f"{key}.config")
        model = _start_model(stage, recipe, out, init)
        max_len = model.config.max_seq_len
        dialogues = _dialogues(spec.data, f"{key}.data", recipe, model.tokenizer, max_len)
        return model, SmatStage(dialogues, model.tokenizer, config, seed=spec.seed)
    # The stateless baselines: parameter-matched to the RxT model of this recipe.
    from rxt.baselines import build_baseline, full_sequence, load_baseline, matched_llama_config
    from rxt.training.stages.stateless import StatelessConfig, StatelessStage

    config = build_dataclass(StatelessConfig, spec.config, recipe, f"{key}.config")
    tokenizer = _tokenizer(out)
    mode = kind.removeprefix("stateless-")
    rxt_config = recipe.model_config(tokenizer.vocab_size)
    # The same interactions RxT trains on: each within RxT's max_seq_len.
    dialogues = _dialogues(spec.data, f"{key}.data", recipe, tokenizer, rxt_config.max_seq_len)
    source = Path(init) if init else (out / spec.start / "model" if spec.start else None)
    if source is not None:
        if not source.is_dir():
            raise RecipeError(f"{source}: no baseline to start stage {stage!r} from")
        model, _ = load_baseline(source)
        if model.mode != mode:
            raise RecipeError(f"{source}: a {model.mode!r} baseline, not {mode!r}")
        model.train()
    else:
        # The context window: every training dialogue, and at least BASELINE_CONTEXT tokens, so
        # a later stage (longer dialogues) or evaluation never truncates the history.
        longest = max(len(full_sequence(tokenizer, d).input_ids) for d in dialogues)
        matched = matched_llama_config(rxt_config, max_positions=max(longest, BASELINE_CONTEXT))
        model = build_baseline(matched.config, seed=spec.seed, tokenizer=tokenizer, mode=mode)
    stage_obj = StatelessStage(dialogues, tokenizer, mode, seed=spec.seed, **config.to_dict())
    return model, stage_obj


def run_stage(
    stage: str,
    recipe: Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    init: str | None = None,
    progress: bool = True,
    device: str | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Run ``stage`` of ``recipe`` into ``out/stage``; returns the last log entry (for the
    tokenizer: its vocabulary size and path). ``device``: where to train (default: CUDA when
    available, ``cuda:LOCAL_RANK`` under torchrun; else CPU). ``stop_at``: end after that step
    with a checkpoint, to be resumed (:func:`rxt.training.loop.train`)."""
    from rxt.training.distributed import barrier, init_distributed
    from rxt.training.loop import train

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    context = init_distributed(device)
    if stage == "tokenizer":
        path = out / "tokenizer" / TOKENIZER_FILE
        if context.is_main:  # under torchrun every rank runs this; one writes
            texts = load_texts(recipe.tokenizer_data, "tokenizer.data", recipe)
            tokenizer = RxTTokenizer.train(
                texts,
                vocab_size=recipe.vocab_size,
                min_frequency=recipe.min_frequency,
                prefix_space=recipe.prefix_space,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(path)
        barrier(context)
        return {"vocab_size": RxTTokenizer.from_file(path).vocab_size, "path": str(path)}
    model, stage_obj = _build(stage, recipe, out, init)
    model = model.to(context.device)
    config = recipe.train_config(stage)
    evaluator = _evaluator(stage, recipe, out)
    return train(
        model,
        stage_obj,
        config,
        out / stage,
        resume=resume,
        progress=progress,
        evaluator=evaluator,
        stop_at=stop_at,
    )


def _evaluator(stage: str, recipe: Recipe, out: Path):
    """The stage's learning curve (its recipe's ``eval``), or None."""
    spec = recipe.stage(stage)
    if spec.eval is None:
        return None
    from rxt.eval.curve import RecallCurve

    tokenizer = _tokenizer(out)
    key = f"stages.{stage}.eval.data"
    max_len = recipe.model_config(tokenizer.vocab_size).max_seq_len
    dialogues = _dialogues(spec.eval.data, key, recipe, tokenizer, max_len)[: spec.eval.limit]
    mode = spec.kind.removeprefix("stateless-") if spec.kind.startswith("stateless-") else None
    try:
        return RecallCurve(dialogues, tokenizer, spec.eval.every, mode=mode)
    except ValueError as err:
        raise recipe.error(key, str(err)) from None
