"""The OpenAI-compatible server through the official ``openai`` client, on loopback.

Equivalence is the backbone: what the API answers must be what the engine answers when called
directly from the same memory, whether the memory came from a stored state, a replayed
transcript, a response id or an explicit conversation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from rxt import ReactiveTransformer
from rxt.engine import Engine
from rxt.engine.state import stm_from_bytes, stm_to_bytes
from rxt.serve.auth import DEV_OWNER, KeyRing, digest
from rxt.serve.settings import Limits, ServerSettings
from serve_support import (
    CONVERSATION_HEADER,
    MODEL_NAME,
    LiveServer,
    save_small_model,
    small_model,
)

pytestmark = pytest.mark.numerics  # rerun under each lower CPU capability

OWNER = DEV_OWNER
GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def model() -> ReactiveTransformer:
    return small_model()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("serve") / "state.db"
    limits = Limits(max_body_bytes=64 * 1024, max_messages=40, max_message_chars=2000)
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(store), limits=limits)
    with LiveServer(model, settings) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=server.base_url + "/v1", max_retries=0)


@pytest.fixture(scope="module")
def engine(model) -> Iterator[Engine]:
    with Engine(model) as eng:
        yield eng


def initial_state(server: LiveServer, conversation_id: str) -> bytes:
    """The STM_0 the server gave a conversation (from the seed kept in its metadata)."""
    info = server.store.get_conversation(OWNER, conversation_id)
    seed = info.metadata["stm_seed"]
    model = server.app.state.model
    stm = model.initial_stm(1, generator=torch.Generator().manual_seed(seed))
    return stm_to_bytes(stm, fingerprint=server.service.engine.fingerprint)


def stored_stm(server: LiveServer, conversation_id: str, version: int | None = None):
    store = server.store
    found = (
        store.latest(OWNER, conversation_id)
        if version is None
        else store.get_version(OWNER, conversation_id, version)
    )
    model = server.app.state.model
    fp = server.service.engine.fingerprint
    return stm_from_bytes(found.state, fingerprint=fp, shape=model.config.stm_shape)[0]


def wait_version(server: LiveServer, conversation_id: str, version: int) -> None:
    """Commits land after the response: wait until ``version`` is stored."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = server.store.get_conversation(OWNER, conversation_id)
        if info is not None and info.latest_version >= version:
            return
        time.sleep(0.01)
    raise AssertionError(f"{conversation_id} never reached version {version}")


def chat(client: openai.OpenAI, messages: list[dict], **kwargs):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=messages, **{**GREEDY, **kwargs}
    )
    return raw.parse(), raw.headers[CONVERSATION_HEADER]


QUERIES = ["My cat is called Felix.", "I live in Paris.", "What is my cat called?", "Thanks!"]


# ----------------------------------------------------------------------------- chat completions
def test_chat_transcripts_continue_the_stored_memory_like_the_engine(server, client, engine):
    """Whole transcripts resent each turn: the server finds the stored prefix, so it runs only
    the new turn — and every reply equals the engine's on one live conversation."""
    messages: list[dict] = []
    replies, conversation = [], None
    for query in QUERIES:
        messages.append({"role": "user", "content": query})
        completion, cid = chat(client, messages)
        conversation = conversation or cid
        assert cid == conversation  # the same stored conversation every turn
        reply = completion.choices[0].message.content
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
        # A random model may end at EOS early; "length" exactly when it ran to max_tokens.
        finish = completion.choices[0].finish_reason
        tokens = completion.usage.completion_tokens
        assert 1 <= tokens <= 6 and (finish == "length") <= (tokens == 6)
    wait_version(server, conversation, len(QUERIES))
    direct = engine.conversation(state=initial_state(server, conversation))
    assert [direct.ask(q, max_new_tokens=6).text for q in QUERIES] == replies
    assert torch.equal(stored_stm(server, conversation), direct.stm)
    turns = server.store.turns(OWNER, conversation)
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    assert [t["user"] for t in turns] == QUERIES
    assert not any(t.get("replayed") for t in turns)


