"""``rxt serve MODEL_DIR``: the OpenAI-compatible stateful server under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model directory with a tokenizer")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--store",
        metavar="URL",
        help="state store: a SQLite file path or sqlite:///path (default DATA_DIR/state.db), "
        "or redis://host:port/db to share conversations between server processes",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("RXT_DATA_DIR", "rxt-data"),
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
    parser.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together")
    parser.add_argument(
        "--commit-wait",
        type=float,
        default=10.0,
        help="seconds a turn waits for another process to store the state it continues "
        "(a pending state older than this is treated as lost in a crash)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--max-messages", type=int, default=1024)
    parser.add_argument("--max-message-chars", type=int, default=32_768)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def build_app(args: argparse.Namespace):
    """The app for parsed ``args``; a user error raises ValueError with one line."""
    from rxt.chat import load_text_model
    from rxt.serve.app import create_app
    from rxt.serve.auth import KeyRing
    from rxt.serve.settings import Limits, ServerSettings

    keys = KeyRing.load(args.api_keys)
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_message_chars=args.max_message_chars,
    )
    settings = ServerSettings(
        model_name=args.model_name or Path(args.model_dir).resolve().name,
        store_url=args.store or str(_data_dir(args.data_dir) / "state.db"),
        ttl_seconds=args.ttl,
        keep_versions=args.keep_versions,
        max_batch_size=args.max_batch_size,
        commit_wait_s=args.commit_wait,
        limits=limits,
    )
    from rxt.serve.store import open_store

    try:  # an unreachable Redis or unwritable path fails here, in one line, not at startup
        open_store(settings.store_url).close()
    except Exception as exc:
        raise ValueError(f"--store {settings.store_url}: {exc}") from exc
    return create_app(load_text_model(args.model_dir, args.device), settings, keys)


def _data_dir(path: str) -> Path:
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--data-dir {path}: {exc.strerror or exc}") from exc
    return directory


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
