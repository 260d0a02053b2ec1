"""benchmarks/decoder_split.py: the splits it compares hold equal parameters, and each run trains
the demo's RxT chain with the split's FFN widths and no baseline unless asked."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from benchmark_support import load_benchmark
from rxt.demo.plan import DemoPlan


def _module():
    return load_benchmark("decoder_split")


def test_the_documented_splits_hold_the_same_parameters():
    module = _module()
    splits = ((128, 128), (192, 64), (224, 32))
    counts = [module.parameters(DemoPlan(ffn_dims=s)) for s in splits]
    assert len({c["inference"] for c in counts}) == 1
    assert counts[0]["decoder"] < counts[1]["decoder"] < counts[2]["decoder"]
    assert len({c["memory_attention"] for c in counts}) == 1  # only the FFNs move


@pytest.mark.parametrize("text", ["192", "a:b", "0:64", "192:64:1"])
def test_a_bad_split_is_refused_by_name(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"DEC:ENC|positive"):
        _module()._split(text)


def test_a_run_trains_the_rxt_chain_with_the_split(tmp_path):
    module = _module()
    plan = dataclasses.replace(DemoPlan.quick(), ffn_dims=(192, 64))
    run = tmp_path / "d192-e64-seed0"
    tasks = module.prepare(plan, run, 0, current=False)
    spec = yaml.safe_load((run / "recipe.yaml").read_text())
    assert spec["model"]["overrides"] == {"decoder": {"ffn_dim": 192}, "encoder": {"ffn_dim": 64}}
    names = {t.name.removeprefix("d192-e64-seed0-") for t in tasks}
    assert {"joint", "sft", "memory", "smat-warmup", "smat", "eval-rxt"} <= names
    assert not {n for n in names if "stateless" in n}
    with_current = module.prepare(plan, tmp_path / "c", 0, current=True)
    names = {t.name.removeprefix("c-") for t in with_current}
    assert {"stateless-current", "eval-shakespeare-stateless-current"} <= names
    assert not {n for n in names if "stateless-full" in n}


def test_memory_overrides_reach_the_recipe_and_name_the_run(tmp_path):
    module = _module()
    assert module._override("num_slots=64") == ("num_slots", 64)
    assert module._override("variant=gated-self-interlayer") == (
        "variant",
        "gated-self-interlayer",
    )
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        module._override("num_slots")
    plan = dataclasses.replace(DemoPlan.quick(), memory=(("num_slots", 16),))
    assert module.run_name(plan, 2) == "d224-e32-num_slots16-seed2"
    assert module.run_name(DemoPlan(), 0) == "d224-e32-seed0"
    overrides = [("long_train_dialogues", 2000)]
    assert (
        module.run_name(plan, 1, overrides) == "d224-e32-num_slots16-long_train_dialogues2000-seed1"
    )
    run = tmp_path / module.run_name(plan, 0)
    module.prepare(plan, run, 0, current=False)
    spec = yaml.safe_load((run / "recipe.yaml").read_text())
    assert spec["model"]["overrides"]["memory"] == {"num_slots": 16}
    # More slots hold no more parameters: the STM is state, not weights.
    assert module.parameters(plan)["inference"] == module.parameters(DemoPlan.quick())["inference"]