def test_chat_streaming_sends_deltas_then_done(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Tell me something."}],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("length", "stop") and all(f is None for f in finals[:-1])
    tokens = chunks[-1].usage.completion_tokens
    assert tokens <= 6 and (finals[-1] == "length") <= (tokens == 6)
    assert chunks[-1].choices == []
    assert chunks[0].choices[0].delta.role == "assistant"
    cid = raw.headers[CONVERSATION_HEADER]
    wait_version(server, cid, 1)
    assert server.store.turns(OWNER, cid)[0]["assistant"] == text
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": 1},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"


def test_unseen_transcript_is_replayed_once_and_stored(server, client, engine):
    """A transcript whose history the server never saw: the earlier turns are encoded into
    memory once (stored as versions), then only the last message is decoded."""
    history = [("Hello there.", "Hi! How can I help?"), ("My name is Ada.", "Nice to meet you.")]
    messages = [{"role": "system", "content": "Be brief."}]
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": "What is my name?"})
    completion, cid = chat(client, messages)
    wait_version(server, cid, 3)
    turns = server.store.turns(OWNER, cid)
    assert [t.get("replayed", False) for t in turns] == [True, True, False]
    direct = engine.conversation(state=initial_state(server, cid))
    direct.absorb_system("Be brief.")
    for user, assistant in history:
        direct.absorb(user, assistant)
    assert torch.equal(stored_stm(server, cid, 2), direct.stm)
    assert direct.ask("What is my name?", max_new_tokens=6).text == (
        completion.choices[0].message.content
    )
    # The same transcript one turn longer now hits the stored prefix: nothing is replayed.
    messages += [
        {"role": "assistant", "content": completion.choices[0].message.content},
        {"role": "user", "content": "Bye."},
    ]
    _, cid2 = chat(client, messages)
    assert cid2 == cid
    wait_version(server, cid, 4)
    assert not server.store.turns(OWNER, cid)[-1].get("replayed")


def test_explicit_conversation_id_binds_the_turns(server, client):
    first = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "one"}],
        extra_body={"conversation_id": "my-thread-1"},
        **GREEDY,
    )
    assert first.headers[CONVERSATION_HEADER] == "my-thread-1"
    second = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "two"}],
        extra_headers={CONVERSATION_HEADER: "my-thread-1"},
        **GREEDY,
    )
    assert second.headers["X-RxT-Turn"] == "2"
    wait_version(server, "my-thread-1", 2)
    assert [t["user"] for t in server.store.turns(OWNER, "my-thread-1")] == ["one", "two"]


# ----------------------------------------------------------------------------- responses
def test_responses_chain_by_previous_response_id_and_fork(server, client, engine):
    r1 = client.responses.create(
        model=MODEL_NAME, input="My dog is Rex.", temperature=0, max_output_tokens=6
    )
    r2 = client.responses.create(
        model=MODEL_NAME,
        input="Where do I live?",
        previous_response_id=r1.id,
        temperature=0,
        max_output_tokens=6,
    )
    assert r2.previous_response_id == r1.id
    # "incomplete" only when the answer ran to max_output_tokens (a random model may hit EOS)
    assert r2.status in ("completed", "incomplete") and r2.usage.output_tokens <= 6
    assert (r2.status == "incomplete") <= (r2.usage.output_tokens == 6)
    cid, version = server.store.lookup(OWNER, "resp:" + r1.id) or wait_lookup(server, r1.id)
    wait_lookup(server, r2.id)
    direct = engine.conversation(state=initial_state(server, cid))
    assert direct.ask("My dog is Rex.", max_new_tokens=6).text == r1.output_text
    branch = direct.fork()
    assert direct.ask("Where do I live?", max_new_tokens=6).text == r2.output_text
    # Continuing from r1 again forks: a new conversation from r1's memory; r2's is untouched.
    r3 = client.responses.create(
        model=MODEL_NAME,
        input="What is my dog's name?",
        previous_response_id=r1.id,
        temperature=0,
        max_output_tokens=6,
    )
    assert branch.ask("What is my dog's name?", max_new_tokens=6).text == r3.output_text
    fork_cid, fork_version = wait_lookup(server, r3.id)
    assert fork_cid != cid and fork_version == 1
    assert server.store.get_conversation(OWNER, fork_cid).metadata["forked_from"] == {
        "conversation_id": cid,
        "version": version,
    }
    assert server.store.get_conversation(OWNER, cid).latest_version == 2
    # retrieve and delete
    got = client.responses.retrieve(r2.id)
    assert got.output_text == r2.output_text and got.previous_response_id == r1.id
    client.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL_NAME, input="x", previous_response_id=r2.id)


