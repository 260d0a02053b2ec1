"""Crash consistency: ``kill -9`` the server while turns and memory updates are in flight.

Many conversations run at once against ``rxt serve`` (a child process on a SQLite store):
chat completions naming their conversation (plain and streamed) and ``/v1/responses`` chains
linked by ``previous_response_id`` (plain and streamed). Once enough turns have been answered
the server is killed with SIGKILL, so some answers are sent but their memory update, or the
append of the new state, never happens. Then:

* the store file, opened directly, is intact: every conversation's versions are contiguous
  ``1..latest``, every state passes its checksum and loads for this model, the stored turns
  are exactly a prefix of what its client sent (with the replies the client was given), and
  at most the last answered turn of a conversation is missing (its commit follows the answer);
* a restarted server continues every conversation by exactly one version, from exactly the
  committed state (the reply is what greedy decoding from that stored state gives), and a
  response id whose state was never stored is refused with a 4xx, never a 5xx or a hang.

A turn answered but never stored leaves its alias keys (response id, ``next:<conversation>``)
bound *pending* to a version that does not exist. The server honours such a binding for
``--commit-wait`` seconds (another process sharing the store might still be committing it) and
ignores it afterwards; the restarted server runs with a short ``--commit-wait``, and every
request touching a dead binding must answer by then (plus slack), never hang.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from rxt import ReactiveTransformer
from rxt.engine import Engine, SamplingParams
from rxt.engine.state import model_fingerprint, stm_from_bytes
from rxt.serve.auth import DEV_OWNER
from rxt.serve.store import open_store
from serve_support import (
    CONVERSATION_HEADER,
    MODEL_NAME,
    ServerProcess,
    save_small_model,
)

CHAT_CLIENTS = 10  # chat conversations named by ``conversation_id`` (every other one streamed)
RESPONSE_CLIENTS = 6  # /v1/responses chains (every other one streamed)
MAX_TOKENS = 6
KILL_AFTER_TURNS = 80  # answered turns in all before the kill ...
KILL_AFTER_EACH = 2  # ... and at least this many in every conversation
COMMIT_WAIT_S = 5.0  # ``rxt serve --commit-wait`` of the restarted server
WAIT_SLACK_S = 5.0  # how late past commit_wait_s a request may answer on a busy machine
REQUEST_TIMEOUT_S = 20.0
WORDS = ["the sea", "a window", "red apples", "the old king", "rain", "seven stars", "a bell"]


@dataclass
class Client:
    """One conversation, driven turn after turn by one thread until the server dies."""

    kind: str  # "chat" | "responses"
    index: int
    stream: bool
    conversation_id: str | None = None  # chat: chosen here; responses: the server's header
    queries: list[str] = field(default_factory=list)  # every query sent (maybe unanswered)
    replies: list[str] = field(default_factory=list)  # replies whose final event arrived
    response_ids: list[str] = field(default_factory=list)  # responses: of ``replies``
    unanswered_id: str | None = None  # responses: id announced, final event never arrived
    in_flight: bool = False  # a request was cut off by the kill
    failure: str | None = None  # anything but a cut connection

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.index}"

    def query(self, n: int) -> str:
        return f"{self.name} turn {n}: tell me about {WORDS[(self.index + n) % len(WORDS)]}"


# ---------------------------------------------------------------------------- one turn
def sse_data(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


def chat_turn(http: httpx.Client, client: Client, query: str, first: bool) -> str | None:
    """The reply, or None if the final event did not arrive; raises on a transport error."""
    messages = [{"role": "user", "content": query}]
    if first and client.index % 3 == 0:
        messages.insert(0, {"role": "system", "content": f"You are {client.name}."})
    body = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "conversation_id": client.conversation_id,
    }
    if not client.stream:
        r = http.post("/v1/chat/completions", json=body)
        check_ok(r, client)
        return r.json()["choices"][0]["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        check_ok(r, client)
        pieces = []
        for data in sse_data(r):
            if data == "[DONE]":
                return "".join(pieces)
            assert "error" not in data, data
            pieces.append(data["choices"][0]["delta"].get("content") or "")
    return None


def responses_turn(http: httpx.Client, client: Client, query: str) -> tuple[str, str] | None:
    """(response id, reply), or None if the final event did not arrive."""
    body = {"model": MODEL_NAME, "input": query, "max_output_tokens": MAX_TOKENS}
    body |= {"temperature": 0}
    if client.response_ids:
        body["previous_response_id"] = client.response_ids[-1]
    if not client.stream:
        r = http.post("/v1/responses", json=body)
        check_ok(r, client)
        client.conversation_id = r.headers[CONVERSATION_HEADER]
        out = r.json()
        return out["id"], out["output"][0]["content"][0]["text"]
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        check_ok(r, client)
        client.conversation_id = r.headers[CONVERSATION_HEADER]
        for data in sse_data(r):
            assert data["type"] != "error", data
            if data["type"] == "response.created":
                client.unanswered_id = data["response"]["id"]
            if data["type"] in ("response.completed", "response.incomplete"):  # the last
                out = data["response"]
                client.unanswered_id = None
                return out["id"], out["output"][0]["content"][0]["text"]
    return None


def check_ok(r: httpx.Response, client: Client) -> None:
    if r.status_code != 200:
        r.read()
        raise AssertionError(f"{client.name}: HTTP {r.status_code}: {r.text}")


class Killer:
    """SIGKILLs the server from the thread of a /v1/responses chain right after an answer
    arrived, once the quota of answers is filled: that turn's memory update and commit are
    then likely still running (so its response id is likely never stored), and so are other
    conversations' turns."""

    def __init__(self, server: ServerProcess, clients: list[Client]) -> None:
        self.server, self.clients = server, clients
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.at = 0.0  # time.time() of the kill

    def answered(self, client: Client) -> None:
        with self.lock:
            if self.done.is_set() or client.kind != "responses":
                return
            replies = [len(c.replies) for c in self.clients]
            if sum(replies) >= KILL_AFTER_TURNS and min(replies) >= KILL_AFTER_EACH:
                self.server.process.send_signal(signal.SIGKILL)
                self.at = time.time()
                self.done.set()


