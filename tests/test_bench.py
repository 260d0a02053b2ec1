"""The benchmarks (rxt.bench, `rxt bench latency|throughput`) run and report what they claim.

Everything runs on the ``tiny`` preset with minimal sizes. Timing-dependent claims are made
deterministic: the "update hidden behind the think time" case uses a think time ~50x the update,
the "next turn waits for the update" case slows the update down to 50 ms.
"""

from __future__ import annotations

import faulthandler
import gc
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rxt import ReactiveTransformer
from rxt.bench.common import TurnClock
from rxt.bench.latency import LatencySettings, format_summary, run_latency, summarise
from rxt.bench.throughput import ThroughputSettings, run_throughput
from rxt.cli import main
from rxt.engine import Conversation

pytest.importorskip("transformers")  # the stateless baseline of `bench latency`

WATCHDOG = 180.0  # the whole module; a hang dumps stacks and aborts instead of stalling CI
Q, A = 8, 8  # query and answer tokens
TURNS = 3
THINK = 0.2  # s: ~50x a tiny-model memory update (~3 ms)
KEYS = {"system", "turn", "prompt_tokens", "ttft_s", "reply_s", "memory_update_s"}
PNG = b"\x89PNG\r\n\x1a\n"


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _settings(**changes: object) -> LatencySettings:
    base = dict(
        preset="tiny",
        turns=TURNS,
        repeats=1,
        warmup=1,
        query_tokens=Q,
        answer_tokens=A,
        think_time=THINK,
    )
    return LatencySettings(**{**base, **changes})


@pytest.fixture(scope="module")
def latency() -> dict:
    return run_latency(_settings(), log=quiet)


def _by_system(records: list[dict], system: str) -> list[dict]:
    return [r for r in records if r["system"] == system]


# --------------------------------------------------------------------------- latency records
def test_latency_records_have_the_documented_fields_for_both_systems(latency: dict) -> None:
    records = latency["records"]
    assert all(set(r) >= KEYS for r in records)
    assert {r["system"] for r in records} == {"rxt", "stateless"}
    for system in ("rxt", "stateless"):
        assert [r["turn"] for r in _by_system(records, system)] == list(range(1, TURNS + 1))
    for r in records:
        assert r["ttft_s"] > 0 and r["reply_s"] > 0
        assert r["ttft_s"] <= r["reply_s"]
    for r in _by_system(records, "stateless"):
        assert r["memory_update_s"] is None
    for r in _by_system(records, "rxt"):
        assert r["memory_update_s"] > 0
        assert r["live_ttft_s"] > 0
    assert set(latency) == {"records", "summary", "settings", "environment"}
    assert latency["settings"]["think_time"] == THINK
    json.dumps(latency)  # what the CLI writes must be JSON


def test_rxt_prompt_is_constant_and_stateless_prompt_grows_by_one_interaction(latency) -> None:
    rxt = [r["prompt_tokens"] for r in _by_system(latency["records"], "rxt")]
    stateless = [r["prompt_tokens"] for r in _by_system(latency["records"], "stateless")]
    assert rxt == [Q + 3] * TURNS  # [BOS][Q] query [A]
    assert stateless[0] == Q + 3
    # The stateless history gains the whole interaction each turn: prompt, answer and [EOS].
    growth = Q + 3 + A + 1
    assert [b - a for a, b in itertools.pairwise(stateless)] == [growth] * (TURNS - 1)


def test_a_long_think_time_hides_every_memory_update(latency: dict) -> None:
    rxt = _by_system(latency["records"], "rxt")
    for r in rxt[:-1]:  # turn t's update, measured when turn t + 1 is sent
        assert r["update_wait_s"] == 0.0
        assert r["update_hidden_fraction"] == 1.0
    assert "update_wait_s" not in rxt[-1] and "update_hidden_fraction" not in rxt[-1]
    summary = latency["summary"]["rxt"]
    assert summary["update_hidden_fraction_median"] == 1.0
    assert summary["update_wait_max_s"] == 0.0


def test_summary_is_summarise_of_the_records(latency: dict) -> None:
    summary = latency["summary"]
    assert summary == summarise(latency["records"], A, THINK)
    assert summary["think_time_s"] == THINK
    for system in ("rxt", "stateless"):
        s = summary[system]
        assert s["turns"] == TURNS
        assert s["ttft_growth"] > 0 and s["reply_growth"] > 0
        assert s["decode_tokens_per_s_turn1"] > 0
    assert summary["rxt"]["prompt_tokens_last"] == Q + 3
    assert summary["stateless"]["prompt_tokens_last"] == Q + 3 + (TURNS - 1) * (Q + A + 4)
    assert summary["rxt"]["memory_update_median_s"] > 0
    assert summary["ttft_speedup_last_turn"] > 0
    assert summary["decode_throughput_ratio_turn1"] > 0
    text = format_summary(summary)
    assert text.startswith("rxt ")
    assert "stateless " in text and "memory update" in text and "hidden (median)" in text