def wait_lookup(server: LiveServer, response_id: str) -> tuple[str, int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = server.store.lookup(OWNER, "resp:" + response_id)
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError(f"response {response_id} never stored")


def test_responses_stream_events(server, client):
    events = list(
        client.responses.create(
            model=MODEL_NAME, input="Hi.", stream=True, temperature=0, max_output_tokens=4
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_store_false_keeps_nothing(server, client):
    raw = client.responses.with_raw_response.create(
        model=MODEL_NAME, input="Secret.", store=False, temperature=0, max_output_tokens=4
    )
    r, cid = raw.parse(), raw.headers[CONVERSATION_HEADER]
    deadline = time.monotonic() + 20
    while server.service.locks and time.monotonic() < deadline:
        time.sleep(0.01)  # the turn's background work is over once no conversation is held
    assert server.store.lookup(OWNER, "resp:" + r.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert server.store.get_conversation(OWNER, cid) is None  # not even an empty conversation


def test_instructions_cannot_change_mid_conversation(client):
    r1 = client.responses.create(
        model=MODEL_NAME, input="a", instructions="Be brief.", max_output_tokens=2
    )
    same = client.responses.create(
        model=MODEL_NAME,
        input="b",
        instructions="Be brief.",
        previous_response_id=r1.id,
        max_output_tokens=2,
    )
    assert same.output_text is not None
    with pytest.raises(openai.BadRequestError, match="instructions"):
        client.responses.create(
            model=MODEL_NAME,
            input="c",
            instructions="Be verbose.",
            previous_response_id=r1.id,
            max_output_tokens=2,
        )


# ----------------------------------------------------------------------------- conversations
def test_conversations_crud_and_items(server, client):
    conv = client.conversations.create(
        metadata={"topic": "pets"},
        items=[
            {"type": "message", "role": "user", "content": "I have a parrot."},
            {"type": "message", "role": "assistant", "content": "Lovely!"},
        ],
    )
    assert conv.metadata == {"topic": "pets"}
    r = client.responses.create(
        model=MODEL_NAME, input="What pet?", conversation=conv.id, temperature=0, **_short()
    )
    assert r.conversation.id == conv.id
    wait_version(server, conv.id, 2)
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [(i.role, i.content[0].text) for i in items] == [
        ("user", "I have a parrot."),
        ("assistant", "Lovely!"),
        ("user", "What pet?"),
        ("assistant", r.output_text),
    ]
    turns = httpx.get(f"{server.base_url}/v1/conversations/{conv.id}/turns").json()["data"]
    assert [t["turn"] for t in turns] == [1, 2] and turns[1]["response_id"] == r.id
    assert client.conversations.retrieve(conv.id).id == conv.id
    client.conversations.delete(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL_NAME, input="x", conversation=conv.id)


def _short() -> dict:
    return {"max_output_tokens": 4}


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    health = httpx.get(server.base_url + "/healthz").json()
    assert health["status"] == "ok" and health["dev_mode"] is True
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "rxt_time_to_first_token_seconds_bucket",
        "rxt_generated_tokens_total",
        "rxt_turn_tokens_per_second_bucket",
        "rxt_memory_update_latency_seconds_bucket",
        "rxt_queue_depth",
        "rxt_active_conversations",
        "rxt_state_commit_seconds_bucket",
    ):
        assert name in text, name


# ----------------------------------------------------------------------------- ordering
def test_update_runs_after_done_and_next_turn_waits_for_it(model, tmp_path, engine):
    """With a slow memory update, [DONE] arrives long before the update ends, and the next
    turn on that conversation waits for it (it answers from the updated memory)."""
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(tmp_path / "s.db"))
    original = model.update_memory
    delay = 0.6

    def slow_update(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)

    model.update_memory = slow_update
    try:
        with LiveServer(model, settings) as live:
            client = openai.OpenAI(api_key="x", base_url=live.base_url + "/v1", max_retries=0)
            started = time.perf_counter()
            stream = client.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "user", "content": "My cat is Tom."}],
                stream=True,
                extra_body={"conversation_id": "slow"},
                **GREEDY,
            )
            first = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            done_after = time.perf_counter() - started
            second, _ = chat(
                client,
                [{"role": "user", "content": "Who is Tom?"}],
                extra_body={"conversation_id": "slow"},
            )
            waited = time.perf_counter() - started
            state = initial_state(live, "slow")
    finally:
        del model.update_memory
    assert done_after < delay  # the stream ended before the update could have finished
    assert waited > delay  # the second turn waited for it
    direct = engine.conversation(state=state)
    assert direct.ask("My cat is Tom.", max_new_tokens=6).text == first
    assert direct.ask("Who is Tom?", max_new_tokens=6).text == second.choices[0].message.content


