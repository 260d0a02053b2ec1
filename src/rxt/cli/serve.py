"""``rxt serve MODEL_DIR``: the OpenAI-compatible stateful server under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def _default_data_dir() -> str:
    return os.environ.get("RXT_DATA_DIR", "rxt-data")


@dataclass(frozen=True)
class ServeOptions:
    """What ``rxt serve`` is started with: one field per flag, the flags' defaults."""

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    store: str | None = None  # a SQLite path or URL, or redis://; None: DATA_DIR/state.db
    data_dir: str = field(default_factory=_default_data_dir)
    api_keys: str | None = None  # a file of keys (RXT_API_KEYS is read as well)
    model_name: str | None = None  # None: the model directory's name
    ttl: float | None = None
    keep_versions: int | None = None
    max_batch_size: int = 32
    commit_wait: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 1024
    max_message_chars: int = 32_768
    device: str = "cpu"
    log_level: str = "info"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rxt serve`` flags; each one's dest is a field of :class:`ServeOptions`."""
    default = ServeOptions(model_dir="")  # data_dir: $RXT_DATA_DIR now, as the help says
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory with a tokenizer")
    parser.add_argument("--host", default=default.host, help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=default.port)
    parser.add_argument(
        "--store",
        metavar="URL",
        help="state store: a SQLite file path or sqlite:///path (default DATA_DIR/state.db), "
        "or redis://host:port/db to share conversations between server processes",
    )
    parser.add_argument(
        "--data-dir",
        default=default.data_dir,
        help="where the default SQLite store lives (created if missing; default $RXT_DATA_DIR "
        "or ./rxt-data)",
    )
    parser.add_argument(
        "--api-keys",
        metavar="FILE",
        help="accepted API keys, one per line (or sha256:<hex>); also read from RXT_API_KEYS. "
        "Without any key the server runs in local development mode.",
    )
    parser.add_argument("--model-name", help="the model id clients send (default: the dir name)")
    parser.add_argument("--ttl", type=float, help="drop conversations idle this many seconds")
    parser.add_argument("--keep-versions", type=int, help="keep the newest N states per chat")
    parser.add_argument(
        "--max-batch-size", type=int, default=default.max_batch_size, help="rows decoded together"
    )
    parser.add_argument(
        "--commit-wait",
        type=float,
        default=default.commit_wait,
        help="seconds a turn waits for another process to store the state it continues "
        "(a pending state older than this is treated as lost in a crash)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=default.max_body_bytes)
    parser.add_argument("--max-messages", type=int, default=default.max_messages)
    parser.add_argument("--max-message-chars", type=int, default=default.max_message_chars)
    parser.add_argument("--device", default=default.device, help="cpu (default) or cuda")
    parser.add_argument(
        "--log-level", default=default.log_level, choices=["debug", "info", "warning"]
    )


def build_app(options: ServeOptions) -> FastAPI:
    """The app ``options`` describe; a user error raises ValueError with one line."""
    from rxt.engine.load import load_text_model
    from rxt.serve.app import create_app
    from rxt.serve.auth import KeyRing
    from rxt.serve.settings import Limits, ServerSettings

    keys = KeyRing.load(options.api_keys)
    limits = Limits(
        max_body_bytes=options.max_body_bytes,
        max_messages=options.max_messages,
        max_message_chars=options.max_message_chars,
    )
    settings = ServerSettings(
        model_name=options.model_name or Path(options.model_dir).resolve().name,
        store_url=options.store or str(_data_dir(options.data_dir) / "state.db"),
        ttl_seconds=options.ttl,
        keep_versions=options.keep_versions,
        max_batch_size=options.max_batch_size,
        commit_wait_s=options.commit_wait,
        limits=limits,
    )
    from rxt.serve.store import open_store

    try:  # an unreachable Redis or unwritable path fails here, in one line, not at startup
        open_store(settings.store_url).close()
    except Exception as exc:
        raise ValueError(f"--store {settings.store_url}: {exc}") from exc
    return create_app(load_text_model(options.model_dir, options.device), settings, keys)


def _data_dir(path: str) -> Path:
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--data-dir {path}: {exc.strerror or exc}") from exc
    return directory


def run_server(options: ServeOptions) -> int:
    """Build the app, then serve it under uvicorn until interrupted."""
    import uvicorn

    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = build_app(options)
    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level)
    return 0


def cmd_serve(**options: Any) -> int:
    """``rxt serve``: the parsed flags are exactly the fields of :class:`ServeOptions`."""
    return run_server(ServeOptions(**options))
