"""`rxt chat` driven through strings: streamed answers, memory status, /save /load, errors."""

from __future__ import annotations

import argparse
import io
import re

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.cli.chat import add_arguments, run_chat
from rxt.data.synthetic import synthetic_corpus
from rxt.engine import Engine
from rxt.tokenizer import RxTTokenizer

SEED = 3
MAX_NEW = 12
Q1, Q2 = "My name is Ada and I live in Oslo.", "Where does Ada live?"
UPDATED = r"\[memory: updated in \d+\.\d ms\]"


def _model(tokenizer: RxTTokenizer, seed: int) -> ReactiveTransformer:
    torch.manual_seed(seed)
    model = ReactiveTransformer(RxTConfig.preset("tiny")).eval()
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def tokenizer() -> RxTTokenizer:
    return RxTTokenizer.train(synthetic_corpus(2000), vocab_size=1024)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("chat") / "model"
    _model(tokenizer, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def foreign_state(tmp_path_factory, tokenizer):
    """A valid state file from another model: same config and tokenizer, other weights."""
    with Engine(_model(tokenizer, seed=1)) as engine:
        conv = engine.conversation(seed=SEED)
        conv.ask(Q1, max_new_tokens=4)
        path = tmp_path_factory.mktemp("foreign") / "state.stm"
        path.write_bytes(conv.export_state())
    return path


def _engine_answers(model_dir, queries, system=None) -> list[str]:
    """The same turns through the engine directly: what the chat must print."""
    with Engine(ReactiveTransformer.from_pretrained(model_dir)) as engine:
        conv = engine.conversation(system, seed=SEED)
        answers = []
        for query in queries:
            stream = conv.send(query, max_new_tokens=MAX_NEW)
            streamed = "".join(piece.text for piece in stream)
            assert streamed == stream.result().text
            answers.append(streamed)
    return answers


def chat(model_dir, lines, *options, stdout=None):
    """Run a chat on ``lines``; ``(exit code, stdout, stderr)``."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [str(model_dir), "--seed", str(SEED), "--max-new-tokens", str(MAX_NEW), *options]
    out, err = stdout or io.StringIO(), io.StringIO()
    stdin = io.StringIO("".join(line + "\n" for line in lines))
    code = run_chat(**vars(parser.parse_args(argv)), stdin=stdin, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def answers_in(out: str) -> list[str]:
    """Answers whose memory update succeeded. An untrained model may emit a newline, so an
    answer runs up to its status lines."""
    answer = r"((?:(?!\n\[memory: ).)*)"
    return re.findall(rf"^rxt> {answer}\n\[memory: updating\.\.\.\]\n{UPDATED}\n", out, re.M | re.S)


@pytest.mark.parametrize("system", [None, "You are a terse assistant."])
def test_two_turns_stream_the_engines_answers_then_memory_status(model_dir, system):
    options = ["--system", system] if system else []
    code, out, err = chat(model_dir, [Q1, Q2], *options)
    assert (code, err) == (0, "")
    assert answers_in(out) == _engine_answers(model_dir, [Q1, Q2], system)
    assert "you> " not in out  # no prompt when stdin is not a terminal
    if system:  # turn 0, the system prompt, is an update of its own, before any answer
        assert re.match(rf"\[memory: updating\.\.\.\]\n{UPDATED}\nrxt> ", out)
    else:
        assert out.startswith("rxt> ")


def test_save_reset_load_restores_the_memory(model_dir, tmp_path):
    state = tmp_path / "conv.stm"
    lines = [Q1, f"/save {state}", Q2, "/reset", Q1, f"/load {state}", Q2]
    code, out, err = chat(model_dir, lines)
    assert (code, err) == (0, "")
    a1, a2, after_reset, after_load = answers_in(out)
    assert [a1, a2] == _engine_answers(model_dir, [Q1, Q2])
    assert after_reset == a1  # back to the seeded STM_0
    assert after_load == a2  # the memory as it was saved
    assert f"[memory: saved to {state}]" in out
    assert f"[memory: loaded {state}, 1 turns]" in out
    assert "[memory: reset]" in out
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_bad_loads_and_saves_are_one_line_errors_and_keep_the_memory(
    model_dir, tmp_path, foreign_state
):
    garbage = tmp_path / "garbage.stm"
    garbage.write_bytes(b"\x00\x01 not a state at all" * 10)
    empty = tmp_path / "empty.stm"
    empty.write_bytes(b"")
    huge_header = tmp_path / "huge.stm"
    huge_header.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    bad = [tmp_path / "missing.stm", garbage, empty, huge_header, foreign_state, tmp_path]
    lines = [Q1, *(f"/load {path}" for path in bad), f"/save {tmp_path}/no/such/dir", Q2]
    code, out, err = chat(model_dir, lines)
    assert code == 0
    errors = err.splitlines()
    assert len(errors) == len(bad) + 1
    assert all(line.startswith("error: cannot load ") for line in errors[:-1])
    assert "another model" in errors[len(bad) - 2]
    assert errors[-1].startswith("error: cannot save ")
    assert "Traceback" not in out + err
    assert answers_in(out) == _engine_answers(model_dir, [Q1, Q2])  # memory untouched


def test_commands_blank_lines_quit_and_eof(model_dir):
    code, out, err = chat(model_dir, ["", "   ", "/unknown", "/save", "/help", "/quit", Q1])
    assert code == 0
    assert err.splitlines() == [
        "error: unknown command /unknown (/help lists them)",
        "error: usage: /save FILE",
    ]
    assert "/reset" in out and "/load FILE" in out  # the help text
    assert "rxt> " not in out  # nothing after /quit is read
    assert chat(model_dir, []) == (0, "", "")  # EOF at once


def test_a_query_too_long_for_a_turn_is_refused_and_answers_are_capped(model_dir):
    code, out, err = chat(model_dir, [" ".join(["Oslo"] * 200), Q1], "--max-new-tokens", "500")
    assert code == 0
    assert err.startswith("error: query too long") and err.count("\n") == 1
    assert len(answers_in(out)) == 1  # max_new_tokens=500 > max_seq_len: capped, not refused


def test_ctrl_c_while_streaming_cancels_that_answer_only(model_dir):
    class InterruptFirstPiece(io.StringIO):
        armed = True

        def write(self, text: str) -> int:
            if self.armed and text and self.getvalue().endswith("rxt> "):
                self.armed = False
                raise KeyboardInterrupt
            return super().write(text)

    code, out, err = chat(model_dir, [Q1, Q1], stdout=InterruptFirstPiece())
    assert (code, err) == (0, "")
    # The cancelled turn is still committed to memory (with the answer as far as it went).
    assert re.match(rf"rxt>  \[cancelled\]\n\[memory: updating\.\.\.\]\n{UPDATED}\n", out)
    assert len(answers_in(out)) == 2


def test_a_failed_memory_update_is_reported_and_reset_recovers(model_dir, monkeypatch):
    update = ReactiveTransformer.update_memory
    calls = []

    def fail_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(ReactiveTransformer, "update_memory", fail_once)
    code, out, err = chat(model_dir, [Q1, Q2, "/reset", Q1])
    assert code == 0
    assert "[memory: update failed: injected failure]" in out
    assert err.startswith("error: the last memory update failed")
    assert "[memory: reset]" in out
    # Q2 was refused; after /reset, Q1 is answered from a fresh memory, as the first time.
    assert re.findall(r"^rxt> ", out, re.M) == ["rxt> "] * 2
    assert answers_in(out) == _engine_answers(model_dir, [Q1])


@pytest.mark.parametrize("problem", ["missing", "not a model", "no tokenizer"])
def test_an_unusable_model_dir_is_exit_code_2_and_one_line(tmp_path, tokenizer, problem):
    path = tmp_path / "model"
    if problem == "not a model":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif problem == "no tokenizer":
        _model(tokenizer, seed=0).save_pretrained(path)
        (path / "tokenizer.json").unlink()
    code, out, err = chat(path, [Q1])
    assert (code, out) == (2, "")
    assert err.startswith(f"rxt chat: error: {path}") and err.count("\n") == 1
    if problem == "no tokenizer":
        assert "tokenizer.json" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--threads", "0"], "--threads"),
        (["--device", "nonsense"], "--device"),
        (["--system", "Oslo " * 300], "system prompt is"),
    ],
)
def test_bad_options_are_exit_code_2(model_dir, options, message):
    code, out, err = chat(model_dir, [Q1], *options)
    assert (code, out) == (2, "")
    assert err.startswith("rxt chat: error: ") and message in err
