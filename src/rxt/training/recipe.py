"""Training recipes: one YAML file describes a whole curriculum run (``rxt train``).

Layout (every section optional except the ones a stage needs)::

    model:                       # the RxT architecture, built by the first model stage (joint)
      preset: tiny               # a name from RxTConfig.presets()
      overrides: {memory: {num_slots: 32}}   # nested fields; vocab_size comes from the tokenizer
    tokenizer:
      vocab_size: 1024
      min_frequency: 2
      prefix_space: true         # encode every text as " " + text (rxt.tokenizer); default false
      data: [data/train.jsonl, data/plays.txt]
    stages:
      joint:                     # stage 1; also sft (2), memory (3), smat (4),
        data: [data/train.jsonl] # stateless-full and stateless-current (the baselines)
        config: {batch_size: 32} # the stage's own config dataclass (JointConfig, SmatConfig...)
        train: {steps: 300, lr: 3e-3, warmup_steps: 30}    # TrainConfig
        seed: 0                  # the stage's data order
      smat:
        eval: {data: [data/valid.jsonl], every: 250, limit: 100}   # a learning curve
                                 # (smat and stateless-* stages: recall -> smat/eval.jsonl)
      smat-horizon-1:            # any other name is a variant of a stage (ablations):
        kind: smat               #   which stage it runs
        from: memory             #   whose model it starts from (default: the kind's previous)
        config: {gradient_horizon: 1}

Data files are dialogue JSONL (``.jsonl``, see :mod:`rxt.data.dialogue`) or plain text (any other
suffix: one text per non-empty line). Relative paths are relative to the recipe file. Every
error names the file and the dotted key (``recipe.yaml: stages.smat.train.lr: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rxt.config import ConfigError, RxTConfig
from rxt.training.loop import TrainConfig
from rxt.validated import UnknownFieldError, Validated, is_int

__all__ = [
    "STAGES",
    "EvalRecipe",
    "Recipe",
    "RecipeError",
    "StageRecipe",
    "build_dataclass",
    "load_recipe",
]

# Stage names in curriculum order; each model stage starts from the previous one's model.
STAGES = ("tokenizer", "joint", "sft", "memory", "smat", "stateless-full", "stateless-current")
PREVIOUS = {"joint": "tokenizer", "sft": "joint", "memory": "sft", "smat": "memory"}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class StageRecipe:
    kind: str
    start: str | None = None  # the stage whose model this one starts from; None = the default
    data: tuple[Path, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    eval: EvalRecipe | None = None


@dataclass(frozen=True)
class EvalRecipe:
    """A learning curve: recall of the first ``limit`` dialogues of ``data`` every ``every``
    steps (:class:`rxt.eval.curve.RecallCurve`)."""

    data: tuple[Path, ...]
    every: int
    limit: int | None = None


@dataclass(frozen=True)
class Recipe:
    path: Path
    preset: str = "tiny"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    vocab_size: int = 1024
    min_frequency: int = 2
    prefix_space: bool = False
    tokenizer_data: tuple[Path, ...] = ()
    stages: Mapping[str, StageRecipe] = field(default_factory=dict)

    def error(self, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.path}: {key}: {message}")

    def stage(self, name: str) -> StageRecipe:
        if name not in self.stages:
            raise self.error(f"stages.{name}", "missing: this stage is not in the recipe")
        return self.stages[name]

    def model_config(self, vocab_size: int) -> RxTConfig:
        try:
            return RxTConfig.preset(self.preset, **{**self.overrides, "vocab_size": vocab_size})
        except (ConfigError, TypeError, ValueError) as err:
            raise self.error("model", str(err)) from None

    def train_config(self, name: str) -> TrainConfig:
        return build_dataclass(TrainConfig, self.stage(name).train, self, f"stages.{name}.train")


def build_dataclass(
    cls: type[Validated], values: Mapping[str, Any], recipe: Recipe, key: str
) -> Any:
    """``cls.from_dict(values)`` (a :class:`rxt.validated.Validated` config: types from the
    hints, lists stored as tuples, unknown fields rejected) with errors naming the recipe file
    and key."""
    try:
        return cls.from_dict(dict(values))
    except UnknownFieldError as err:
        raise recipe.error(key, f"unknown field(s) {err.unknown}; known: {err.known}") from None
    except (TypeError, ValueError) as err:
        raise recipe.error(key, str(err)) from None


_TOKENIZER_KEYS = {"vocab_size", "min_frequency", "prefix_space", "data"}


def _mapping(value: Any, path: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise RecipeError(f"{path}: {key}: expected a mapping, got {type(value).__name__}")
    return value


def _files(value: Any, path: Path, key: str) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{path}: {key}: expected a file path or a list of them")
    return tuple((path.parent / v) if not os.path.isabs(v) else Path(v) for v in value)


def _int(value: Any, path: Path, key: str, default: int, low: int) -> int:
    if value is None:
        return default
    if not is_int(value) or value < low:
        raise RecipeError(f"{path}: {key}: expected an integer >= {low}, got {value!r}")
    return value


def _eval(value: Any, kind: str, path: Path, key: str) -> EvalRecipe | None:
    if value is None:
        return None
    body = _mapping(value, path, key)
    extra = sorted(set(body) - {"data", "every", "limit"})
    if extra:
        raise RecipeError(f"{path}: {key}: unknown key(s) {extra}; known: data, every, limit")
    if kind not in ("smat", "stateless-full", "stateless-current"):
        raise RecipeError(f"{path}: {key}: only smat and stateless stages measure recall")
    data = _files(body.get("data"), path, f"{key}.data")
    if not data:
        raise RecipeError(f"{path}: {key}.data: the probe dialogues to score are missing")
    if "every" not in body:
        raise RecipeError(f"{path}: {key}.every: missing (steps between evaluations)")
    every = _int(body["every"], path, f"{key}.every", 0, 1)
    limit = body.get("limit")
    return EvalRecipe(
        data, every, None if limit is None else _int(limit, path, f"{key}.limit", 0, 1)
    )


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe (the structure; stage configs are checked when a stage runs)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    top = _mapping(raw, path, "recipe")
    unknown = sorted(set(top) - {"model", "tokenizer", "stages"})
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {unknown}")

    model = _mapping(top.get("model"), path, "model")
    preset = model.get("preset", "tiny")
    if preset not in RxTConfig.presets():
        raise RecipeError(f"{path}: model.preset: unknown {preset!r}; {RxTConfig.presets()}")
    tok = _mapping(top.get("tokenizer"), path, "tokenizer")
    extra = sorted(set(tok) - _TOKENIZER_KEYS)
    if extra:
        known = ", ".join(sorted(_TOKENIZER_KEYS))
        raise RecipeError(f"{path}: tokenizer: unknown key(s) {extra}; known: {known}")
    prefix_space = tok.get("prefix_space", False)
    if not isinstance(prefix_space, bool):
        raise RecipeError(f"{path}: tokenizer.prefix_space: expected true or false")
    stages: dict[str, StageRecipe] = {}
    for name, body in _mapping(top.get("stages"), path, "stages").items():
        body = _mapping(body, path, f"stages.{name}")
        extra = sorted(set(body) - {"kind", "from", "data", "config", "train", "seed", "eval"})
        if extra:
            raise RecipeError(f"{path}: stages.{name}: unknown key(s) {extra}")
        kind = body.get("kind", name)
        if kind not in STAGES[1:] or name == "tokenizer":
            raise RecipeError(
                f"{path}: stages.{name}: unknown stage kind {kind!r}; known: {list(STAGES[1:])}"
            )
        start = body.get("from")
        if start is not None and not isinstance(start, str):
            raise RecipeError(f"{path}: stages.{name}.from: expected a stage name")
        stages[name] = StageRecipe(
            kind=kind,
            start=start,
            data=_files(body.get("data"), path, f"stages.{name}.data"),
            config=_mapping(body.get("config"), path, f"stages.{name}.config"),
            train=_mapping(body.get("train"), path, f"stages.{name}.train"),
            seed=_int(body.get("seed"), path, f"stages.{name}.seed", 0, 0),
            eval=_eval(body.get("eval"), kind, path, f"stages.{name}.eval"),
        )
    recipe = Recipe(
        path=path,
        preset=preset,
        overrides=_mapping(model.get("overrides"), path, "model.overrides"),
        vocab_size=_int(tok.get("vocab_size"), path, "tokenizer.vocab_size", 1024, 264),
        min_frequency=_int(tok.get("min_frequency"), path, "tokenizer.min_frequency", 2, 1),
        prefix_space=prefix_space,
        tokenizer_data=_files(tok.get("data"), path, "tokenizer.data"),
        stages=stages,
    )
    for name, spec in recipe.stages.items():
        if spec.start is not None and spec.start not in recipe.stages:
            raise RecipeError(f"{path}: stages.{name}.from: no stage {spec.start!r} in the recipe")
    return recipe
