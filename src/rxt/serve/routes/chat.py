"""``POST /v1/chat/completions``: whole transcripts in, only the new turn computed.

The longest turn-aligned prefix of the transcript that the server has stored a state for is
found by content hash (:func:`~rxt.serve.transcript.prefix_keys`); the turns after it, if any,
are replayed into memory once and stored; then only the last user message is decoded. A
conversation can also be named explicitly (``conversation_id`` in the body, or the
``X-RxT-Conversation-Id`` header): the server's memory is then its history, and only the last
message is read (earlier ones seed a conversation that has no turns yet).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rxt.engine import SamplingParams
from rxt.serve import openai_format as fmt
from rxt.serve.errors import APIError, bad_request
from rxt.serve.schemas import ChatCompletionRequest
from rxt.serve.service import TurnService
from rxt.serve.transcript import content_text, next_prefix_key, parse_messages, prefix_keys
from rxt.serve.turn import ActiveTurn, FromConversation, FromKey, NewConversation, TurnSpec

router = APIRouter()
CONVERSATION_HEADER = "X-RxT-Conversation-Id"


def sampling_of(temperature: float | None, top_p: float | None, **extra) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        **{k: v for k, v in extra.items() if v is not None},
    )


def check_model(request: Request, model: str | None) -> str:
    name = request.app.state.settings.model_name
    if model is not None and model != name:
        raise APIError(
            404, f"The model {model!r} does not exist; this server serves {name!r}.", param="model"
        )
    return name


def valid_conversation_id(value: str) -> bool:
    return 0 < len(value) <= 200 and all("!" <= c <= "~" for c in value)


def turn_headers(turn: ActiveTurn) -> dict[str, str]:
    return {
        CONVERSATION_HEADER: turn.conversation_id,
        "X-RxT-Turn": str(turn.turn),
    }


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    model = check_model(request, body.model)
    service: TurnService = request.app.state.service
    limits = request.app.state.settings.limits
    owner = request.state.owner
    messages = [
        (m.role, content_text(m.content, f"messages.{i}.content"))
        for i, m in enumerate(body.messages)
    ]
    transcript = parse_messages(messages, limits)
    keys = prefix_keys(transcript.system, transcript.turns)
    conversation_id = body.conversation_id or request.headers.get(CONVERSATION_HEADER)
    if conversation_id is not None and not valid_conversation_id(conversation_id):
        raise bad_request(
            "a conversation id must be 1 to 200 visible ASCII characters (no spaces)",
            param="conversation_id",
        )
    found = 0
    if conversation_id:
        start = FromConversation(conversation_id, create=True, system=transcript.system)
    else:
        found = await service.run(service.longest_prefix, owner, keys)
        service.metrics.prefix.labels("hit" if found else "miss").inc()
        if found:
            start = FromKey(keys[found], "transcript prefix", keys[found])
        else:
            start = NewConversation(system=transcript.system)
    last_key = keys[-1]
    spec = TurnSpec(
        owner=owner,
        query=transcript.query,
        sampling=sampling_of(
            body.temperature,
            body.top_p,
            seed=body.seed,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
        ),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        api="chat",
        start=start,
        replay=transcript.turns[found:],
        replay_keys=[[k] for k in keys[found + 1 :]],
        keys=lambda reply: [next_prefix_key(last_key, transcript.query, reply)],
    )
    try:
        turn = await service.start(spec)
    except APIError as exc:
        if exc.status != 404 or not isinstance(start, FromKey):
            raise
        # The prefix's state vanished between lookup and use (deleted, pruned): rebuild it.
        spec.start = NewConversation(system=transcript.system)
        spec.replay, spec.replay_keys = transcript.turns, [[k] for k in keys[1:]]
        turn = await service.start(spec)
    completion_id = fmt.new_id("chatcmpl-")
    headers = turn_headers(turn)
    if not body.stream:
        text = "".join([piece async for piece in turn.text()])
        result = turn.result()
        usage = fmt.chat_usage(result.prompt_tokens, len(result.token_ids))
        payload = fmt.chat_completion(
            completion_id, model, turn.created, text, result.finish_reason, usage
        )
        return JSONResponse(payload, headers=headers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _stream(turn, completion_id, model, include_usage),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache"},
    )


async def _stream(turn: ActiveTurn, completion_id: str, model: str, include_usage: bool):
    def chunk(delta: dict, finish: str | None = None) -> str:
        return fmt.sse(fmt.chat_chunk(completion_id, model, turn.created, delta, finish))

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for text in turn.text():
                yield chunk({"content": text})
        except APIError as exc:
            yield fmt.sse(exc.body())
            yield fmt.sse("[DONE]")
            return
        result = turn.result()
        yield chunk({}, result.finish_reason)
        if include_usage:
            usage = fmt.chat_usage(result.prompt_tokens, len(result.token_ids))
            final = fmt.chat_chunk(
                completion_id, model, turn.created, {}, usage=usage, choices=False
            )
            yield fmt.sse(final)
        yield fmt.sse("[DONE]")
    finally:
        turn.abandon()  # a no-op after the end; stops generating if the client went away