def drive(base_url: str, client: Client, killer: Killer) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        while not killer.done.is_set():
            query = client.query(len(client.queries) + 1)
            client.queries.append(query)
            try:
                if client.kind == "chat":
                    reply = chat_turn(http, client, query, first=len(client.queries) == 1)
                    answered = None if reply is None else (None, reply)
                else:
                    answered = responses_turn(http, client, query)
            except httpx.ConnectError:  # the server was gone before this request was sent
                client.queries.pop()
                return
            except httpx.TransportError:
                client.in_flight = True  # the server died under this request
                return
            except Exception as exc:  # reported by the test
                client.failure = repr(exc)
                return
            if answered is None:  # a cut connection raises; a clean end must be complete
                client.failure = "the stream ended without its final event"
                return
            rid, reply = answered
            client.replies.append(reply)
            if rid is not None:
                client.response_ids.append(rid)
            killer.answered(client)


# ---------------------------------------------------------------------------- the store
def check_store(db: Path, fingerprint: str, shape) -> dict[str, int]:
    """Every conversation's latest version, after checking the whole store is consistent."""
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = raw.execute(
            "SELECT conversation_id, COUNT(*), MIN(version), MAX(version) FROM versions "
            "GROUP BY owner, conversation_id"
        ).fetchall()
    counted = {cid: (n, lo, hi) for cid, n, lo, hi in rows}
    latest: dict[str, int] = {}
    store = open_store(str(db))
    try:
        infos = store.list_conversations(DEV_OWNER, limit=100_000)
        assert len(counted.keys() - {i.conversation_id for i in infos}) == 0, "orphan versions"
        for info in infos:
            cid, n = info.conversation_id, info.latest_version
            assert info.metadata.get("forked_from") is None, f"{cid} was forked"
            if n == 0:
                assert cid not in counted, f"{cid}: versions stored beyond latest 0"
            else:
                assert counted[cid] == (n, 1, n), f"{cid}: versions {counted[cid]}, latest {n}"
            for v in range(1, n + 1):
                stored = store.get_version(DEV_OWNER, cid, v)  # StoreCorrupt on a bad checksum
                assert stored is not None and stored.version == v
                _, meta = stm_from_bytes(stored.state, fingerprint=fingerprint, shape=shape)
                assert meta["turns"] == str(v), f"{cid} v{v}: state says turns={meta['turns']}"
                assert stored.turn["turn"] == v
            assert [t["turn"] for t in store.turns(DEV_OWNER, cid)] == list(range(1, n + 1))
            top = store.latest(DEV_OWNER, cid)
            assert (top.version if top else 0) == n
            pending = store.binding(DEV_OWNER, "next:" + cid)
            assert pending is None or pending.committed or pending.version == n + 1
            latest[cid] = n
    finally:
        store.close()
    return latest


