"""A real ``redis-server`` for the tests, on a free loopback port in a scratch directory, and
:class:`SlowWrites`, a proxy in front of it that makes chosen scripts (the commits) slow.

Tests that need Redis skip when the binary (or the ``redis`` client package) is missing,
unless ``RXT_REQUIRE_REDIS=1`` (CI), where a missing ``redis-server`` fails them instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """The ``redis-server`` path; skips the test if there is none (fails under
    ``RXT_REQUIRE_REDIS=1``), or if the ``redis`` client package is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("RXT_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server not found and RXT_REQUIRE_REDIS=1")
        pytest.skip("redis-server not installed")
    pytest.importorskip("redis")
    return binary


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Start a throwaway ``redis-server`` (no persistence) and yield its ``redis://`` URL
    (database 0); it is terminated on exit."""
    binary = redis_binary()
    import redis

    port = _free_port()
    args = [binary, "--save", "", "--appendonly", "no", "--port", str(port)]
    args += ["--bind", "127.0.0.1", "--dir", str(workdir)]
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"redis-server exited: {proc.stderr.read().decode()[-500:]}")
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not answer within 5 s")
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


class SlowWrites:
    """A TCP proxy in front of Redis that holds back every ``EVALSHA`` of the given scripts by
    ``delay_s`` before forwarding it: a store whose commits are slow (a distant Redis, a
    loaded primary), so that whatever a client does right after an answer happens before that
    answer's state is written. Other commands pass through at once, and each connection's
    commands stay in order. ``forwarded`` records ``(time.time(), args)`` of every delayed
    command when it was sent on to Redis (``args`` as bytes: sha, numkeys, keys, argv)."""

    def __init__(self, redis_url: str, scripts: list[str], delay_s: float) -> None:
        host_port = redis_url.split("://", 1)[1].split("/", 1)
        self.upstream = tuple(host_port[0].rsplit(":", 1))
        self.db = host_port[1] if len(host_port) > 1 else "0"
        self.shas = {hashlib.sha1(s.encode()).hexdigest().encode() for s in scripts}
        self.delay_s = delay_s
        self.forwarded: list[tuple[float, list[bytes]]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/{self.db}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._commands, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._copy, args=(upstream, client), daemon=True).start()

    def _commands(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client → Redis, one RESP command (an array of bulk strings) at a time."""
        reader = client.makefile("rb")
        with contextlib.suppress(OSError, ValueError):
            while True:
                header = reader.readline()
                if not header:
                    break
                raw, args = [header], []
                for _ in range(int(header[1:])):
                    size = reader.readline()
                    data = reader.read(int(size[1:]) + 2)
                    raw += [size, data]
                    args.append(data[:-2])
                if len(args) > 1 and args[0].upper() == b"EVALSHA" and args[1] in self.shas:
                    time.sleep(self.delay_s)
                    self.forwarded.append((time.time(), args[1:]))
                upstream.sendall(b"".join(raw))
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._listener.close()
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
                s.close()

    def __enter__(self) -> SlowWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
