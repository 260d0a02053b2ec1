"""Every body and stream event the server sends, validated with the ``openai`` package's types.

The ``openai`` client parses responses without validating them (a missing field only shows up
later, as ``None`` or an ``AttributeError`` in someone's code), so these tests read the raw
HTTP bodies and SSE events and validate each with ``pydantic.TypeAdapter(<openai type>)`` in
strict mode: a required field missing, a wrong type or an unknown ``type`` discriminator fails.
Fields the type does not declare are reported too, and only the rxt extensions named here are
allowed (pydantic would otherwise accept any extra field silently).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import pydantic
import pytest
from openai.pagination import SyncConversationCursorPage, SyncPage
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.conversations import (
    Conversation,
    ConversationDeletedResource,
    ConversationItem,
    ConversationItemList,
)
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.shared import ErrorObject

from rxt.serve import openai_format as fmt
from rxt.serve.auth import KeyRing, digest
from rxt.serve.settings import Limits, ServerSettings
from serve_support import MODEL_NAME, LiveServer, small_model, sse_events

KEY = "types-test-key-1"
MAX_BODY = 16 * 1024
# rxt extensions of the conversation object (documented in docs/serving.md).
CONVERSATION_EXTENSIONS = frozenset({"turns", "forked_from"})
# OpenAI's response object carries `store`; the package's Response type does not declare it.
RESPONSE_EXTRAS = frozenset({"store"})
EVENT_EXTRAS = frozenset({"response.store"})


class ResponseDeleted(pydantic.BaseModel):
    """``DELETE /v1/responses/{id}``. The openai package has no type for it (its client returns
    ``None``); this is the body OpenAI's API reference shows."""

    model_config = pydantic.ConfigDict(extra="forbid")
    id: str
    object: Literal["response"]
    deleted: bool


class ErrorBody(pydantic.BaseModel):
    """OpenAI's error envelope: ``{"error": ErrorObject}`` and nothing else."""

    model_config = pydantic.ConfigDict(extra="forbid")
    error: ErrorObject


_ADAPTERS: dict[Any, pydantic.TypeAdapter] = {}


def _adapter(kind: Any) -> pydantic.TypeAdapter:
    # Building the adapter of a big union (ResponseStreamEvent) takes a while: build it once.
    key = repr(kind)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = pydantic.TypeAdapter(kind)
    return _ADAPTERS[key]


def undeclared(value: Any, path: str = "") -> list[str]:
    """The paths of fields a validated value holds that its type does not declare (list
    indices written ``*``, so one allowance covers every item)."""
    if isinstance(value, pydantic.BaseModel):
        found = [f"{path}{name}" for name in value.model_extra or {}]
        for name in type(value).model_fields:
            found += undeclared(getattr(value, name), f"{path}{name}.")
        return found
    if isinstance(value, list | tuple):
        return [p for item in value for p in undeclared(item, f"{path}*.")]
    if isinstance(value, dict):
        return [p for k, item in value.items() for p in undeclared(item, f"{path}{k}.")]
    return []


def check(kind: Any, raw: str | bytes, extensions: frozenset[str] = frozenset()) -> Any:
    """``raw`` (JSON) validated strictly as ``kind``, with no undeclared field but
    ``extensions``."""
    value = _adapter(kind).validate_json(raw, strict=True)
    extra = set(undeclared(value)) - extensions
    name = getattr(kind, "__name__", "ResponseStreamEvent")
    assert not extra, f"{name}: fields the openai type does not declare: {sorted(extra)}"
    return value


def check_response(raw: str | bytes) -> Response:
    return check(Response, raw, RESPONSE_EXTRAS)


