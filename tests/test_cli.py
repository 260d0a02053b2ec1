"""The command line: `rxt info`, `rxt demo --quick`, `python -m rxt`, user errors."""

import inspect
import json
import subprocess
import sys

import pytest
import yaml

from rxt import ReactiveTransformer
from rxt.bench.latency import LatencySettings
from rxt.bench.throughput import ThroughputSettings
from rxt.cli import COMMANDS, Group, build_parser, main
from rxt.cli.serve import ServeOptions
from rxt.demo.conversation import SCRIPT
from rxt.demo.report import CONVERSATION_TARGET


def test_info_json_reports_every_preset(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"tiny", "small", "paper-nano", "paper-micro-dense"}
    nano = report["paper-nano"]["parameters"]
    assert nano["active_per_token"] < nano["inference"] < nano["total"]
    flops = report["tiny"]["turn_flops"]
    assert flops["user_facing"] == flops["memory_kv"] + flops["prefill"] + flops["generation"]


def test_demo_quick_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    systems = report["systems"]
    assert set(systems) >= {"rxt", "rxt-memory-off", "stateless-full-history",
                            "stateless-current-turn"}  # fmt: skip
    for entry in systems.values():
        assert set(entry) >= {"recall_by_distance", "perplexity", "accuracy", "reward"}
        assert all(0 <= v <= 1 for v in entry["recall_by_distance"].values())
    assert report["ablations"] == {}  # behind --ablations (test_demo_ablations_flag)
    assert report["budget"] is None  # --quick runs its fixed steps unless given --budget
    assert set(report["long"]) >= {"rxt", "rxt-memory-off", "stateless-full-history"}
    assert set(report["learning_curves"]) == {"rxt", "stateless-full-history"}
    assert all(len(points) >= 2 for points in report["learning_curves"].values())
    assert (tmp_path / "recall_vs_steps.png").stat().st_size > 0
    assert {t["target"] for t in report["targets"]} >= {"RxT recall >= 0.90 at distances 1-2"}
    # Every training stage ran for its planned steps.
    assert all(t["steps"] >= 1 for t in report["training"].values())
    assert len(report["training"]) == 9  # RxT's five stages, each baseline's two
    # Latency was measured on the trained model, both systems, every turn.
    assert {r["system"] for r in report["latency"]} == {"rxt", "stateless"}
    for name in ("report.md", "recall_vs_distance.png", "latency_vs_turn.png", "recipe.yaml"):
        assert (tmp_path / name).stat().st_size > 0
    # The recall baselines and the latency baseline are different models; both are labelled.
    labels = report["baselines"]
    assert set(labels) == {"stateless-full", "stateless-current", "latency"}
    assert "random weights" in labels["latency"] and "trained" in labels["stateless-full"]
    markdown = (tmp_path / "report.md").read_text()
    assert all(label in markdown for label in labels.values())
    # rxt eval's entries say what the wrong recall answers were, and recall by kind.
    assert systems["rxt"]["errors"]["probes"] == sum(systems["rxt"]["probes_by_distance"].values())
    assert sum(systems["rxt"]["probes_by_kind"].values()) == systems["rxt"]["errors"]["probes"]
    assert "## Recall (exact match) by fact kind" in markdown
    # Both real-text corpora are trained on and evaluated by answer perplexity, every system.
    for corpus, title in (("shakespeare", "## Shakespeare"), ("chitchat", "## Chit Chat")):
        assert set(report[corpus]) >= {"rxt", "stateless-full-history", "stateless-current-turn"}
        assert all(e["perplexity"] > 1 for e in report[corpus].values())
        assert title in markdown
    stages = yaml.safe_load((tmp_path / "recipe.yaml").read_text())["stages"]
    assert "data/chitchat-train.jsonl" in stages["smat"]["data"]
    assert "## Wrong recall answers" in markdown
    # The scripted conversation was played, printed and reported (right or not: nothing learnt).
    conversation = report["conversation"]
    assert [t["query"] for t in conversation] == [line.query for line in SCRIPT]
    assert all(isinstance(t["correct"], bool) for t in conversation if t["expected"] is not None)
    (target,) = [t for t in report["targets"] if t["target"] == CONVERSATION_TARGET]
    assert target["met"] in (True, False)
    assert "## A conversation" in markdown
    assert all(line.query in markdown for line in SCRIPT)
    out = capsys.readouterr().out
    assert f"user: {SCRIPT[0].query}" in out and "rxt: " in out
    model = ReactiveTransformer.from_pretrained(tmp_path / "rxt")
    assert model.tokenizer is not None and model.tokenizer.prefix_space  # DemoPlan.prefix_space
    assert "report:" in out