def check_client(store, client: Client, latest: int) -> list[dict]:
    """The client's conversation holds a prefix of its turns: every answered one but perhaps
    the last (answered, but killed before its state was appended), perhaps the one cut off
    (killed after its state was appended, before the client read the end). Its stored turns."""
    name, answered = client.name, len(client.replies)
    assert answered - 1 <= latest <= answered + int(client.in_flight), (name, answered, latest)
    turns = store.turns(DEV_OWNER, client.conversation_id) if latest else []
    assert [t["user"] for t in turns] == client.queries[:latest], name
    assert all(t["api"] == client.kind for t in turns), name
    for i, turn in enumerate(turns[:answered]):
        assert turn["assistant"] == client.replies[i], (name, i)
    if client.kind != "responses":
        return turns
    for i, turn in enumerate(turns):
        rid = client.response_ids[i] if i < answered else client.unanswered_id
        if rid is not None:  # None: an unstreamed response cut off (its id never arrived)
            assert turn["response_id"] == rid, (name, i)
        assert f"resp:{turn['response_id']}" in turn["keys"], (name, i)
    for i, rid in enumerate(client.response_ids):
        binding = store.binding(DEV_OWNER, f"resp:{rid}")
        assert binding is not None, f"{name}: answered response {rid} has no binding"
        assert binding.conversation_id == client.conversation_id
        assert binding.version == i + 1
        assert binding.committed == (i < latest), (name, i, latest)
    return turns


def pending_bindings(db: Path) -> dict[str, float]:
    """Alias keys bound pending to a version that was never stored → when they were bound."""
    with sqlite3.connect(db) as raw:
        rows = raw.execute(
            "SELECT b.key, b.bound_at FROM bindings b JOIN conversations c "
            "ON c.owner = b.owner AND c.id = b.conversation_id "
            "WHERE b.version > c.latest_version"
        ).fetchall()
    return dict(rows)