def ok(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.content


def check_error(response: httpx.Response, status: int) -> ErrorObject:
    assert response.status_code == status, response.text
    return check(ErrorBody, response.content).error


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    store = tmp_path_factory.mktemp("types") / "state.db"
    limits = Limits(max_body_bytes=MAX_BODY, max_messages=8, max_message_chars=500)
    settings = ServerSettings(model_name=MODEL_NAME, store_url=str(store), limits=limits)
    with LiveServer(small_model(), settings, KeyRing([digest(KEY)])) as live:
        yield live


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
        yield client


def chat_body(**extra: Any) -> dict:
    messages = [{"role": "user", "content": "Hello there."}]
    return {"model": MODEL_NAME, "messages": messages, "temperature": 0, "max_tokens": 4, **extra}


def response_body(**extra: Any) -> dict:
    return {"model": MODEL_NAME, "input": "Hi.", "temperature": 0, "max_output_tokens": 4, **extra}


def stream(http: httpx.Client, path: str, body: dict) -> list[tuple[str | None, str]]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_events(response.text)


# ----------------------------------------------------------------------------- the checker
def test_the_checker_fails_on_a_missing_required_field_or_an_extra_one(http):
    """Not vacuous: the same body minus a required field, or plus an unknown one, fails."""
    body = ok(http.post("/v1/responses", json=response_body()))
    check_response(body)
    data = json.loads(body)
    del data["usage"]["input_tokens_details"]["cache_write_tokens"]  # required in openai 3.57
    with pytest.raises(pydantic.ValidationError, match="cache_write_tokens"):
        check_response(json.dumps(data))
    data = json.loads(body)
    data["usage"]["surprise"] = 1
    with pytest.raises(AssertionError, match=r"usage\.surprise"):
        check_response(json.dumps(data))


# ----------------------------------------------------------------------------- models
def test_models(http):
    page = check(SyncPage[Model], ok(http.get("/v1/models")))
    assert page.object == "list" and [m.id for m in page.data] == [MODEL_NAME]
    assert check(Model, ok(http.get(f"/v1/models/{MODEL_NAME}"))).id == MODEL_NAME


# ----------------------------------------------------------------------------- chat completions
def test_chat_completion(http):
    completion = check(ChatCompletion, ok(http.post("/v1/chat/completions", json=chat_body())))
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None and completion.usage.completion_tokens >= 1


def test_chat_stream_chunks_with_usage(http):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    events = stream(http, "/v1/chat/completions", body)
    assert events[-1] == (None, "[DONE]")
    chunks = [check(ChatCompletionChunk, data) for name, data in events[:-1]]
    assert all(name is None for name, _ in events)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )


# ----------------------------------------------------------------------------- responses
def test_response_create_retrieve_delete(http, server):
    created = check_response(ok(http.post("/v1/responses", json=response_body())))
    # The random model runs to max_output_tokens, or stops at EOS: both must validate.
    assert created.status in ("completed", "incomplete")
    assert created.usage is not None  # (its text may be empty: some tokens decode to "")
    _wait_stored(server, created.id)
    retrieved = check_response(ok(http.get(f"/v1/responses/{created.id}")))
    assert retrieved.id == created.id and retrieved.output_text == created.output_text
    assert check(ResponseDeleted, ok(http.delete(f"/v1/responses/{created.id}"))).deleted
    check_error(http.get(f"/v1/responses/{created.id}"), 404)


def test_response_cut_at_its_limit_is_incomplete(http):
    body = response_body(max_output_tokens=1, store=False)
    response = check_response(ok(http.post("/v1/responses", json=body)))
    # Incomplete, unless the one token happened to be EOS (a random STM: rarely, not never).
    assert response.output[0].status == response.status
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None


@pytest.mark.parametrize(
    ("status", "finish", "text", "expected"),
    [
        ("in_progress", None, None, "in_progress"),  # response.created / in_progress events
        ("completed", "eos", "Hi!", "completed"),
        ("completed", "cancelled", "Hi", "completed"),
        ("completed", "length", "Hi", "incomplete"),
    ],
)
def test_every_response_state_the_server_builds(status, finish, text, expected):
    """Each way a response object is built, deterministically: the random live model almost
    never ends at EOS, so the ``completed`` answers are built here directly."""
    usage = None if text is None else {"input_tokens": 3, "output_tokens": 2}
    body = fmt.response_object(
        "resp_" + "0" * 24,
        model=MODEL_NAME,
        created=0,
        status=status,
        text=text,
        finish=finish,
        usage=usage,
        previous_response_id="resp_" + "1" * 24,
        conversation_id=None,
        instructions="Be brief.",
        metadata={"k": "v"},
        store=True,
        temperature=0.5,
        top_p=1,
        max_output_tokens=8,
    )
    response = check_response(json.dumps(body))
    assert response.status == expected
    assert [item.status for item in response.output] == ([] if text is None else [expected])


def test_response_stream_events(http):
    events = stream(http, "/v1/responses", response_body(stream=True))
    parsed = [check(ResponseStreamEvent, data, EVENT_EXTRAS) for _, data in events]
    assert [name for name, _ in events] == [e.type for e in parsed]  # `event:` is the type
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    kinds = [e.type for e in parsed]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    # No delta at all if every token decodes to "" (a random model's conversation may).
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert parsed[-1].response.output_text == parsed[-4].text


