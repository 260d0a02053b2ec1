"""The memory endpoints on a live server: the state summary, state files, and the page's files.

``GET /v1/conversations/{id}/memory`` is checked against the stored states themselves (every
norm recomputed from the versions in the store), its JSON against a strict schema, its
stateless comparison against the full-history baseline's own prompts, and its timing against
an update made slow on purpose. Another key's conversation is a 404, a malformed id a 400
naming it, never a 500.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import httpx
import pydantic
import pytest
import torch

from rxt.baselines.data import reply_prompts
from rxt.data.dialogue import Dialogue, Turn
from rxt.engine.state import stm_from_bytes, stm_to_bytes
from rxt.serve.auth import KeyRing, digest
from rxt.serve.page import STATIC
from rxt.serve.settings import ServerSettings
from serve_support import CONVERSATION_HEADER, MODEL_NAME, LiveServer, never_silent, small_model

ALICE, BOB = "key-alice-123", "key-bob-4567"
ROOT = Path(__file__).resolve().parents[1]


class UpdateTimes(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    waited_ms: float
    answer_ms: float
    started_ms: float
    finished_ms: float


class PromptTokens(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    turn: int
    rxt: int | None
    stateless: int | None


class MemorySummary(pydantic.BaseModel):
    """The documented body of ``GET /v1/conversations/{id}/memory`` — nothing more."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    object: Literal["conversation.memory"]
    conversation_id: str
    version: int
    latest_version: int
    turn: int
    response_id: str | None
    model: str
    fingerprint: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")
    shape: list[int] = pydantic.Field(min_length=3, max_length=3)
    slot_norms: list[list[float]]
    change_norms: list[list[float]] | None
    memory_update: UpdateTimes | None
    prompt_tokens: list[PromptTokens] | None = None


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("memory") / "state.db"
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(store))
    keys = KeyRing([digest(ALICE), digest(BOB)])
    with LiveServer(never_silent(small_model()), settings, keys) as live:
        yield live


def _client(server: LiveServer, key: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def alice(server) -> Iterator[httpx.Client]:
    yield from _client(server, ALICE)


@pytest.fixture(scope="module")
def bob(server) -> Iterator[httpx.Client]:
    yield from _client(server, BOB)


def owner(server: LiveServer, key: str = ALICE) -> str:
    return server.app.state.keys.owner(f"Bearer {key}")


def respond(client: httpx.Client, text: str, **extra) -> tuple[dict, str]:
    """A greedy Responses turn: (the response object, its conversation id)."""
    body = {"input": text, "temperature": 0, "max_output_tokens": 6, **extra}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    return response.json(), response.headers[CONVERSATION_HEADER]


def text(response: dict) -> str:
    return response["output"][0]["content"][0]["text"]


def committed(server: LiveServer, cid: str, version: int, key: str = ALICE) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = server.store.get_conversation(owner(server, key), cid)
        if info is not None and info.latest_version >= version:
            return
        time.sleep(0.01)
    raise AssertionError(f"{cid} never reached version {version}")


def summary(client: httpx.Client, cid: str, **params) -> MemorySummary:
    response = client.get(f"/v1/conversations/{cid}/memory", params=params)
    assert response.status_code == 200, response.text
    return MemorySummary.model_validate_json(response.text)


def stored_stm(server: LiveServer, cid: str, version: int) -> torch.Tensor:
    """(L, S, d) of a stored version, or of version 0 as the server draws it from the seed."""
    model = server.app.state.model
    if version == 0:
        seed = server.store.get_conversation(owner(server), cid).metadata["stm_seed"]
        return model.initial_stm(1, generator=torch.Generator().manual_seed(seed))[0]
    found = server.store.get_version(owner(server), cid, version)
    fingerprint = server.service.engine.fingerprint
    return stm_from_bytes(found.state, fingerprint=fingerprint, shape=model.config.stm_shape)[0][0]


def close(got: list[list[float]], expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got), expected.float(), atol=1e-4, rtol=1e-4)


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


# ----------------------------------------------------------------------------- the summary
def test_summary_is_the_stored_memory_and_its_change(server, alice):
    r1, cid = respond(alice, "My cat is called Felix.")
    r2, same = respond(alice, "I live in Paris.", previous_response_id=r1["id"])
    assert same == cid
    committed(server, cid, 2)
    latest = summary(alice, cid)
    config = server.app.state.model.config
    assert (latest.version, latest.latest_version, latest.turn) == (2, 2, 2)
    assert latest.response_id == r2["id"] and latest.model == MODEL_NAME
    assert latest.fingerprint == server.service.engine.fingerprint
    assert tuple(latest.shape) == config.stm_shape
    stm = {v: stored_stm(server, cid, v) for v in (0, 1, 2)}
    close(latest.slot_norms, stm[2].norm(dim=-1))
    close(latest.change_norms, (stm[2] - stm[1]).norm(dim=-1))
    first = summary(alice, cid, version=1)
    assert first.response_id == r1["id"]
    close(first.change_norms, (stm[1] - stm[0]).norm(dim=-1))  # against STM_0
    start = summary(alice, cid, version=0)
    assert (start.turn, start.response_id, start.change_norms, start.memory_update) == (
        *(0, None, None, None),
    )
    close(start.slot_norms, stm[0].norm(dim=-1))
    for times in (first.memory_update, latest.memory_update):
        # The update is queued at the answer's last token, then runs.
        assert 0 < times.answer_ms <= times.started_ms <= times.finished_ms
        assert times.waited_ms >= 0