def test_demo_with_a_budget_times_the_main_stages_then_sizes_them(tmp_path):
    assert main(["demo", "--quick", "--budget", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    budget, steps = report["budget"], report["settings"]["smat_steps"]
    assert budget["steps"] == steps and budget["budget_s"] == 60
    assert set(budget["per_step_s"]) == {"smat", "stateless-full", "stateless-current"}
    assert all(v > 0 for v in budget["per_step_s"].values()) and budget["actual_total_s"] > 0
    stages = yaml.safe_load((tmp_path / "recipe.yaml").read_text())["stages"]
    # The recipe on disk is the one that ran: the chosen steps for all three main stages.
    assert {
        stages[n]["train"]["steps"] for n in ("smat", "stateless-full", "stateless-current")
    } == {steps}
    assert report["training"]["smat"]["steps"] == steps
    for timing in ("calibrate-smat", "calibrate-stateless-full", "calibrate-stateless-current"):
        assert (tmp_path / "runs" / timing / "log.jsonl").is_file()
    assert "as many as the 1.0-minute budget allowed" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "0"], "--budget must be > 0"),
        (["--smat-steps", "0"], "--smat-steps must be >= 1"),
        (["--budget", "5", "--smat-steps", "10"], "give one"),
        (["--long", "--budget", "5"], "--long trains a fixed"),
    ],
)
def test_demo_budget_flags_are_checked(argv, message, capsys):
    assert main(["demo", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err


def test_demo_ablations_flag_adds_the_two_ablations(tmp_path):
    assert main(["demo", "--quick", "--ablations", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["ablations"]) == {"ablation-no-memory", "ablation-horizon-1"}
    assert len(report["training"]) == 12 and report["settings"]["ablations"] is True
    assert "ablation-horizon-1 (gradient horizon 1" in (tmp_path / "report.md").read_text()


def test_user_error_is_one_line_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "latency", "--preset", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_rxt():
    out = subprocess.run(
        [sys.executable, "-m", "rxt", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("rxt ")


def test_demo_long_reports_mean_and_spread_over_seeds(tmp_path):
    """``rxt demo --long --quick``: two seeds of the quick plan, one report over them."""
    assert main(["demo", "--long", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report-long.json").read_text())
    assert report["seeds"] == [0, 1]
    assert set(report["recall"]) == {"rxt", "rxt-memory-off", "stateless-full-history"}
    for seed in (0, 1):
        entry = report["per_seed"][str(seed)]["test"]["rxt"]
        assert (tmp_path / f"seed-{seed}" / "eval" / "rxt.json").is_file()
        assert entry["recall"] in (report["recall"]["rxt"]["all"]["min"],
                                   report["recall"]["rxt"]["all"]["max"])  # fmt: skip
    cell = report["recall"]["rxt"]["all"]
    assert cell["n"] == 2 and cell["min"] <= cell["mean"] <= cell["max"]
    # The seeds' data differ (each seed draws its own dialogues).
    tests = [(tmp_path / f"seed-{s}" / "data" / "probes-test.jsonl").read_text() for s in (0, 1)]
    assert tests[0] != tests[1]
    assert {t["target"] for t in report["targets"]} == {
        "RxT >= 0.90 at every k = 1-8, mean of the seeds",
        "RxT >= 0.85 at k = 16 and 32, mean of the seeds",
    }
    assert "(min–max)" in (tmp_path / "report-long.md").read_text()
    assert (tmp_path / "recall_vs_distance_seeds.png").stat().st_size > 0
    assert not list(tmp_path.glob("seed-0/runs/stateless-current*"))


@pytest.mark.parametrize(
    "argv",
    [
        ["info"],
        ["demo"],
        ["chat", "m"],
        ["serve", "m"],
        ["bench", "latency"],
        ["bench", "throughput"],
        ["train", "smat", "--config", "r", "--out", "o"],
        ["eval", "m", "--data", "d"],
        ["data", "probes"],
        ["data", "chitchat"],
    ],
)
def test_every_command_takes_its_parsed_flags_as_keywords(argv):
    """Each flag's dest is a parameter of its command's function (for serve, a field of
    ServeOptions), and a default the function declares is the flag's default."""
    kwargs = vars(build_parser().parse_args(argv))
    entry = COMMANDS[kwargs.pop("command")]
    if isinstance(entry, Group):
        entry = entry.commands[kwargs.pop(argv[0])]
    if argv[0] == "serve":
        assert ServeOptions(**kwargs) == ServeOptions(model_dir="m")
        return
    if argv[0] == "bench":  # the flags the function does not name are its settings' fields
        named = inspect.signature(entry.run).parameters
        settings = {k: v for k, v in kwargs.items() if k not in named}
        if "concurrency" in settings:
            settings["concurrency"] = tuple(settings["concurrency"])
        cls = LatencySettings if argv[1] == "latency" else ThroughputSettings
        assert cls(**settings) == cls()
        kwargs = {k: v for k, v in kwargs.items() if k in named}
    parameters = inspect.signature(entry.run).parameters
    inspect.signature(entry.run).bind(**kwargs)
    for name, value in kwargs.items():
        default = parameters[name].default
        if default is not inspect.Parameter.empty:
            assert list(default) == value if isinstance(default, tuple) else default == value
