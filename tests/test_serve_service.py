"""What one served turn costs in hashing, and that skipping a hash gives up no check.

A stored state is verified by the store (sha256 of the whole blob, on every read) and carries
its own checksum of the tensor bytes (:mod:`rxt.engine.state`). The service loads what the
store has just verified without recomputing the inner checksum, and starts a new conversation
from the STM_0 tensor itself instead of round-tripping it through bytes. These tests count
the hashes of a served turn on both backends (a real SQLite file, a real ``redis-server``),
check that the answers are still the engine's from the same memory, and that a damaged blob
is still refused by the store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

import rxt.serve.store as store_module
from redis_support import redis_server
from rxt import ReactiveTransformer
from rxt.engine import Engine
from rxt.engine import state as state_module
from rxt.engine.state import stm_to_bytes
from rxt.serve.auth import DEV_OWNER
from rxt.serve.settings import ServerSettings
from serve_support import CONVERSATION_HEADER, MODEL_NAME, LiveServer, small_model
from state_support import CountingHashlib, flip_stored_byte

OWNER = DEV_OWNER
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def model() -> ReactiveTransformer:
    return small_model()


@pytest.fixture(scope="module")
def engine(model: ReactiveTransformer) -> Iterator[Engine]:
    with Engine(model) as eng:
        yield eng


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request, model, tmp_path_factory) -> Iterator[LiveServer]:
    if request.param == "redis":
        with redis_server(tmp_path_factory.mktemp("redis")) as url:
            settings = ServerSettings(model_name=MODEL_NAME, store_url=url)
            with LiveServer(model, settings) as live:
                yield live
    else:
        path = tmp_path_factory.mktemp("serve") / "state.db"
        settings = ServerSettings(model_name=MODEL_NAME, store_url=str(path))
        with LiveServer(model, settings) as live:
            yield live


@pytest.fixture
def hashes(monkeypatch, server, engine) -> dict[str, CountingHashlib]:
    """Every sha256 the STM format and the store compute, per module, from now on."""
    assert server.service.engine.fingerprint and engine.fingerprint  # computed (and cached)
    counters = {"state": CountingHashlib(), "store": CountingHashlib()}
    monkeypatch.setattr(state_module, "hashlib", counters["state"])
    monkeypatch.setattr(store_module, "hashlib", counters["store"])
    return counters


def chat(server: LiveServer, query: str, conversation_id: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": query}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)


def wait_version(server: LiveServer, cid: str, version: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = server.store.get_conversation(OWNER, cid)
        if info is not None and info.latest_version >= version:
            return
        time.sleep(0.01)
    raise AssertionError(f"{cid} never reached version {version}")


def reply(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_each_read_and_write_of_a_served_turn_hashes_the_blob_once(server, engine, hashes):
    tensor_bytes = math.prod(server.app.state.model.config.stm_shape) * 4  # float32
    state, store = hashes["state"].sizes, hashes["store"].sizes

    first = chat(server, "My cat is called Felix.")
    cid = first.headers[CONVERSATION_HEADER]
    wait_version(server, cid, 1)
    after_first = (state.copy(), store.copy())
    blob_bytes = len(server.store.get_version(OWNER, cid, 1).state)
    # A new conversation starts from the STM_0 tensor: no bytes, no hash. Its write hashes
    # the tensor for the blob's checksum and the blob for the store, once each.
    assert after_first == ([tensor_bytes], [blob_bytes])
    state.clear()
    store.clear()

    second = chat(server, "What is my cat called?", conversation_id=cid)
    wait_version(server, cid, 2)
    # The read: the store's sha256 of the blob, and no second hash of its tensor bytes.
    # The write: as above.
    assert state == [tensor_bytes]
    assert store == [blob_bytes, blob_bytes]

    # The answers are the engine's from the same STM_0, loaded the old way (through bytes).
    seed = server.store.get_conversation(OWNER, cid).metadata["stm_seed"]
    stm0 = engine.model.initial_stm(1, generator=torch.Generator().manual_seed(seed))
    direct = engine.conversation(state=stm_to_bytes(stm0, fingerprint=engine.fingerprint))
    queries = ["My cat is called Felix.", "What is my cat called?"]
    assert [direct.ask(q, max_new_tokens=MAX_TOKENS).text for q in queries] == [
        reply(first),
        reply(second),
    ]
    assert server.store.get_version(OWNER, cid, 2).state  # stored, readable


def test_a_damaged_stored_state_is_still_refused(server, hashes):
    first = chat(server, "Remember the number seven.")
    cid = first.headers[CONVERSATION_HEADER]
    wait_version(server, cid, 1)
    size = len(server.store.get_version(OWNER, cid, 1).state)
    # One bit of the tensor bytes: what the blob's own checksum, no longer recomputed on
    # this path, would have caught. The store's sha256 of the whole blob catches it first.
    flip_stored_byte(server.store, OWNER, cid, 1, size - 5)
    refused = chat(server, "Which number?", conversation_id=cid)
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "stored state is damaged" in message and "version 1" in message
    assert server.store.get_conversation(OWNER, cid).latest_version == 1  # nothing written