def test_concurrent_turns_on_one_conversation_are_serialised(server, client):
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            chat(
                client,
                [{"role": "user", "content": f"message {i}"}],
                extra_body={"conversation_id": "busy"},
            )
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    wait_version(server, "busy", 6)
    turns = server.store.turns(OWNER, "busy")
    assert [t["turn"] for t in turns] == list(range(1, 7))
    assert sorted(t["user"] for t in turns) == sorted(f"message {i}" for i in range(6))


# ----------------------------------------------------------------------------- security, limits
def test_api_keys_isolate_owners(model, tmp_path):
    keys = KeyRing([digest("key-alice-123"), digest("key-bob-4567")])
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(tmp_path / "k.db"))
    with LiveServer(model, settings, keys) as live:
        url = live.base_url + "/v1"
        alice = openai.OpenAI(api_key="key-alice-123", base_url=url, max_retries=0)
        bob = openai.OpenAI(api_key="key-bob-4567", base_url=url, max_retries=0)
        nobody = openai.OpenAI(api_key="wrong-key-000", base_url=url, max_retries=0)
        r = alice.responses.create(model=MODEL_NAME, input="mine", max_output_tokens=2)
        conv = alice.conversations.create()
        with pytest.raises(openai.AuthenticationError):
            nobody.models.list()
        assert httpx.get(url + "/models").status_code == 401
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(
                model=MODEL_NAME, input="x", previous_response_id=r.id, max_output_tokens=2
            )
        with pytest.raises(openai.NotFoundError):
            bob.conversations.retrieve(conv.id)
        with pytest.raises(openai.NotFoundError):
            bob.conversations.delete(conv.id)
        assert alice.conversations.retrieve(conv.id).id == conv.id
        assert alice.responses.retrieve(r.id).id == r.id


def test_key_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "keys.txt"
    path.write_text(f"# ops keys\nsecret-key-1\nsha256:{digest('secret-key-2')}\n")
    monkeypatch.setenv("RXT_API_KEYS", "env-key-333")
    ring = KeyRing.load(path)
    assert len(ring) == 3 and not ring.dev_mode
    owners = {ring.owner(f"Bearer {k}") for k in ("secret-key-1", "secret-key-2", "env-key-333")}
    assert None not in owners and len(owners) == 3
    assert ring.owner("Bearer nope-nope-nope") is None and ring.owner(None) is None
    assert ring.owner("Basic secret-key-1") is None
    bad = tmp_path / "bad.txt"
    bad.write_text("ok-key-1234\nsha256:xyz\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        KeyRing.load(bad)
    with pytest.raises(ValueError, match="no keys"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        KeyRing.load(tmp_path / "empty.txt")


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"]
    return error


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
        ({"model": MODEL_NAME}, 400, "messages"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": MODEL_NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, None),
        ({"model": MODEL_NAME, "messages": [{"role": "assistant", "content": "x"}]}, 400, None),
        (
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 2001}]},
            400,
            "messages.0.content",
        ),
        (
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}] * 41},
            400,
            "messages",
        ),
        (
            {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 999,
            },
            400,
            "max_tokens",
        ),
        (
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "n": 2},
            400,
            "n",
        ),
        (
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "stop": ["a"]},
            400,
            "stop",
        ),
        (
            {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
            },
            400,
            "messages.0.content.0",
        ),
    ],
)
def test_bad_chat_requests_get_openai_errors(server, body, status, param):
    error = _error(httpx.post(server.base_url + "/v1/chat/completions", json=body), status)
    if param is not None:
        assert error["param"] == param


