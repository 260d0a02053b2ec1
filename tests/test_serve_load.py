"""Load: many concurrent conversations against one server lose and reorder nothing.

64 conversations × 8 turns run concurrently against one live server, through every way a
client can continue a conversation: whole chat transcripts (the server finds the stored prefix
by content hash), ``previous_response_id``, a client-chosen ``conversation_id`` (body or
header) and a server-made conversation (``POST /v1/conversations``), each streamed for half of
its conversations. Every request must succeed, and afterwards every conversation must be stored
as exactly its 8 turns, in the order sent, holding the answers the client received. A second
test sends many turns to ONE conversation at once: the server must run them one after another,
each on the state the previous one left.

Answers are 4 tokens of greedy decoding from a tiny random model, so the test measures the
serving machinery, not the model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from rxt.serve.settings import ServerSettings
from serve_support import CONVERSATION_HEADER, MODEL_NAME, LiveServer, small_model, sse_events

OWNER = "local"  # the one owner of a server without API keys
CONVERSATIONS = 64
TURNS = 8
MAX_TOKENS = 4
KINDS = ("transcript", "previous_response", "conversation_id", "conversation")


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture
def live(model, tmp_path) -> Iterator[LiveServer]:
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(tmp_path / "state.db"))
    with LiveServer(model, settings) as server:
        yield server


def client_for(server: LiveServer) -> httpx.AsyncClient:
    """A client with a connection for every conversation. Idle connections are dropped after
    1 s, well before uvicorn closes them (5 s): with both at 5 s a request can be sent on a
    connection the server is closing, a ReadError that is the client's race, not the server's."""
    limits = httpx.Limits(
        max_connections=2 * CONVERSATIONS,
        max_keepalive_connections=CONVERSATIONS,
        keepalive_expiry=1.0,
    )
    return httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=300)


# ---------------------------------------------------------------------------- one turn
@dataclass
class Answer:
    text: str
    headers: httpx.Headers
    body: dict[str, Any]  # the completion / response object (the final one when streamed)


async def post(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict | None = None
) -> Answer:
    """One turn; raises AssertionError on any failure, in the status or inside a stream."""
    response = await client.post(path, json=body, headers=headers)
    assert response.status_code == 200, (path, response.status_code, response.text)
    if not body.get("stream"):
        payload = response.json()
        if path == "/v1/chat/completions":
            text = payload["choices"][0]["message"]["content"]
        else:
            text = payload["output"][0]["content"][0]["text"]
        return Answer(text, response.headers, payload)
    events = sse_events(response.text)
    assert events, response.text
    for name, data in events:
        assert name != "error" and (data == "[DONE]" or "error" not in json.loads(data)), data
    if path == "/v1/chat/completions":
        assert events[-1][1] == "[DONE]", response.text
        chunks = [json.loads(data) for _, data in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] is not None, chunks[-1]
        return Answer(text, response.headers, chunks[-1])
    name, data = events[-1]
    assert name in ("response.completed", "response.incomplete"), response.text
    final = json.loads(data)["response"]
    deltas = "".join(json.loads(d)["delta"] for n, d in events if n == "response.output_text.delta")
    text = final["output"][0]["content"][0]["text"]
    assert deltas == text, (deltas, text)
    return Answer(text, response.headers, final)


def chat_body(messages: list[dict[str, str]], stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


def responses_body(query: str, stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "input": query,
        "max_output_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


# ---------------------------------------------------------------------------- one conversation
@dataclass
class Conversation:
    index: int
    kind: str
    stream: bool
    queries: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    conversation_ids: list[str] = field(default_factory=list)  # as each turn reported it
    versions: list[int] = field(default_factory=list)  # as each turn reported it
    response_ids: list[str] = field(default_factory=list)

    def query(self, turn: int) -> str:
        return f"conversation {self.index} turn {turn}: what comes after {self.index * turn}?"


async def run_conversation(client: httpx.AsyncClient, conv: Conversation) -> Conversation:
    """The conversation's 8 turns, one after another, recording what each answer reported."""
    history: list[dict[str, str]] = []
    own_id = f"load-{conv.index}"
    server_made = None
    if conv.kind == "conversation":
        made = await client.post("/v1/conversations", json={"metadata": {"n": str(conv.index)}})
        assert made.status_code == 200, made.text
        server_made = made.json()["id"]
    previous = None
    for turn in range(1, TURNS + 1):
        query = conv.query(turn)
        if conv.kind == "transcript":
            history.append({"role": "user", "content": query})
            answer = await post(client, "/v1/chat/completions", chat_body(history, conv.stream))
            history.append({"role": "assistant", "content": answer.text})
        elif conv.kind == "conversation_id":
            # Only the new message: the server's memory is the history. Even conversations
            # name theirs in the body, odd ones in the header.
            message = [{"role": "user", "content": query}]
            if conv.index % 2 == 0:
                body = chat_body(message, conv.stream, conversation_id=own_id)
                answer = await post(client, "/v1/chat/completions", body)
            else:
                body = chat_body(message, conv.stream)
                headers = {CONVERSATION_HEADER: own_id}
                answer = await post(client, "/v1/chat/completions", body, headers)
        elif conv.kind == "previous_response":
            extra = {"previous_response_id": previous} if previous else {}
            answer = await post(
                client, "/v1/responses", responses_body(query, conv.stream, **extra)
            )
            previous = answer.body["id"]
            conv.response_ids.append(previous)
        else:
            body = responses_body(query, conv.stream, conversation=server_made)
            answer = await post(client, "/v1/responses", body)
            conv.response_ids.append(answer.body["id"])
        conv.queries.append(query)
        conv.answers.append(answer.text)
        conv.conversation_ids.append(answer.headers[CONVERSATION_HEADER])
        conv.versions.append(int(answer.headers["X-RxT-Turn"]))
    if conv.kind == "conversation_id":
        assert set(conv.conversation_ids) == {own_id}, conv.conversation_ids
    if conv.kind == "conversation":
        assert set(conv.conversation_ids) == {server_made}, conv.conversation_ids
    return conv


