"""The command line: `rxt info`, `rxt demo --quick`, `python -m rxt`, user errors."""

import json
import subprocess
import sys

import pytest

from rxt import ReactiveTransformer
from rxt.cli import main


def test_info_json_reports_every_preset(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"tiny", "small", "paper-nano"}
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
    assert set(report["ablations"]) == {"ablation-no-memory", "ablation-horizon-1"}
    assert {t["target"] for t in report["targets"]} >= {"RxT recall >= 0.90 at distances 1-2"}
    # Every training stage ran for its planned steps.
    assert all(t["steps"] >= 1 for t in report["training"].values())
    assert len(report["training"]) == 12
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
    # rxt eval's entries say what the wrong recall answers were.
    assert systems["rxt"]["errors"]["probes"] == sum(systems["rxt"]["probes_by_distance"].values())
    model = ReactiveTransformer.from_pretrained(tmp_path / "rxt")
    assert model.tokenizer is not None
    assert "report:" in capsys.readouterr().out


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
