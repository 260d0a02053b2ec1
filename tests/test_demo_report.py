"""The demo report's latency section says what the baseline is and how both are clocked."""

from __future__ import annotations

from rxt.demo.report import _latency_summary
from rxt.demo.report_markdown import LATENCY_BASELINE, latency_section


def _records(turns: int) -> list[dict]:
    records = []
    for t in range(1, turns + 1):
        records.append({"system": "rxt", "turn": t, "prompt_tokens": 19, "ttft_s": 0.002})
        records.append(
            {"system": "stateless", "turn": t, "prompt_tokens": 19 + 36 * (t - 1), "ttft_s": t}
        )
    return records


def test_latency_summary_holds_medians_and_each_systems_last_prompt() -> None:
    summary = _latency_summary(_records(8))
    assert summary["first_turns"] == summary["last_turns"] == 4
    assert summary["ttft_ms"]["rxt"] == {"first": 2.0, "last": 2.0}
    assert summary["ttft_ms"]["stateless"] == {"first": 2500.0, "last": 6500.0}
    assert summary["prompt_tokens_last"] == {"rxt": 19, "stateless": 19 + 36 * 7}


def test_latency_section_names_the_baseline_and_the_clock() -> None:
    label = "transformers Llama of the RxT decoder's size (2 layers, d 64), random weights"
    text = "\n".join(latency_section(_latency_summary(_records(8)), label))
    assert f"Stateless baseline: {label}." in text
    assert "re-reads the whole conversation every turn" in text
    assert "the calling thread holds the first new token" in text
    assert "same way for both systems" in text
    assert "| RxT (trained) | 19 | 2.00 | 2.00 |" in text
    assert "| stateless baseline | 271 | 2500.00 | 6500.00 |" in text


def test_latency_section_labels_the_baseline_without_its_config() -> None:
    summary = _latency_summary(_records(2))
    del summary["prompt_tokens_last"]  # a report.json written before the field existed
    text = "\n".join(latency_section(summary, None))
    assert f"Stateless baseline: {LATENCY_BASELINE}." in text
    assert "| stateless baseline | – |" in text