def test_stateless_counts_are_the_full_history_baselines_prompts(server, alice):
    queries = ["Hello there.", "My dog is Rex.", "What is my dog called?"]
    responses, cid = [], None
    for query in queries:
        previous = {"previous_response_id": responses[-1]["id"]} if responses else {}
        r, cid = respond(alice, query, instructions="Be brief.", **previous)
        responses.append(r)
    committed(server, cid, 3)
    rows = summary(alice, cid, stateless="true").prompt_tokens
    tokenizer = server.service.engine.tokenizer
    turns = tuple(Turn(q, text(r)) for q, r in zip(queries, responses, strict=True))
    full = reply_prompts(tokenizer, Dialogue("d", turns, system="Be brief."), "full")
    assert [row.turn for row in rows] == [1, 2, 3]
    assert [row.stateless for row in rows] == [len(p) for p in full]
    assert [row.rxt for row in rows] == [r["usage"]["input_tokens"] for r in responses]
    assert [row.rxt for row in rows] == [len(tokenizer.encode_query(q)) for q in queries]
    assert rows[2].stateless > rows[2].rxt  # the history, re-read
    # An older version compares the turns up to it; without the flag there is no list.
    assert len(summary(alice, cid, version=2, stateless="true").prompt_tokens) == 2
    assert summary(alice, cid).prompt_tokens is None


def test_a_forks_memory_starts_from_its_parents_state(server, alice):
    r1, cid = respond(alice, "My dog is Rex.")
    respond(alice, "I am tired.", previous_response_id=r1["id"])  # r1 is no longer the latest
    r3, fork = respond(alice, "What is my dog called?", previous_response_id=r1["id"])
    assert fork != cid
    committed(server, fork, 1)
    start = summary(alice, fork, version=0)
    close(start.slot_norms, stored_stm(server, cid, 1).norm(dim=-1))
    own = summary(alice, fork, stateless="true")
    assert own.response_id == r3["id"]
    close(own.change_norms, (stored_stm(server, fork, 1) - stored_stm(server, cid, 1)).norm(dim=-1))
    assert [row.turn for row in own.prompt_tokens] == [1, 2]  # the inherited turn, then its own


def test_a_turn_waiting_for_a_slow_update_records_the_wait(tmp_path):
    """The next turn that arrives during a 0.4 s memory update waits for it, and says so."""
    model = never_silent(small_model())
    original, delay = model.update_memory, 0.4

    def slow_update(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)

    model.update_memory = slow_update
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(tmp_path / "s.db"))
    with LiveServer(model, settings) as live, httpx.Client(base_url=live.base_url) as client:
        r1, cid = respond(client, "My cat is Tom.")
        respond(client, "Who is Tom?", previous_response_id=r1["id"])
        deadline = time.monotonic() + 20
        while live.store.get_conversation("local", cid).latest_version < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first = summary(client, cid, version=1).memory_update
        second = summary(client, cid, version=2).memory_update
    assert first.finished_ms - first.started_ms >= delay * 1000 * 0.9
    assert second.waited_ms >= delay * 1000 * 0.5  # sent right after the first answer
    assert first.waited_ms < delay * 1000 * 0.5  # nothing before the first turn


# ----------------------------------------------------------------------------- refusals
def test_another_keys_conversation_is_not_found(server, alice, bob):
    _, cid = respond(alice, "mine")
    committed(server, cid, 1)
    for path in (f"/v1/conversations/{cid}/memory", f"/v1/conversations/{cid}/state"):
        assert alice.get(path).status_code == 200
        mine = error(bob.get(path), 404)
        missing = error(bob.get(path.replace(cid, "conv_" + "0" * 32)), 404)
        assert mine["type"] == missing["type"] == "not_found_error"  # indistinguishable
        assert cid in mine["message"]
        error(httpx.get(str(server.base_url) + path), 401)


BAD_IDS = ["x" * 257, "a%00b", "a%0Ab", "caf%C3%A9", "a%20b", "%ED%A0%80", "a%7Fb"]