# ---------------------------------------------------------------------------- after the load
async def settled(client: httpx.AsyncClient, timeout: float = 60.0) -> str:
    """The metrics once no turn is still being answered or committed (commits run after the
    response, so the last turn of a conversation may still be storing its state)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get("/metrics")).text
        if metric(text, "rxt_active_conversations") == 0 or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of a metric in Prometheus' text format."""
    found = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric_name, _, label_text = sample.partition("{")
        if metric_name == name:
            pairs = (part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
            found.append(({k: v.strip('"') for k, v in pairs}, float(value)))
    return found


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    matching = [v for found, v in samples(text, name) if labels.items() <= found.items()]
    assert matching, f"no sample of {name} {labels or ''}"
    return sum(matching)


def stored_conversation_id(server: LiveServer, conv: Conversation) -> str:
    """The conversation the store holds ``conv`` under, checked against every turn's report."""
    cid = conv.conversation_ids[0]
    assert set(conv.conversation_ids) == {cid}, (conv.kind, conv.conversation_ids)
    for turn, rid in enumerate(conv.response_ids, 1):
        assert server.store.lookup(OWNER, "resp:" + rid) == (cid, turn), (conv.kind, turn)
    return cid


def assert_stored_in_order(server: LiveServer, conv: Conversation) -> None:
    cid = stored_conversation_id(server, conv)
    info = server.store.get_conversation(OWNER, cid)
    assert info is not None, cid
    assert info.latest_version == TURNS, (conv.kind, cid, info.latest_version)
    assert conv.versions == list(range(1, TURNS + 1)), (conv.kind, conv.versions)
    turns = server.store.turns(OWNER, cid)
    assert [t["turn"] for t in turns] == list(range(1, TURNS + 1)), (conv.kind, turns)
    assert [t["user"] for t in turns] == conv.queries, (conv.kind, turns)
    assert [t["assistant"] for t in turns] == conv.answers, (conv.kind, turns)
    assert not any(t.get("replayed") for t in turns), (conv.kind, turns)
    if conv.response_ids:
        assert [t["response_id"] for t in turns] == conv.response_ids, (conv.kind, turns)


def test_64_concurrent_conversations_of_8_turns(live: LiveServer) -> None:
    conversations = [
        Conversation(index=i, kind=KINDS[i % len(KINDS)], stream=(i // len(KINDS)) % 2 == 1)
        for i in range(CONVERSATIONS)
    ]
    assert Counter((c.kind, c.stream) for c in conversations) == {
        (kind, stream): CONVERSATIONS // (2 * len(KINDS))
        for kind in KINDS
        for stream in (False, True)
    }

    async def main() -> tuple[list[Any], str, float]:
        async with client_for(live) as client:
            started = time.perf_counter()
            results = await asyncio.gather(
                *(run_conversation(client, c) for c in conversations),
                return_exceptions=True,
            )
            elapsed = time.perf_counter() - started
            return results, await settled(client), elapsed

    results, metrics, elapsed = asyncio.run(main())
    errors = [(c.index, c.kind, r) for c, r in zip(conversations, results, strict=True)]
    errors = [e for e in errors if isinstance(e[2], BaseException)]
    assert not errors, f"{len(errors)} conversations failed, the first: {errors[0]!r}"

    for conv in conversations:
        assert_stored_in_order(live, conv)
    ids = {stored_conversation_id(live, c) for c in conversations}
    assert len(ids) == CONVERSATIONS, "two conversations were stored as one"

    total = CONVERSATIONS * TURNS
    assert metric(metrics, "rxt_turns_total") == total
    assert metric(metrics, "rxt_turns_total", api="chat") == total // 2
    assert metric(metrics, "rxt_turns_total", api="responses") == total // 2
    assert metric(metrics, "rxt_conversation_forks_total") == 0
    assert metric(metrics, "rxt_state_commit_failures_total") == 0
    assert metric(metrics, "rxt_replayed_turns_total") == 0
    transcripts = CONVERSATIONS // len(KINDS)
    # Every transcript turn after the first found the state stored after the previous one.
    assert metric(metrics, "rxt_transcript_prefix_lookups_total", result="miss") == transcripts
    assert metric(metrics, "rxt_transcript_prefix_lookups_total", result="hit") == (
        transcripts * (TURNS - 1)
    )
    requests = samples(metrics, "rxt_requests_total")
    assert all(labels["status"] == "200" for labels, _ in requests), requests
    for route in ("/v1/chat/completions", "/v1/responses"):
        assert metric(metrics, "rxt_requests_total", route=route) == total // 2
    print(f"{total} turns in {elapsed:.1f} s ({total / elapsed:.0f} turns/s)")


# ---------------------------------------------------------------------------- one conversation
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_concurrent_turns_on_one_conversation_are_serialised(live: LiveServer, api: str) -> None:
    n = 16
    queries = [f"concurrent query number {i}" for i in range(n)]

    async def main() -> tuple[str, list[Answer], str]:
        async with client_for(live) as client:
            if api == "chat":
                cid = "one-conversation"  # created by whichever request comes first
                bodies = [
                    chat_body([{"role": "user", "content": q}], i % 2 == 1, conversation_id=cid)
                    for i, q in enumerate(queries)
                ]
                path = "/v1/chat/completions"
            else:
                made = await client.post("/v1/conversations", json={})
                assert made.status_code == 200, made.text
                cid = made.json()["id"]
                bodies = [
                    responses_body(q, i % 2 == 1, conversation=cid) for i, q in enumerate(queries)
                ]
                path = "/v1/responses"
            answers = await asyncio.gather(*(post(client, path, b) for b in bodies))
            return cid, answers, await settled(client)

    cid, answers, metrics = asyncio.run(main())
    assert {a.headers[CONVERSATION_HEADER] for a in answers} == {cid}
    turn_of = [int(a.headers["X-RxT-Turn"]) for a in answers]
    assert sorted(turn_of) == list(range(1, n + 1)), turn_of

    info = live.store.get_conversation(OWNER, cid)
    assert info is not None and info.latest_version == n, info
    stored = live.store.turns(OWNER, cid)
    assert [t["turn"] for t in stored] == list(range(1, n + 1))
    assert sorted(t["user"] for t in stored) == sorted(queries)  # each exactly once
    for query, answer, turn in zip(queries, answers, turn_of, strict=True):
        # The turn number a request was told is the version holding its query and answer.
        assert stored[turn - 1]["user"] == query
        assert stored[turn - 1]["assistant"] == answer.text
    assert metric(metrics, "rxt_conversation_forks_total") == 0
    assert metric(metrics, "rxt_state_commit_failures_total") == 0
    assert metric(metrics, "rxt_turns_total") == n