def test_summarise_arithmetic_on_fixed_records() -> None:
    def rec(system, turn, ttft, reply, prompt, update=None, **extra):
        return {
            "system": system,
            "turn": turn,
            "ttft_s": ttft,
            "reply_s": reply,
            "prompt_tokens": prompt,
            "memory_update_s": update,
            **extra,
        }

    records = [
        rec("rxt", 1, 0.01, 0.05, 11, 0.004, update_wait_s=0.002, update_hidden_fraction=0.5),
        rec("stateless", 1, 0.02, 0.10, 11),
        rec("rxt", 2, 0.02, 0.06, 11, 0.006),
        rec("stateless", 2, 0.08, 0.20, 31),
    ]
    s = summarise(records, answer_tokens=5, think=0.1)
    assert s["rxt"]["ttft_growth"] == pytest.approx(2.0)
    assert s["rxt"]["reply_growth"] == pytest.approx(1.2)
    assert s["rxt"]["decode_tokens_per_s_turn1"] == pytest.approx(4 / 0.04)
    assert s["stateless"]["decode_tokens_per_s_turn1"] == pytest.approx(4 / 0.08)
    assert s["rxt"]["memory_update_median_s"] == pytest.approx(0.005)
    assert s["rxt"]["update_hidden_fraction_median"] == 0.5
    assert s["rxt"]["update_wait_max_s"] == 0.002
    assert s["stateless"]["prompt_tokens_last"] == 31
    assert s["ttft_speedup_last_turn"] == pytest.approx(4.0)
    assert s["decode_throughput_ratio_turn1"] == pytest.approx(2.0)
    assert "50% hidden" in format_summary(s)
    alone = summarise([records[0]], answer_tokens=5, think=0.1)  # rxt only: no ratios
    assert "stateless" not in alone and "ttft_speedup_last_turn" not in alone


# --------------------------------------------------------------------------- what the clock holds
@pytest.fixture(scope="module")
def clocked() -> tuple[list[tuple[str, int, bool]], int]:
    """A latency run with every clock reading, system call, fork and garbage collection logged
    as ``(event, thread, heap frozen)``; and the calling thread."""
    from transformers import LlamaForCausalLM

    events: list[tuple[str, int, bool]] = []

    def log(event: str) -> None:
        events.append((event, threading.get_ident(), gc.get_freeze_count() > 0))

    def wrap(owner: type, name: str, event: str, when=lambda *a: True) -> None:
        real = getattr(owner, name)

        def logged(self, *args, **kwargs):
            if when(self):
                log(event)
            return real(self, *args, **kwargs)

        patch.setattr(owner, name, logged)

    def collection(phase: str, info: dict) -> None:
        if phase == "start":
            log("gc")

    with pytest.MonkeyPatch.context() as patch:
        wrap(TurnClock, "start", "start")
        wrap(TurnClock, "token", "first", when=lambda clock: clock.first_at is None)
        wrap(Conversation, "send", "send")
        wrap(Conversation, "fork", "fork")
        wrap(LlamaForCausalLM, "generate", "generate")
        gc.callbacks.append(collection)
        try:
            run_latency(_settings(repeats=2), log=quiet)
        finally:
            gc.callbacks.remove(collection)
    return events, threading.get_ident()


def _timed_windows(events: list[tuple[str, int, bool]]) -> list[list[tuple[str, int, bool]]]:
    """The events from each measured clock start to its first token; the first two starts are
    the warm-up (``warmup=1``: one baseline run, then one RxT turn)."""
    starts = [i for i, (event, _, _) in enumerate(events) if event == "start"][2:]
    windows = []
    for i in starts:
        end = next(j for j in range(i, len(events)) if events[j][0] == "first")
        windows.append(events[i : end + 1])
    return windows


def test_both_systems_are_clocked_from_the_call_to_the_first_token_in_the_callers_hands(
    clocked,
) -> None:
    """The same span for RxT (forked runs and live pass) and the baseline: the clock starts
    right before the system is handed the prompt, and stops when the *calling* thread holds the
    first token — not on RxT's engine thread, where the token is made."""
    events, caller = clocked
    windows = _timed_windows(events)
    # two systems x (2 repeats + 1 untimed run) per turn, and RxT once more in the live pass
    assert len(windows) == TURNS * (2 * 3 + 1)
    calls = [w[1][0] for w in windows]
    assert calls.count("send") == TURNS * 4 and calls.count("generate") == TURNS * 3
    for window in windows:
        assert [e for e, _, _ in window] == ["start", window[1][0], "first"]  # nothing between
        assert window[-1][1] == caller


