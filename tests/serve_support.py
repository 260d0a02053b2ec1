"""Shared pieces of the server tests: a small saved model, live servers on loopback.

``LiveServer`` runs the app under uvicorn in a thread of the test process (so a test can read
the same store the server writes); ``ServerProcess`` runs ``python -m rxt serve`` as a child
process (for kill -9 and several servers sharing Redis).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
import uvicorn

from rxt import ReactiveTransformer, RxTConfig
from rxt.data.synthetic import synthetic_corpus
from rxt.serve.app import create_app
from rxt.serve.auth import KeyRing
from rxt.serve.settings import ServerSettings
from rxt.tokenizer import SPECIAL_TOKENS, RxTTokenizer

MODEL_NAME = "rxt-test"
CONVERSATION_HEADER = "X-RxT-Conversation-Id"


@functools.cache
def _tokenizer() -> RxTTokenizer:
    return RxTTokenizer.train(synthetic_corpus(2000), vocab_size=1024)


def small_model(seed: int = 0) -> ReactiveTransformer:
    """The ``tiny`` preset with random weights and a 1024-token tokenizer, in eval mode.

    Its answers are gibberish but deterministic under greedy decoding, which is all the
    equivalence tests need (random weights rarely pick EOS, so answers mostly run to
    ``max_tokens``)."""
    tok = _tokenizer()
    torch.manual_seed(seed)
    model = ReactiveTransformer(RxTConfig.preset("tiny")).eval()
    model.tokenizer = tok
    return model


def never_silent(model: ReactiveTransformer) -> ReactiveTransformer:
    """Zero the LM-head rows of every token that shows no text by itself: the special tokens
    (EOS would end an answer before its first word), byte-level fragments of a UTF-8
    character (a random model strings them into answers that decode to nothing), control
    characters and blanks. Their logits
    are then 0 while a random model's hundreds of others are not all negative, so a greedy
    answer always shows text, token by token — what a test that watches text stream needs.
    (The LM head is untied in ``tiny``; the embeddings stay as they are.)"""
    tok = model.tokenizer
    silent = [
        i
        for i in range(model.config.vocab_size)
        if i < len(SPECIAL_TOKENS) or not _visible(tok.decode([i]))
    ]
    assert model.lm_head.weight is not model.embed.weight
    with torch.no_grad():
        model.lm_head.weight[silent] = 0.0
    return model


def _visible(text: str) -> bool:
    return bool(text.strip()) and text.isprintable() and "\ufffd" not in text


def save_small_model(directory: Path, seed: int = 0) -> Path:
    small_model(seed).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float = 60.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not healthy after {timeout} s")


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event in a response body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, "\n".join(data)))
    return events


class LiveServer:
    """``create_app(model, settings, keys)`` under uvicorn on a free loopback port, in a thread."""

    def __init__(
        self,
        model: ReactiveTransformer,
        settings: ServerSettings,
        keys: KeyRing | None = None,
    ) -> None:
        self.app = create_app(model, settings, keys)
        # The socket is bound here and handed to uvicorn, so no other test can take the port
        # between choosing it and listening on it.
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def service(self):
        return self.app.state.service

    @property
    def store(self):
        return self.app.state.service.store

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_healthy(self.base_url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.socket.close()


class ServerProcess:
    """``python -m rxt serve MODEL_DIR`` on a free loopback port, as a child process."""

    def __init__(self, model_dir: Path, store: str, *extra: str, log: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "rxt.cli", "serve", str(model_dir), "--port", str(self.port)]
        args += ["--store", store, "--model-name", MODEL_NAME, "--log-level", "warning", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        self._log = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=self._log)

    def __enter__(self) -> ServerProcess:
        try:
            wait_healthy(self.base_url, process=self.process)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, whatever was in flight is lost."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@contextlib.contextmanager
def running(server) -> Iterator:
    with server:
        yield server
