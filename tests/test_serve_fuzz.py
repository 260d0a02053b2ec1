"""Fuzz the server's OpenAPI schema: no request, however malformed, gets a 5xx.

Schemathesis generates requests for every operation in ``/openapi.json`` — valid ones, and in
its negative mode invalid ones — and sends them to a live server. Every answer must be below
500; every 4xx must be an OpenAI-style error object ``{"error": {"message", "type", "param",
"code"}}`` (what the ``openai`` package parses); every event stream must end as a stream of
its API does, without an error event. Afterwards the server must still be healthy, with no
turn whose state failed to be stored.

Requests generated from the schema alone rarely get past the first check (a random model name
is a 404, a random role a 400), so two thirds of the examples are *steered* (see
:func:`steer`): the served model named, path ids aimed at objects that exist, and for some a
well-formed transcript. That way the fuzzer also reaches generation, replay, forks and
deletion. Inputs that Hypothesis's string generation does not produce (lone UTF-16
surrogates, header-unsafe ids, oversized bodies) are a fixed corpus below.

Hypothesis runs derandomized (the same examples on every run) without an example database;
the model is tiny and answers are capped at a few tokens, so the whole module takes seconds.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from rxt.serve.settings import Limits, ServerSettings  # noqa: E402
from serve_support import (  # noqa: E402
    CONVERSATION_HEADER,
    MODEL_NAME,
    LiveServer,
    small_model,
    sse_events,
)

EXAMPLES_PER_OPERATION = 30
MAX_OUTPUT_TOKENS = 8  # this server's cap on an answer: fuzzed turns stay cheap
MAX_BODY_BYTES = 64 * 1024
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
ERROR_FIELDS = {"message", "type", "param", "code"}


class OneLineErrors(logging.Filter):
    """Log a server-side exception as one line (type, message, innermost frame), not as a
    formatted traceback. Python 3.11 formats tracebacks with ``ast.parse`` (for the ^^^ carets),
    and the ``_ast`` module's recursion counter is shared between threads: a traceback formatted
    in the server's thread while pytest parses a test's source for a failure report can make
    pytest die with ``SystemError: AST constructor recursion depth mismatch`` (INTERNALERROR)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
            detail = f" [{type(exc).__name__}: {exc}{where}]".replace("%", "%%")
            record.msg = str(record.msg) + detail
            record.exc_info = None
        return True


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    one_line = OneLineErrors()
    loggers = [logging.getLogger(name) for name in ("rxt.serve", "uvicorn.error")]
    for logger in loggers:
        logger.addFilter(one_line)
    try:
        yield from _live_server(tmp_path_factory)
    finally:
        for logger in loggers:
            logger.removeFilter(one_line)


def _live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = Path(tmp_path_factory.mktemp("fuzz")) / "state.db"
    server_settings = ServerSettings(
        model_name=MODEL_NAME,
        store_url=str(store),
        default_max_tokens=4,
        limits=Limits(max_output_tokens=MAX_OUTPUT_TOKENS, max_body_bytes=MAX_BODY_BYTES),
    )
    with LiveServer(small_model(), server_settings) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(live: LiveServer):
    return schemathesis.openapi.from_url(live.base_url + "/openapi.json")