def test_no_fork_and_no_full_collection_is_charged_to_a_first_token(clocked) -> None:
    """Forking the conversation happens before the clock starts, no collection runs in a timed
    window, and every collection while measuring scans only what was made since the heap was
    frozen: a full collection just before a run slowed its first token (docs/benchmarks.md)."""
    events, _ = clocked
    windows = _timed_windows(events)
    for window in windows:
        assert "fork" not in {e for e, _, _ in window} and "gc" not in {e for e, _, _ in window}
        assert window[0][2], "the heap is frozen while measuring"
    first = events.index(windows[0][0])
    last = max(i for i, e in enumerate(events) if e[0] == "first")
    collections = [frozen for event, _, frozen in events[first:last] if event == "gc"]
    assert collections and all(collections)
    assert "fork" in {e for e, _, _ in events[first:last]}
    assert gc.get_freeze_count() == 0 and gc.isenabled()  # the process is left as it was


def test_every_first_token_reported_followed_a_turn_of_the_same_system(monkeypatch) -> None:
    """A user's turn follows that system's previous turn: a timed run right after the other
    system's inherits its state (its weights in the caches, its idle threads) and was slower.
    Each clock here reads 1 ms after a turn of the same system and 1 s after the other's."""
    from transformers import LlamaForCausalLM

    last: list[str] = []

    def after(owner: type, name: str, system: str) -> None:
        real = getattr(owner, name)

        def call(self, *args, **kwargs):
            TurnClock.same = not last or last[-1] == system  # read by the next clock
            last.append(system)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, call)

    after(Conversation, "send", "rxt")
    after(LlamaForCausalLM, "generate", "stateless")
    seconds = property(lambda self: 1e-3 if TurnClock.same else 1.0)
    monkeypatch.setattr(TurnClock, "same", True, raising=False)
    monkeypatch.setattr(TurnClock, "ttft_s", seconds)
    monkeypatch.setattr(TurnClock, "reply_s", property(lambda self: 2 * self.ttft_s))
    records = run_latency(_settings(repeats=2), log=quiet)["records"]
    assert {r["system"] for r in records} == {"rxt", "stateless"}
    assert all(r["ttft_s"] == 1e-3 for r in records)
    assert all(r["live_ttft_s"] == 1e-3 for r in _by_system(records, "rxt"))


def test_turn_clock_refuses_a_turn_it_did_not_see() -> None:
    clock = TurnClock()
    with pytest.raises(RuntimeError, match="not started"):
        _ = clock.ttft_s
    clock.start()
    with pytest.raises(RuntimeError, match="no token"):
        _ = clock.reply_s
    clock.token()
    clock.token()
    assert clock.tokens == 2 and 0 <= clock.ttft_s <= clock.reply_s


# --------------------------------------------------------------------------- live pass, rxt only
def test_without_think_time_the_next_turn_waits_for_a_slow_update(monkeypatch) -> None:
    update = ReactiveTransformer.update_memory

    def slow_update(self, *args, **kwargs):
        time.sleep(0.05)  # the next query is sent at once: it must wait for this update
        return update(self, *args, **kwargs)

    monkeypatch.setattr(ReactiveTransformer, "update_memory", slow_update)
    result = run_latency(_settings(think_time=0.0, baseline=False), log=quiet)
    records = result["records"]
    assert {r["system"] for r in records} == {"rxt"}  # baseline=False: RxT only
    assert [r["turn"] for r in records] == list(range(1, TURNS + 1))
    assert all(r["memory_update_s"] >= 0.05 for r in records)
    waits = [r["update_wait_s"] for r in records[:-1]]
    assert max(waits) > 0.01
    assert min(r["update_hidden_fraction"] for r in records[:-1]) < 1.0
    assert "stateless" not in result["summary"]
    assert result["summary"]["rxt"]["update_wait_max_s"] == max(waits)
    assert "stateless" not in format_summary(result["summary"])


