"""`rxt chat` end to end, as a user runs it: `python -m rxt chat MODEL_DIR` in a subprocess, its
stdin piped. tests/test_chat.py covers the session logic in-process; this checks the real entry
point, exit codes and the line-oriented output of a piped session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rxt import ReactiveTransformer, RxTConfig
from rxt.data.synthetic import synthetic_corpus
from rxt.engine import Engine
from rxt.tokenizer import RxTTokenizer

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

TIMEOUT = 60  # seconds per subprocess; the engine's own waits below take 10
SEED, MAX_NEW = 0, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ReactiveTransformer(RxTConfig.preset("tiny")).eval()
    model.tokenizer = RxTTokenizer.train(synthetic_corpus(2000), vocab_size=1024)
    path = tmp_path_factory.mktemp("chat_cli") / "model"
    model.save_pretrained(path)
    return path


def rxt(*args: str, stdin: str = "", cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model; do not crowd the test runner
    return subprocess.run(
        [sys.executable, "-m", "rxt", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env=env,
    )


def test_piped_chat_answers_saves_resets_and_loads(model_dir: Path, tmp_path: Path) -> None:
    lines = ["hello", "/save S", "/reset", "/load S", "/quit", "never read"]
    proc = rxt(
        "chat",
        str(model_dir),
        "--seed",
        str(SEED),
        "--max-new-tokens",
        str(MAX_NEW),
        stdin="".join(f"{line}\n" for line in lines),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    # One answer (an untrained model's text may hold anything, newlines included), its memory
    # update, then one status line per command; no "you> " prompt since stdin is a pipe.
    pattern = (
        r"rxt> (?P<answer>.*)\n"
        r"\[memory: updating\.\.\.\]\n"
        r"\[memory: updated in \d+\.\d ms\]\n"
        r"\[memory: saved to S\]\n"
        r"\[memory: reset\]\n"
        r"\[memory: loaded S, 1 turns\]\n"
    )
    match = re.fullmatch(pattern, proc.stdout, re.S)
    assert match, proc.stdout
    state = tmp_path / "S"
    assert state.is_file()
    assert not list(tmp_path.glob(".S.*"))  # the atomic write left no temp file

    # The same turn in-process: the chat streamed its answer, and S holds its memory.
    with Engine(ReactiveTransformer.from_pretrained(model_dir)) as engine:
        conv = engine.conversation(seed=SEED)
        result = conv.ask("hello", max_new_tokens=MAX_NEW)
        conv.wait(timeout=10)
        loaded = engine.conversation(seed=SEED, state=state.read_bytes())
        assert loaded.turns == 1
        torch.testing.assert_close(loaded.stm, conv.stm, atol=1e-6, rtol=0)
    assert match["answer"] == result.text


def test_chat_with_a_missing_model_dir_is_exit_2_and_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    proc = rxt("chat", str(missing), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"rxt chat: error: {missing}")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