@pytest.mark.parametrize("suffix", ["memory", "state"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_ids_are_400_naming_the_id(alice, suffix, bad):
    found = error(alice.get(f"/v1/conversations/{bad}/{suffix}"), 400)
    assert found["param"] == "conversation_id" and "conversation_id" in found["message"]


@pytest.mark.parametrize(
    ("params", "status", "param"),
    [
        ({"version": -1}, 400, "version"),
        ({"version": "latest"}, 400, "version"),
        ({"version": 1.5}, 400, "version"),
        ({"version": 99}, 404, "version"),
        ({"stateless": "maybe"}, 400, "stateless"),
    ],
)
def test_bad_versions_and_flags_are_refused(server, alice, params, status, param):
    _, cid = respond(alice, "hello")
    committed(server, cid, 1)
    found = error(alice.get(f"/v1/conversations/{cid}/memory", params=params), status)
    assert found["param"] == param
    if "version" in params:
        error(alice.get(f"/v1/conversations/{cid}/state", params=params), status)


# ----------------------------------------------------------------------------- state files
def test_state_download_and_import_continue_the_same_memory(server, alice, bob):
    r1, cid = respond(alice, "My name is Ada.")
    r2, _ = respond(alice, "I like tea.", previous_response_id=r1["id"])
    committed(server, cid, 2)
    download = alice.get(f"/v1/conversations/{cid}/state")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/octet-stream"
    assert f'filename="{cid}-v2.stm.safetensors"' in download.headers["content-disposition"]
    assert download.content == server.store.latest(owner(server), cid).state  # byte for byte
    error(bob.get(f"/v1/conversations/{cid}/state"), 404)

    imported = alice.post("/v1/conversations/import", content=download.content)
    assert imported.status_code == 200, imported.text
    new = imported.json()
    assert new["object"] == "conversation" and new["turns"] == 1 and new["id"] != cid
    view = summary(alice, new["id"])
    assert view.change_norms is None  # a file's memory did not come from the state before it
    close(view.slot_norms, stored_stm(server, cid, 2).norm(dim=-1))
    # The imported memory answers exactly as the original from the same version.
    r3, same = respond(alice, "What is my name?", conversation=new["id"])
    direct, _ = respond(alice, "What is my name?", previous_response_id=r2["id"], store=False)
    assert same == new["id"] and text(r3) == text(direct)
    committed(server, new["id"], 2)
    items = alice.get(f"/v1/conversations/{new['id']}/items", params={"order": "asc"}).json()
    assert [i["role"] for i in items["data"]] == ["user", "assistant"]  # the file has no text
    rows = summary(alice, new["id"], stateless="true").prompt_tokens
    assert [(row.turn, row.stateless) for row in rows] == [(3, None)]  # history unknown
    error(bob.get(f"/v1/conversations/{new['id']}/memory"), 404)


def test_download_of_version_zero_is_the_starting_memory(server, alice):
    cid = alice.post("/v1/conversations", json={}).json()["id"]
    blob = alice.get(f"/v1/conversations/{cid}/state", params={"version": 0})
    assert blob.status_code == 200 and blob.headers["x-rxt-state-version"] == "0"
    model = server.app.state.model
    fingerprint = server.service.engine.fingerprint
    stm = stm_from_bytes(blob.content, fingerprint=fingerprint, shape=model.config.stm_shape)[0]
    torch.testing.assert_close(stm[0], stored_stm(server, cid, 0), atol=0, rtol=0)


def _state(server: LiveServer, *, fingerprint: str | None = None, shape=None) -> bytes:
    model = server.app.state.model
    stm = torch.randn(shape or model.config.stm_shape)
    return stm_to_bytes(stm, fingerprint=fingerprint or server.service.engine.fingerprint)


def test_import_refuses_another_models_or_a_damaged_state(server, alice):
    good = _state(server)
    altered = bytearray(good)
    altered[-1] ^= 0x01  # a bit of the last float: a finite value, but not the saved one
    L, S, d = server.app.state.model.config.stm_shape
    cases = {
        "another model": _state(server, fingerprint="0" * 64),
        "altered after saving": bytes(altered),
        "truncated or corrupt": good[:-9],
        "shape mismatch": _state(server, shape=(L, S + 1, d)),
        "not a readable safetensors blob": b"hello, not a state",
        "body is empty": b"",
    }
    before = len(alice.get("/v1/conversations", params={"limit": 100}).json()["data"])
    for reason, blob in cases.items():
        found = error(alice.post("/v1/conversations/import", content=blob), 400)
        assert found["code"] == "invalid_state" and reason in found["message"], (reason, found)
    after = len(alice.get("/v1/conversations", params={"limit": 100}).json()["data"])
    assert after == before  # nothing was stored for a refused state
    assert alice.post("/v1/conversations/import", content=good).status_code == 200


# ----------------------------------------------------------------------------- the page
def test_page_and_its_files_are_served_without_a_key(server):
    page = httpx.get(server.base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert not re.search(r"https?://", html)  # nothing from elsewhere: the page works offline
    referenced = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', html))
    for script in STATIC.glob("*.js"):
        imports = re.findall(r'from "\./([^"]+)"', script.read_text())
        referenced |= {f"/static/{name}" for name in imports}
        assert not re.search(r"https?://", script.read_text())
    assert referenced == {f"/static/{p.name}" for p in STATIC.iterdir() if p.name != "index.html"}
    kinds = {".js": "text/javascript", ".css": "text/css"}
    for path in referenced:
        got = httpx.get(server.base_url + path)
        assert got.status_code == 200, path
        assert got.headers["content-type"].startswith(kinds[Path(path).suffix]), path


def test_the_wheel_carries_every_page_file():
    """pyproject's package data must name every file of static/, or a wheel ships a blank page."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["rxt.serve"]
    files = sorted(p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir())
    assert files and all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), files