# --------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"turns": 0}, "--turns"),
        ({"query_tokens": 0}, "--query-tokens"),
        ({"answer_tokens": -1}, "--answer-tokens"),
        ({"repeats": 0}, "--repeats"),
        ({"warmup": -1}, "--warmup"),
        ({"think_time": -0.1}, "--think-time"),
    ],
)
def test_bad_latency_settings_name_the_option(changes: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        _settings(**changes)


def test_latency_turn_longer_than_max_seq_len_is_refused() -> None:
    with pytest.raises(ValueError, match="max_seq_len=128"):  # tiny: 100 + 3 + 40 > 128
        run_latency(_settings(query_tokens=100, answer_tokens=40), log=quiet)


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"concurrency": (1, 0)}, "--concurrency"),
        ({"concurrency": ()}, "--concurrency"),
        ({"turns": 0}, "--turns"),
        ({"answer_tokens": 0}, "--answer-tokens"),
    ],
)
def test_bad_throughput_settings_name_the_option(changes: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        ThroughputSettings(preset="tiny", **changes)


def test_throughput_turn_longer_than_max_seq_len_is_refused() -> None:
    settings = ThroughputSettings(preset="tiny", query_tokens=100, answer_tokens=40)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        run_throughput(settings, log=quiet)


def test_latency_baseline_holds_ten_turns() -> None:
    settings = _settings(turns=10, warmup=0, query_tokens=4, answer_tokens=2, think_time=0.0)
    records = run_latency(settings, log=quiet)["records"]
    assert len(_by_system(records, "stateless")) == 10


# --------------------------------------------------------------------------- throughput
def test_throughput_reports_one_record_per_concurrency() -> None:
    settings = ThroughputSettings(
        preset="tiny", concurrency=(1, 2), turns=1, repeats=1, answer_tokens=A, query_tokens=Q
    )
    logged: list[str] = []
    result = run_throughput(settings, log=logged.append)
    records = result["records"]
    assert [r["concurrency"] for r in records] == [1, 2]
    for r in records:
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["wall_s"] > 0
        # tokens/s is every answer token over the wall time of the run
        assert r["tokens_per_s"] * r["wall_s"] == pytest.approx(r["concurrency"] * A)
    assert result["summary"]["speedup_vs_first"][1] == 1.0
    assert set(result["summary"]["speedup_vs_first"]) == {1, 2}
    assert result["settings"]["concurrency"] == [1, 2]
    assert len(logged) == 2
    json.dumps(result)


# --------------------------------------------------------------------------- plot
def test_plot_latency_writes_a_png(latency: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from rxt.bench.plot import plot_latency

    path = tmp_path / "sub" / "x.png"
    plot_latency(latency["records"], path, title="tiny")
    assert path.read_bytes()[:8] == PNG
    rxt_only = tmp_path / "rxt.png"
    plot_latency(_by_system(latency["records"], "rxt"), rxt_only)
    assert rxt_only.read_bytes()[:8] == PNG


# --------------------------------------------------------------------------- CLI
def test_cli_bench_latency_writes_records_summary_and_plot(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    argv = ["bench", "latency", "--preset", "tiny", "--turns", "2", "--repeats", "1"]
    argv += ["--warmup", "0", "--query-tokens", str(Q), "--answer-tokens", str(A)]
    assert main([*argv, "--json", str(out), "--plot", str(png)]) == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list) and len(records) == 4
    assert all(set(r) >= KEYS for r in records)
    summary = json.loads((tmp_path / "lat.summary.json").read_text())
    assert set(summary) == {"summary", "settings", "environment"}
    assert summary["settings"]["turns"] == 2 and summary["settings"]["baseline"] is True
    assert png.read_bytes()[:8] == PNG
    stdout = capsys.readouterr().out
    assert f"records: {out}" in stdout and f"plot: {png}" in stdout


def test_cli_bench_throughput_writes_records_and_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tp.json"
    argv = ["bench", "throughput", "--preset", "tiny", "--concurrency", "1", "2"]
    argv += ["--turns", "1", "--repeats", "1", "--query-tokens", str(Q)]
    assert main([*argv, "--answer-tokens", str(A), "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["concurrency"] for r in records] == [1, 2]
    assert all(r["tokens_per_s"] > 0 for r in records)
    summary = json.loads((tmp_path / "tp.summary.json").read_text())
    assert set(summary["summary"]["speedup_vs_first"]) == {"1", "2"}  # JSON keys are strings
    assert "tokens/s relative to 1 conversation(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "latency", "--preset", "tiny", "--turns", "0"], "--turns must be > 0"),
        (["bench", "throughput", "--preset", "tiny", "--concurrency", "0"], "--concurrency"),
        (["bench", "latency", "--preset", "tiny", "--threads", "0"], "--threads"),
    ],
)
def test_cli_bench_bad_value_is_exit_2_and_one_line(argv, message, capsys) -> None:
    threads = torch.get_num_threads()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rxt bench: error: ") and captured.err.count("\n") == 1
    assert message in captured.err and "Traceback" not in captured.err
    assert torch.get_num_threads() == threads