# ---------------------------------------------------------------------------- checks
def assert_error_object(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def assert_complete_stream(path: str, text: str) -> None:
    """A 200 event stream ran to its end: no error event, the API's closing event last."""
    events = sse_events(text)
    assert events, text
    for name, data in events:
        assert name != "error", text
        assert data == "[DONE]" or "error" not in json.loads(data), text
    if path == "/v1/chat/completions":
        assert events[-1][1] == "[DONE]", text
    else:  # "incomplete" when the answer ran to max_output_tokens
        assert events[-1][0] in ("response.completed", "response.incomplete"), text


def check_response_shape(ctx: Any, response: Any, case: Any) -> None:
    """Schemathesis check: 4xx bodies are OpenAI error objects; streams are complete."""
    if 400 <= response.status_code < 500:
        assert_error_object(json.loads(response.content))
    elif response.status_code == 200:
        content_type = response.headers.get("content-type", [""])[0]
        if content_type.startswith("text/event-stream"):
            assert_complete_stream(case.operation.path, response.content.decode())
    return None


def assert_server_sound(base_url: str) -> None:
    """The server still answers, and no turn's state failed to be stored."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        metrics = client.get("/metrics").text
    failures = [
        line for line in metrics.splitlines() if line.startswith("rxt_state_commit_failures_total")
    ]
    assert failures == ["rxt_state_commit_failures_total 0.0"], failures


# ---------------------------------------------------------------------------- steering
def existing_ids(base_url: str) -> dict[str, str]:
    """A conversation with two turns and a stored response, to aim path parameters at."""
    items = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine"},
    ]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        conv = client.post("/v1/conversations", json={"items": items})
        assert conv.status_code == 200, conv.text
        resp = client.post(
            "/v1/responses", json={"input": "hello", "max_output_tokens": 2, "temperature": 0}
        )
        assert resp.status_code == 200, resp.text
    return {
        "conversation_id": conv.json()["id"],
        "response_id": resp.json()["id"],
        "model_id": MODEL_NAME,
    }


def steer(case: Any, ids: dict[str, str], level: int) -> None:
    """Make a generated case likelier to get past the first checks. Level 0 leaves it as
    generated; level 1 names the served model, makes the last message the user's and aims ids
    at existing objects; level 2 also drops unsupported fields, caps the answer and makes the
    messages a well-formed transcript of text."""
    if level == 0:
        return
    for name in list(case.path_parameters or {}):
        if name in ids:
            case.path_parameters[name] = ids[name]
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body or case.operation.path == "/v1/chat/completions":
        body["model"] = MODEL_NAME
    messages = body.get("messages")
    if isinstance(messages, list):
        if not messages or not isinstance(messages[-1], dict):
            messages.append({"role": "user", "content": "hello"})
        messages[-1]["role"] = "user"
    if isinstance(body.get("previous_response_id"), str):
        body["previous_response_id"] = ids["response_id"]
    if isinstance(body.get("conversation"), str):
        body["conversation"] = ids["conversation_id"]
    if level == 1:
        return
    for unsupported in ("stop", "frequency_penalty", "presence_penalty", "n"):
        body.pop(unsupported, None)
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(name), int | float):
            body[name] = max(1, min(int(body[name]), MAX_OUTPUT_TOKENS))
    if isinstance(messages, list):  # a well-formed transcript: user, assistant, ..., user
        body["messages"] = [
            {
                "role": "user" if (len(messages) - i) % 2 else "assistant",
                "content": m.get("content") if isinstance(m.get("content"), str) else str(i),
            }
            for i, m in enumerate(messages)
            if isinstance(m, dict)
        ]
    if isinstance(body.get("input"), list):
        body["input"] = "hello"


# ---------------------------------------------------------------------------- the fuzzer
def fuzz(
    operation: Any, mode: GenerationMode, base_url: str, ids: dict[str, str], seen: Counter
) -> None:
    """Send ``EXAMPLES_PER_OPERATION`` generated requests (shrinking any that fails) and
    check every answer; ``seen`` counts the statuses."""

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode), level=st.sampled_from([0, 1, 2]))
    def run(case: Any, level: int) -> None:
        steer(case, ids, level)
        response = case.call(base_url=base_url, timeout=60)
        seen[response.status_code] += 1
        case.validate_response(
            response, checks=[not_a_server_error], additional_checks=[check_response_shape]
        )

    run()


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value
)
def test_fuzz_no_server_errors(api_schema, live: LiveServer, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/responses", "POST /v1/conversations"} <= labels
    assert len(operations) >= 14, sorted(labels)
    if mode is GenerationMode.NEGATIVE:
        # Only a JSON body or a constrained query parameter can be made invalid: any bytes are
        # a valid binary body (a state file to import), most path ids are any string, and an
        # operation without parameters has nothing to break. (The memory and state routes'
        # malformed ids are tested in test_serve_memory.py.)
        operations = [op for op in operations if op.query or any(_json(b) for b in op.body)]
    failures: dict[str, BaseException] = {}
    statuses: dict[str, Counter] = {}
    for operation in operations:
        ids = existing_ids(live.base_url)  # afresh: a DELETE may have removed the last ones
        seen = statuses.setdefault(operation.label, Counter())
        try:
            fuzz(operation, mode, live.base_url, ids, seen)
        except Exception as exc:  # every operation is fuzzed; all failures reported together
            failures[operation.label] = exc
    summary = {label: dict(count) for label, count in statuses.items()}
    report = "\n\n".join(f"{label}:\n{exc}" for label, exc in failures.items())
    assert not failures, f"{report}\n\nstatuses: {summary}"
    if mode is GenerationMode.POSITIVE:
        # The steering works: valid turns were answered by both generation endpoints.
        for label in ("POST /v1/chat/completions", "POST /v1/responses"):
            assert summary[label].get(200, 0) > 0, summary
    assert_server_sound(live.base_url)


def _json(body: Any) -> bool:
    return body.media_type == "application/json"


# ---------------------------------------------------------------------------- a fixed corpus
SURROGATE = "\ud800"  # valid JSON ("\ud800"), but no UTF-8 encoding: tokenizers, SQLite refuse
CHAT = "/v1/chat/completions"


def chat(content: Any = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        **extra,
    }


HOSTILE_JSON: dict[str, tuple[str, dict[str, Any]]] = {
    "chat-content-surrogate": (CHAT, chat(SURROGATE)),
    "chat-text-part-surrogate": (CHAT, chat([{"type": "text", "text": "a" + SURROGATE}])),
    "chat-system-surrogate": (
        CHAT,
        {**chat(), "messages": [{"role": "system", "content": SURROGATE}, chat()["messages"][0]]},
    ),
    "chat-earlier-turn-surrogate": (
        CHAT,
        {
            **chat(),
            "messages": [
                {"role": "user", "content": SURROGATE},
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": "y"},
            ],
        },
    ),
    "chat-stream-surrogate": (CHAT, chat(SURROGATE, stream=True)),
    "responses-input-surrogate": ("/v1/responses", {"input": SURROGATE, "max_output_tokens": 2}),
    "responses-input-item-surrogate": (
        "/v1/responses",
        {"input": [{"role": "user", "content": SURROGATE}], "max_output_tokens": 2},
    ),
    "responses-instructions-surrogate": (
        "/v1/responses",
        {"input": "hi", "instructions": SURROGATE, "max_output_tokens": 2},
    ),
    "responses-conversation-surrogate": (
        "/v1/responses",
        {"input": "hi", "conversation": SURROGATE, "max_output_tokens": 2},
    ),
    "responses-conversation-ref-surrogate": (
        "/v1/responses",
        {"input": "hi", "conversation": {"id": SURROGATE}, "max_output_tokens": 2},
    ),
    "conversations-item-surrogate": (
        "/v1/conversations",
        {"items": [{"role": "user", "content": SURROGATE}, {"role": "assistant", "content": "x"}]},
    ),
    "conversations-metadata-surrogate": ("/v1/conversations", {"metadata": {"k": SURROGATE}}),
    # The conversation id is echoed in a response header, where only latin-1 without control
    # characters can go: anything else must be refused (or encoded), never a 500.
    "chat-id-latin1": (CHAT, chat(conversation_id="café")),
    "chat-id-hangul": (CHAT, chat(conversation_id="대화")),
    "chat-id-emoji": (CHAT, chat(conversation_id="conv-\U0001f600")),
    "chat-id-newline": (CHAT, chat(conversation_id="a\nInjected: 1")),
    "chat-id-nul": (CHAT, chat(conversation_id="a\x00b")),
    "chat-id-hangul-stream": (CHAT, chat(conversation_id="대화-stream", stream=True)),
}


def raw_post(path: str, content: bytes, content_type: str = "application/json"):
    return path, content, content_type


HOSTILE_RAW: dict[str, tuple[str, bytes, str]] = {
    "not-json": raw_post(CHAT, b"{not json"),
    "json-array": raw_post(CHAT, b"[1, 2]"),
    "json-null": raw_post("/v1/responses", b"null"),
    "empty-body": raw_post("/v1/conversations", b""),
    "invalid-utf8": raw_post(CHAT, b'{"model": "rxt-test", "messages": "\xff\xfe"}'),
    "nan-temperature": raw_post(
        CHAT,
        b'{"model": "rxt-test", "messages": [{"role": "user", "content": "hi"}], '
        b'"temperature": NaN}',
    ),
    "huge-integer": raw_post(
        CHAT,
        b'{"model": "rxt-test", "messages": [{"role": "user", "content": "hi"}], '
        b'"max_tokens": ' + b"9" * 5000 + b"}",
    ),
    "deep-nesting": raw_post(
        "/v1/conversations", b'{"metadata": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    ),
    "text-plain": raw_post("/v1/responses", b'{"input": "hi"}', "text/plain"),
    "over-body-limit": raw_post(CHAT, b" " * (MAX_BODY_BYTES + 1)),
}


def assert_answered_sanely(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert_error_object(response.json())
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert_complete_stream(str(response.request.url.path), response.text)


@pytest.mark.parametrize("name", list(HOSTILE_JSON))
def test_hostile_json_is_refused_cleanly(live: LiveServer, name: str) -> None:
    path, body = HOSTILE_JSON[name]
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as "\ud800"
    with httpx.Client(base_url=live.base_url, timeout=60) as client:
        try:
            response = client.post(path, content=raw, headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:  # a dropped connection is as bad as a 500
            pytest.fail(f"{name}: no HTTP answer ({type(exc).__name__}: {exc})")
    assert_answered_sanely(response)
    if response.status_code == 200 and body.get("conversation_id"):
        header = response.headers.get(CONVERSATION_HEADER)
        assert header, "a turn of a named conversation names it in its header"
    assert_server_sound(live.base_url)


@pytest.mark.parametrize("name", list(HOSTILE_RAW))
def test_hostile_bytes_are_refused_cleanly(live: LiveServer, name: str) -> None:
    path, content, content_type = HOSTILE_RAW[name]
    with httpx.Client(base_url=live.base_url, timeout=60) as client:
        response = client.post(path, content=content, headers={"content-type": content_type})
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert_error_object(response.json())


def test_chunked_body_over_the_limit_is_413(live: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    with httpx.Client(base_url=live.base_url, timeout=60) as client:
        response = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert_error_object(response.json())
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/conversations/%ED%A0%80",  # a UTF-8-encoded surrogate
        "/v1/conversations/%00/items",
        "/v1/conversations/%0A/turns",
        "/v1/responses/%FF",
        "/v1/models/%ED%A0%80",
        "/v1/conversations/x/items?after=%ED%A0%80&order=asc",
        "/v1/conversations?limit=1e3",
    ],
)
def test_hostile_paths_are_refused_cleanly(live: LiveServer, path: str) -> None:
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        for method in ("GET", "DELETE"):
            response = client.request(method, path)
            assert 400 <= response.status_code < 500, (method, response.status_code)
            assert_error_object(response.json())