def test_body_limits_and_unknown_ids(server):
    url = server.base_url
    big = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 70_000}]}
    _error(httpx.post(url + "/v1/chat/completions", json=big), 413)
    chunked = httpx.post(
        url + "/v1/chat/completions",
        content=iter([b'{"model": "x", "messages": [', b" " * 70_000, b"]}"]),
        headers={"content-type": "application/json"},
    )
    _error(chunked, 413)
    _error(
        httpx.post(
            url + "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        400,
    )
    _error(httpx.get(url + "/v1/responses/resp_nope"), 404)
    _error(httpx.delete(url + "/v1/conversations/nope"), 404)
    _error(httpx.get(url + "/v1/conversations/nope/items"), 404)
    _error(httpx.get(url + "/v1/nothing-here"), 404)
    both = {"input": "x", "previous_response_id": "resp_1", "conversation": "c"}
    _error(httpx.post(url + "/v1/responses", json=both), 400)
    _error(httpx.post(url + "/v1/responses", json={"input": [{"type": "function_call"}]}), 400)
    error = _error(
        httpx.post(url + "/v1/responses", json={"input": "x", "temperature": "hot"}), 400
    )
    assert error["param"] == "temperature"


def test_store_failures_are_503_with_the_reason(server, client, monkeypatch):
    """A store that fails (database locked, Redis down) gives 503 naming it, never a 500 or a
    dropped stream; the next request works once the store does."""
    import sqlite3

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(server.store, "get_conversation", locked)
    error = _error(httpx.get(server.base_url + "/v1/conversations/anything"), 503)
    assert "database is locked" in error["message"]
    monkeypatch.undo()
    monkeypatch.setattr(server.store, "bind_many", locked)  # sealing the turn fails
    with pytest.raises(openai.InternalServerError, match="state store is unavailable"):
        chat(client, [{"role": "user", "content": "seal fails"}])
    monkeypatch.undo()
    assert chat(client, [{"role": "user", "content": "works again"}])[0].choices


def test_serve_command_reports_bad_arguments_in_one_line(tmp_path, capsys):
    from rxt.cli import main

    store = str(tmp_path / "s.db")
    cases = [
        (["serve", str(tmp_path / "missing"), "--store", store], "no such model directory"),
        (["serve", str(tmp_path), "--store", "redis://127.0.0.1:1/0"], "--store redis://"),
        (["serve", str(tmp_path), "--store", "ftp://x"], "unsupported state store URL"),
        (["serve", str(tmp_path), "--api-keys", str(tmp_path / "none.txt")], "API keys file"),
        (["serve", str(tmp_path), "--store", store, "--max-messages", "0"], "max_messages"),
        (["serve", str(tmp_path), "--data-dir", str(tmp_path / "blocker" / "x")], "--data-dir"),
    ]
    (tmp_path / "blocker").write_text("a file, not a directory")
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("rxt serve: error:") and expected in err, err
        assert err.count("\n") == 1  # one line, no traceback


def test_serve_keeps_its_default_store_in_the_data_dir(tmp_path, monkeypatch):
    from rxt.cli import build_parser
    from rxt.cli.serve import ServeOptions, build_app

    model_dir = save_small_model(tmp_path / "model")
    monkeypatch.delenv("RXT_DATA_DIR", raising=False)
    args = build_parser().parse_args(["serve", str(model_dir), "--data-dir", str(tmp_path / "d")])
    options = {k: v for k, v in vars(args).items() if k != "command"}
    app = build_app(ServeOptions(**options))
    assert app.state.settings.store_url == str(tmp_path / "d" / "state.db")
    assert app.state.settings.model_name == "model"  # the directory's name


def test_idle_conversations_expire(model, tmp_path):
    """With a TTL the server drops idle conversations itself (SQLite has no expiry)."""
    settings = ServerSettings(
        model_name=MODEL_NAME, store_url=str(tmp_path / "ttl.db"), ttl_seconds=0.5
    )
    with LiveServer(model, settings) as live:
        client = openai.OpenAI(api_key="x", base_url=live.base_url + "/v1", max_retries=0)
        r = client.responses.create(model=MODEL_NAME, input="short-lived", max_output_tokens=2)
        conversation = wait_lookup(live, r.id)[0]
        deadline = time.monotonic() + 20
        while live.store.get_conversation(OWNER, conversation) is not None:
            assert time.monotonic() < deadline, "never purged"
            time.sleep(0.05)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
