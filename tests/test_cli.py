"""The command line: `rxt info`, `rxt demo --quick`, `python -m rxt`, user errors."""

import itertools
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


def test_demo_quick_writes_a_loadable_model_and_per_turn_records(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    turns = summary["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    # RxT's prompt is the current query only; a stateless model's grows with every turn.
    assert max(t["prompt_tokens"] for t in turns) < turns[-1]["stateless_prompt_tokens"]
    assert all(
        t["stateless_prompt_tokens"] > p["stateless_prompt_tokens"]
        for p, t in itertools.pairwise(turns)
    )
    model = ReactiveTransformer.from_pretrained(tmp_path / "rxt")
    assert model.tokenizer is not None
    assert "untrained" in capsys.readouterr().out


def test_user_error_is_one_line_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--preset", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_rxt():
    out = subprocess.run(
        [sys.executable, "-m", "rxt", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("rxt ")