# ----------------------------------------------------------------------------- conversations
def test_conversation_objects_and_items(http, server):
    items = [
        {"type": "message", "role": "user", "content": "I have a parrot."},
        {"type": "message", "role": "assistant", "content": "Lovely!"},
    ]
    body = {"metadata": {"topic": "pets"}, "items": items}
    conv = check(
        Conversation, ok(http.post("/v1/conversations", json=body)), CONVERSATION_EXTENSIONS
    )
    turn = response_body(input="What pet?", conversation=conv.id)
    check_response(ok(http.post("/v1/responses", json=turn)))
    _wait_turns(server, conv.id, 2)
    url = f"/v1/conversations/{conv.id}"
    check(Conversation, ok(http.get(url)), CONVERSATION_EXTENSIONS)
    for params in ({"order": "asc"}, {"order": "desc", "limit": 3}):
        page = check(ConversationItemList, ok(http.get(url + "/items", params=params)))
        assert len(page.data) == params.get("limit", 4)
        assert page.has_more == ("limit" in params)
    after = {"order": "desc", "after": page.data[0].id}
    assert len(check(ConversationItemList, ok(http.get(url + "/items", params=after))).data) == 3
    listed_extensions = frozenset(f"data.*.{name}" for name in CONVERSATION_EXTENSIONS)
    listed = check(SyncPage[Conversation], ok(http.get("/v1/conversations")), listed_extensions)
    assert conv.id in [c.id for c in listed.data]
    assert check(ConversationDeletedResource, ok(http.delete(url))).deleted
    check_error(http.get(url), 404)


def test_empty_conversation_item_list(http):
    """An empty page has no first or last item: ``first_id``/``last_id`` are null, as in
    OpenAI's other cursor lists. The package's ``ConversationItemList`` declares them as
    strings, so the empty page is validated as the page type the client parses it into."""
    conv = check(Conversation, ok(http.post("/v1/conversations", json={})), CONVERSATION_EXTENSIONS)
    raw = ok(http.get(f"/v1/conversations/{conv.id}/items"))
    page_type = SyncConversationCursorPage[ConversationItem]
    page = check(page_type, raw, frozenset({"object", "first_id"}))
    assert page.data == [] and page.has_more is False and page.last_id is None
    assert json.loads(raw) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


# ----------------------------------------------------------------------------- errors
ERROR_CASES = [
    ("post", "/v1/chat/completions", {"json": {"model": MODEL_NAME}}, 400),
    ("post", "/v1/chat/completions", {"json": chat_body(n=2)}, 400),
    ("post", "/v1/chat/completions", {"json": chat_body(model="gpt-4")}, 404),
    ("post", "/v1/chat/completions", {"json": chat_body(max_tokens=99_999)}, 400),
    ("post", "/v1/chat/completions", {"content": b"{not json"}, 400),
    ("post", "/v1/chat/completions", {"content": b"x" * (MAX_BODY + 1)}, 413),
    ("post", "/v1/responses", {"json": {"input": [{"type": "function_call"}]}}, 400),
    ("post", "/v1/responses", {"json": response_body(previous_response_id="resp_nope")}, 404),
    ("get", "/v1/responses/resp_nope", {}, 404),
    ("delete", "/v1/responses/resp_nope", {}, 404),
    ("get", "/v1/conversations/nope", {}, 404),
    ("get", "/v1/conversations/nope/items", {}, 404),
    ("get", "/v1/conversations", {"params": {"limit": 0}}, 400),
    ("get", "/v1/models/gpt-4", {}, 404),
    ("get", "/v1/nothing-here", {}, 404),
    ("put", "/v1/models", {}, 405),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), ERROR_CASES)
def test_error_bodies(http, method, path, kwargs, status):
    headers = {"content-type": "application/json"} if "content" in kwargs else {}
    error = check_error(http.request(method, path, headers=headers, **kwargs), status)
    assert error.message and error.type


def test_missing_key_is_a_401_error_object(server):
    error = check_error(httpx.get(server.base_url + "/v1/models"), 401)
    assert error.code == "invalid_api_key"


def test_store_failures_are_error_objects_in_bodies_and_streams(http, server, monkeypatch):
    """A store failing while the turn is sealed: a 503 body, an error chunk in a chat stream,
    an ``error`` event in a Responses stream."""

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(server.store, "bind_many", locked)
    check_error(http.post("/v1/chat/completions", json=chat_body()), 503)
    events = stream(http, "/v1/chat/completions", chat_body(stream=True))
    assert events[-1] == (None, "[DONE]")
    check(ErrorBody, events[-2][1])
    for _, data in events[:-2]:
        check(ChatCompletionChunk, data)
    events = stream(http, "/v1/responses", response_body(stream=True))
    parsed = [check(ResponseStreamEvent, data, EVENT_EXTRAS) for _, data in events]
    assert [name for name, _ in events] == [e.type for e in parsed]
    assert parsed[-1].type == "error" and "database is locked" in parsed[-1].message


# ----------------------------------------------------------------------------- helpers
def _owner() -> str:
    return KeyRing([digest(KEY)]).owner(f"Bearer {KEY}")


def _wait_stored(server: LiveServer, response_id: str) -> None:
    _wait(lambda: server.store.lookup(_owner(), "resp:" + response_id))


def _wait_turns(server: LiveServer, conversation_id: str, turns: int) -> None:
    def stored() -> bool:
        info = server.store.get_conversation(_owner(), conversation_id)
        return info is not None and info.latest_version >= turns

    _wait(stored)


def _wait(condition) -> None:
    """Commits land after the response is sent: wait (briefly) for one."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, "never stored"
        time.sleep(0.01)
