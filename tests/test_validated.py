"""The one validated-config base (`rxt.validated`) and the configs built on it."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from rxt.config import ConfigError
from rxt.training.recipe import Recipe, RecipeError, build_dataclass
from rxt.training.stages.stateless import StatelessConfig
from rxt.validated import UnknownFieldError, Validated


@dataclass(frozen=True)
class Sample(Validated):
    error_prefix = "Sample."

    count: int = 1
    rate: float = 0.5
    pair: tuple[int, int] = (1, 2)
    names: tuple[str, ...] = ()
    label: str | None = None

    def validate(self) -> None:
        self.require("count", self.count >= 1, "must be >= 1")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": True}, "Sample.count: must be an integer, got True"),
        ({"count": 0}, "Sample.count: must be >= 1, got 0"),
        ({"rate": math.inf}, "Sample.rate: must be finite, got inf"),
        ({"rate": "x"}, "Sample.rate: must be a number, got 'x'"),
        ({"pair": (1,)}, "Sample.pair: must be a list of 2, got (1,)"),
        ({"pair": (1, 2.5)}, "Sample.pair: entry [1] must be an integer, got 2.5"),
        ({"names": "ab"}, "Sample.names: must be a list, got 'ab'"),
        ({"label": 3}, "Sample.label: must be a string, got 3"),
    ],
)
def test_type_hints_are_checked_naming_field_rule_and_value(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Sample(**kwargs)
    assert str(info.value) == message


def test_lists_are_stored_as_tuples_and_round_trip():
    sample = Sample(pair=[3, 4], names=["a", "b"])
    assert sample.pair == (3, 4) and sample.names == ("a", "b")
    assert Sample.from_dict(sample.to_dict()) == sample


def test_from_dict_rejects_unknown_fields_with_their_names():
    with pytest.raises(UnknownFieldError) as info:
        Sample.from_dict({"count": 2, "cuont": 3})
    assert info.value.unknown == ["cuont"]
    assert info.value.known == ["count", "label", "names", "pair", "rate"]
    assert str(info.value).startswith("Sample.cuont: unknown field")


def test_stateless_recipe_keys_are_the_config_fields():
    recipe = Recipe(path=Path("r.yaml"))
    key = "stages.stateless-full.config"
    assert build_dataclass(StatelessConfig, {"batch_size": 4}, recipe, key).batch_size == 4
    with pytest.raises(RecipeError) as info:
        build_dataclass(StatelessConfig, {"batch_sise": 4}, recipe, key)
    assert str(info.value) == (
        f"r.yaml: {key}: unknown field(s) ['batch_sise']; known: ['batch_size', 'length_groups']"
    )
    with pytest.raises(RecipeError, match=rf"r.yaml: {key}: batch_size: must be an int >= 1"):
        build_dataclass(StatelessConfig, {"batch_size": 0}, recipe, key)


def test_the_module_imports_nothing_else_from_rxt():
    source = Path(__file__).parents[1] / "src" / "rxt" / "validated.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m == "rxt" or m.startswith("rxt.")]