# ---------------------------------------------------------------------------- the test
def test_sigkill_during_memory_updates_leaves_every_conversation_committed(tmp_path) -> None:
    t0 = time.monotonic()
    model_dir = save_small_model(tmp_path / "model")
    db = tmp_path / "state.db"
    clients = [Client("chat", i, stream=i % 2 == 1) for i in range(CHAT_CLIENTS)]
    clients += [Client("responses", i, stream=i % 2 == 1) for i in range(RESPONSE_CLIENTS)]
    for c in clients[:CHAT_CLIENTS]:
        c.conversation_id = f"conv-crash-{c.index}"

    # 1. Load, then SIGKILL in the middle of it.
    server = ServerProcess(model_dir, str(db), log=tmp_path / "server1.log")
    with server:
        killer = Killer(server, clients)
        threads = [
            threading.Thread(target=drive, args=(server.base_url, c, killer), daemon=True)
            for c in clients
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not killer.done.wait(0.05):
            failed = [f"{c.name}: {c.failure}" for c in clients if c.failure]
            assert not failed, failed
            assert time.monotonic() < deadline, [(c.name, len(c.replies)) for c in clients]
        server.kill()  # waits for the process
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
    failed = [f"{c.name}: {c.failure}" for c in clients if c.failure]
    assert not failed, failed
    assert any(c.in_flight for c in clients), "the kill cut off no request"

    t_kill = time.monotonic()
    # 2. The store, as the dead server left it.
    model = ReactiveTransformer.from_pretrained(model_dir)
    fingerprint, shape = model_fingerprint(model), model.config.stm_shape
    latest = check_store(db, fingerprint, shape)
    # Every client had answers (so its conversation id), and nothing else was created.
    assert latest.keys() == {c.conversation_id for c in clients}
    stored_ids: dict[str, list[str]] = {}  # responses client → ids of its stored turns
    store = open_store(str(db))
    try:
        for c in clients:
            turns = check_client(store, c, latest[c.conversation_id])
            stored_ids[c.name] = [t.get("response_id") for t in turns]
    finally:
        store.close()
    before = {c.name: latest[c.conversation_id] for c in clients}
    lost = [c for c in clients if len(c.replies) > before[c.name]]

    t_check = time.monotonic()
    # 3. Restart ``rxt serve`` on the same store: every conversation goes on by one version.
    pending = pending_bindings(db)  # key → bound_at, of the turns the dead server never stored
    continued: dict[str, tuple[str, str]] = {}  # client → (query, reply)
    dead_ids = [c.response_ids[-1] for c in lost if c.kind == "responses"]
    unanswered = [(c.unanswered_id, c.unanswered_id in stored_ids[c.name]) for c in clients]
    unanswered = [(rid, stored) for rid, stored in unanswered if rid is not None]
    wait = ("--commit-wait", str(COMMIT_WAIT_S))
    server = ServerProcess(model_dir, str(db), *wait, log=tmp_path / "server2.log")
    with server, httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S) as http:

        def call(method: str, url: str, key: str | None = None, **kw) -> httpx.Response:
            """A request, which must not wait on a dead pending binding past commit_wait_s."""
            started = time.time()
            r = http.request(method, url, **kw)
            if key in pending:
                due = max(started, pending[key] + COMMIT_WAIT_S) + WAIT_SLACK_S
                assert time.time() <= due, f"{method} {url} waited on {key} past commit_wait"
            return r

        for rid in dead_ids:  # answered, never stored: refused once commit_wait_s has passed
            r = call("GET", f"/v1/responses/{rid}", f"resp:{rid}")
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "state_not_committed"
            body = {"model": MODEL_NAME, "input": "and then?", "previous_response_id": rid}
            r = call("POST", "/v1/responses", f"resp:{rid}", json=body)
            assert r.status_code == 409, r.text
        for rid, stored in unanswered:  # cut off before (404) or after (409) its seal
            r = call("GET", f"/v1/responses/{rid}", f"resp:{rid}")
            assert r.status_code == 200 if stored else r.status_code in (404, 409), r.text
        for c in clients:
            n = before[c.name]
            query = f"{c.name} after the crash: tell me about {WORDS[c.index % len(WORDS)]}"
            next_key = f"next:{c.conversation_id}"
            if c.kind == "chat":
                body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": query}]}
                body |= {"max_tokens": MAX_TOKENS, "temperature": 0}
                body["conversation_id"] = c.conversation_id
                r = call("POST", "/v1/chat/completions", next_key, json=body)
                assert r.status_code == 200, (c.name, r.status_code, r.text)
                reply = r.json()["choices"][0]["message"]["content"]
            else:
                body = {"model": MODEL_NAME, "input": query, "max_output_tokens": MAX_TOKENS}
                body["temperature"] = 0
                if n:  # from the newest stored response
                    body["previous_response_id"] = stored_ids[c.name][n - 1]
                else:  # nothing stored: the conversation itself
                    body["conversation"] = c.conversation_id
                r = call("POST", "/v1/responses", next_key, json=body)
                assert r.status_code == 200, (c.name, r.status_code, r.text)
                reply = r.json()["output"][0]["content"][0]["text"]
                answered = list(zip(stored_ids[c.name], c.replies, strict=False))
                for rid, text in answered[-2:]:  # the newest stored responses read back
                    got = call("GET", f"/v1/responses/{rid}")
                    assert got.status_code == 200, got.text
                    assert got.json()["output"][0]["content"][0]["text"] == text
            assert r.headers[CONVERSATION_HEADER] == c.conversation_id, c.name
            continued[c.name] = (query, reply)
        for rid in dead_ids:  # its version number now holds another turn: still refused
            r = call("GET", f"/v1/responses/{rid}")
            assert r.status_code in (404, 409), r.text
            body = {"model": MODEL_NAME, "input": "and then?", "previous_response_id": rid}
            r = call("POST", "/v1/responses", json=body)
            assert r.status_code in (404, 409), r.text
    # (Leaving ``with server`` sends SIGINT: the shutdown stores every pending commit first.)

    t_restart = time.monotonic()
    # 4. Exactly one more version each, computed from the committed state.
    after = check_store(db, fingerprint, shape)
    store = open_store(str(db))
    engine = Engine(model, max_batch_size=1)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_TOKENS)
    try:
        for c in clients:
            n, (query, reply) = before[c.name], continued[c.name]
            assert after[c.conversation_id] == n + 1, c.name
            turn = store.get_version(DEV_OWNER, c.conversation_id, n + 1).turn
            assert (turn["user"], turn["assistant"], turn["turn"]) == (query, reply, n + 1)
            if n:
                state = store.get_version(DEV_OWNER, c.conversation_id, n).state
                expected = engine.conversation(state=state).send(query, greedy).result().text
                assert reply == expected, c.name
    finally:
        engine.close()
        store.close()
    print(
        f"\n{sum(len(c.replies) for c in clients)} turns answered before the kill, "
        f"{sum(c.in_flight for c in clients)} cut off, answered but not stored: "
        f"{[c.name for c in lost]}; load and kill {t_kill - t0:.1f} s, check "
        f"{t_check - t_kill:.1f} s, restart and continue {t_restart - t_check:.1f} s, "
        f"final check {time.monotonic() - t_restart:.1f} s"
    )
