"""`rxt train` recipes, the stage runner, `rxt eval` and `rxt data`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rxt.cli import main
from rxt.data.dialogue import Dialogue, Turn, read_dialogues, write_dialogues
from rxt.data.probes import ProbeConfig, generate
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.tokenizer import RxTTokenizer
from rxt.training.recipe import RecipeError, load_recipe
from rxt.training.run import fit_dialogues, run_stage


def _steps(n: int) -> dict:
    return {"steps": n, "lr": 3e-3, "log_every": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    config = ProbeConfig(max_turns=4, max_distance=3)
    write_dialogues(directory / "train.jsonl", generate(60, seed=0, config=config))
    write_dialogues(directory / "test.jsonl", generate(8, seed=0, config=config, split="test"))
    (directory / "plain.txt").write_text("To be, or not to be.\n\nThat is the question.\n")
    return directory


def _recipe(directory: Path, **stages) -> Path:
    spec = {
        "model": {"preset": "tiny"},
        "tokenizer": {"vocab_size": 300, "data": ["train.jsonl", "plain.txt"]},
        "stages": {
            "joint": {"data": ["train.jsonl", "plain.txt"], "config": {"batch_size": 4},
                      "train": _steps(2)},
            "sft": {"data": "train.jsonl", "config": {"batch_size": 4, "answer_only": True},
                    "train": _steps(2)},
            "memory": {"data": "train.jsonl", "config": {"batch_size": 4}, "train": _steps(2)},
            "smat": {"data": "train.jsonl", "config": {"batch_size": 4}, "train": _steps(2)},
            "smat-h1": {"kind": "smat", "from": "sft", "data": "train.jsonl",
                        "config": {"batch_size": 4, "gradient_horizon": 1}, "train": _steps(2),
                        "eval": {"data": "test.jsonl", "every": 1, "limit": 5}},
            "stateless-full": {"data": "train.jsonl", "config": {"batch_size": 4},
                               "train": _steps(2), "eval": {"data": "test.jsonl", "every": 2}},
            **stages,
        },
    }  # fmt: skip
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    recipe = _recipe(data_dir)
    for stage in ("tokenizer", "joint", "sft", "memory", "smat", "smat-h1", "stateless-full"):
        run_stage(stage, recipe, out, progress=False)
    return out


def test_curriculum_chain_writes_each_stage_from_the_previous(trained):
    for stage in ("joint", "sft", "memory", "smat", "smat-h1"):
        model = ReactiveTransformer.from_pretrained(trained / stage / "model")
        assert model.tokenizer is not None
        assert (trained / stage / "log.jsonl").is_file()
        assert (trained / stage / "checkpoint" / "trainer_state.json").is_file()
    assert json.loads((trained / "stateless-full" / "model" / "baseline.json").read_text()) == {
        "mode": "full"
    }
    # Stage 3 trains the memory attention only: the decoder is unchanged from stage 2.
    sft = ReactiveTransformer.from_pretrained(trained / "sft" / "model").state_dict()
    memory = ReactiveTransformer.from_pretrained(trained / "memory" / "model").state_dict()
    assert all((sft[k] == memory[k]).all() for k in sft if k.startswith("decoder."))
    assert any((sft[k] != memory[k]).any() for k in sft if k.startswith("memory_attention."))


def test_recipe_eval_writes_a_learning_curve(trained):
    """``eval`` in a stage's recipe: recall of the probe dialogues at step 0, every ``every``
    steps and at the end, for RxT (limited to 5 dialogues) and for a stateless baseline."""
    for stage, steps in (("smat-h1", [0, 1, 2]), ("stateless-full", [0, 2])):
        curve = [json.loads(x) for x in (trained / stage / "eval.jsonl").read_text().splitlines()]
        assert [c["step"] for c in curve] == steps
        assert all(0 <= c["recall"] <= 1 and c["recall_by_distance"] for c in curve)
    assert not (trained / "smat" / "eval.jsonl").exists()


def test_resume_continues_a_stage(data_dir, trained):
    recipe = _recipe(data_dir, smat={"data": "train.jsonl", "config": {"batch_size": 4},
                                     "train": _steps(3)})  # fmt: skip
    last = run_stage("smat", recipe, trained, resume=True, progress=False)
    assert last["step"] == 3
    _recipe(data_dir)  # restore for other tests


def test_missing_previous_stage_is_a_clear_error(data_dir, tmp_path):
    recipe = _recipe(data_dir)
    run_stage("tokenizer", recipe, tmp_path, progress=False)
    with pytest.raises(RecipeError, match="run stage 'memory' first"):
        run_stage("smat", recipe, tmp_path, progress=False)
    with pytest.raises(RecipeError, match="missing: this stage is not in the recipe"):
        run_stage("stateless-current", recipe, tmp_path, progress=False)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("stages: {smat: {train: {steps: 0}}}\n", None),  # checked when the stage runs
        ("model: {preset: huge}\n", "model.preset: unknown 'huge'"),
        ("stages: {x: {kind: nope}}\n", "stages.x: unknown stage kind 'nope'"),
        ("stages: {x: {kind: smat, from: nowhere}}\n", "stages.x.from: no stage 'nowhere'"),
        ("stages: {smat: {epochs: 3}}\n", r"stages.smat: unknown key\(s\) \['epochs'\]"),
        ("tokenizer: {vocab_size: 10}\n", "tokenizer.vocab_size: expected an integer >= 264"),
        ("tokenizer: {vocab_sise: 300}\n", r"tokenizer: unknown key\(s\) \['vocab_sise'\]"),
        ("tokenizer: {prefix_space: 1}\n", "tokenizer.prefix_space: expected true or false"),
        ("trainer: 1\n", r"unknown top-level key\(s\) \['trainer'\]"),
        ("stages: [1, 2]\n", "stages: expected a mapping"),
        ("model: {preset: tiny\n", "not valid YAML"),
        ("stages: {smat: {eval: {every: 5}}}\n", "stages.smat.eval.data: the probe dialogues"),
        ("stages: {smat: {eval: {data: t.jsonl}}}\n", "stages.smat.eval.every: missing"),
        ("stages: {smat: {eval: {data: t.jsonl, every: 0}}}\n", "eval.every: expected an int"),
        ("stages: {smat: {eval: {data: t.jsonl, every: 2, at: 1}}}\n", r"eval: unknown key"),
        ("stages: {joint: {eval: {data: t.jsonl, every: 2}}}\n", "only smat and stateless"),
    ],
)
def test_recipe_errors_name_the_file_and_key(tmp_path, body, message):
    path = tmp_path / "r.yaml"
    path.write_text(body)
    if message is None:
        recipe = load_recipe(path)
        with pytest.raises(RecipeError, match=r"stages.smat.train: TrainConfig.steps"):
            recipe.train_config("smat")
        return
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_tokenizer_stage_trains_with_the_recipes_prefix_space(data_dir, tmp_path):
    spec = yaml.safe_load(_recipe(data_dir).read_text())
    for flag in (False, True):
        spec["tokenizer"]["prefix_space"] = flag
        path = data_dir / f"recipe-prefix-{flag}.yaml"  # beside the data it names
        path.write_text(yaml.safe_dump(spec))
        run_stage("tokenizer", path, tmp_path / str(flag), progress=False)
        tok = RxTTokenizer.from_file(tmp_path / str(flag) / "tokenizer" / "tokenizer.json")
        assert tok.prefix_space is flag


def test_stage_config_errors_name_the_key(data_dir, tmp_path):
    recipe = _recipe(data_dir, smat={"data": "train.jsonl", "config": {"batch_sise": 4}})
    run_stage("tokenizer", recipe, tmp_path, progress=False)
    with pytest.raises(
        RecipeError, match=r"stages.smat.config: unknown field\(s\) \['batch_sise'\]"
    ):
        run_stage("smat", recipe, tmp_path, progress=False)
    _recipe(data_dir)


def test_bad_data_file_is_reported_with_file_and_line(data_dir, trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "turns": [{"query": "hi"}]}\n')
    recipe = _recipe(data_dir, smat={"data": str(bad), "train": _steps(1)})
    run_stage("tokenizer", recipe, tmp_path, progress=False)
    with pytest.raises(RecipeError, match=r"bad.jsonl:1"):
        run_stage("smat", recipe, tmp_path, init=str(trained / "memory" / "model"), progress=False)
    _recipe(data_dir)


def test_fit_dialogues_cuts_before_the_first_overlong_turn():
    tok = RxTTokenizer.train(["a b c d e f g"] * 20, vocab_size=300)
    long = "word " * 50
    d = Dialogue("x", (Turn("a", "b"), Turn(long, "c"), Turn("d", "e")))
    kept, cut = fit_dialogues([d, Dialogue("y", (Turn(long, "b"),))], tok, 32)
    assert cut == 2
    assert [k.turns for k in kept] == [(Turn("a", "b"),)]


def test_cli_train_eval_and_data(trained, data_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    test = str(data_dir / "test.jsonl")
    assert main(["eval", str(trained / "smat" / "model"), "--data", test, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"rxt", "rxt-memory-off", "rxt-memory-swapped"}
    entry = report["systems"]["rxt"]
    assert set(entry) >= {"recall_by_distance", "perplexity", "accuracy", "reward"}
    assert 0 <= entry["reward"]["mean"] <= 10
    # G of the memory writes, per layer, with memory on only (memory off writes nothing read).
    gate = entry["gate"]
    assert len(gate) == 2 and all(0 < g["p01"] <= g["p50"] <= g["p99"] < 1 for g in gate)
    assert "gate" not in report["systems"]["rxt-memory-off"]
    assert "gate G, layer 1: mean" in capsys.readouterr().out
    baseline = tmp_path / "baseline.json"
    args = ["eval", str(trained / "stateless-full" / "model"), "--data", test]
    assert main([*args, "--json", str(baseline), "--no-reward"]) == 0
    assert list(json.loads(baseline.read_text())["systems"]) == ["stateless-full-history"]

    assert main(["data", "probes", "--out", str(tmp_path), "--sizes", "5", "2", "3"]) == 0
    assert len(read_dialogues(tmp_path / "probes-test.jsonl")) == 3

    capsys.readouterr()
    code = main(["train", "smat", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rxt train: error:") and "no such recipe file" in err
    assert "\n" not in err
