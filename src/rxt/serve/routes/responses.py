"""``/v1/responses``: the stateful OpenAI API, where the server keeps the conversation.

Every stored response id is an alias of the STM version written after its turn, so
``previous_response_id`` continues from that memory in constant time, and continuing from an
older response forks the conversation (a new conversation starting from that version) for free.
``conversation`` appends to a conversation made with ``POST /v1/conversations``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rxt.serve import openai_format as fmt
from rxt.serve.errors import APIError, bad_request, not_found
from rxt.serve.routes.chat import check_model, sampling_of, turn_headers
from rxt.serve.schemas import ResponseRequest
from rxt.serve.service import TurnService
from rxt.serve.settings import Limits
from rxt.serve.transcript import Transcript, content_text, parse_messages
from rxt.serve.turn import ActiveTurn, FromConversation, FromKey, NewConversation, TurnSpec

router = APIRouter()
RESPONSE_KEY = "resp:"


def input_messages(value: str | list[dict[str, Any]], limits: Limits) -> Transcript:
    """The ``input`` field → system text, earlier turns and the new query."""
    if isinstance(value, str):
        return parse_messages([("user", value)], limits, param="input")
    messages = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        role = item.get("role")
        if kind != "message" or not isinstance(role, str):
            raise bad_request(
                f"input item {i} is not supported: only messages with a role can be read "
                f"by this model (got type {kind!r})",
                param=f"input.{i}",
            )
        messages.append((role, content_text(item.get("content"), f"input.{i}.content")))
    return parse_messages(messages, limits, param="input")


def response_view(rid: str, model: str, turn: dict[str, Any], status: str = "completed") -> dict:
    """A stored turn as the response object it was returned as."""
    meta = turn.get("response", {})
    return fmt.response_object(
        rid,
        model=meta.get("model", model),
        created=int(turn.get("created_at", 0)),
        status=status,
        text=turn.get("assistant"),
        finish=turn.get("finish_reason"),
        usage=turn.get("usage"),
        previous_response_id=meta.get("previous_response_id"),
        conversation_id=meta.get("conversation"),
        instructions=meta.get("instructions"),
        metadata=meta.get("metadata"),
        store=True,
        temperature=meta.get("temperature"),
        top_p=meta.get("top_p"),
        max_output_tokens=meta.get("max_output_tokens"),
    )


@router.post("/v1/responses")
async def create_response(body: ResponseRequest, request: Request):
    model = check_model(request, body.model)
    service: TurnService = request.app.state.service
    settings = request.app.state.settings
    owner = request.state.owner
    transcript = input_messages(body.input, settings.limits)
    instructions = body.instructions
    if transcript.system is not None:
        instructions = "\n".join(t for t in (instructions, transcript.system) if t)
    conversation_id = body.conversation_id
    previous = body.previous_response_id
    if previous and conversation_id:
        raise bad_request(
            "give previous_response_id or conversation, not both", param="previous_response_id"
        )
    if conversation_id and not body.store:
        raise bad_request("a turn of a conversation is always stored", param="store")
    if previous:
        start = FromKey(RESPONSE_KEY + previous, "response", previous, "previous_response_id")
    elif conversation_id:
        start = FromConversation(conversation_id)
    else:
        start = NewConversation(system=instructions, metadata=body.metadata or {})
    rid = fmt.new_id("resp_")
    record = {
        "response_id": rid,
        "response": {
            "model": model,
            "previous_response_id": previous,
            "conversation": conversation_id,
            "instructions": instructions,
            "metadata": body.metadata or {},
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
        },
    }
    spec = TurnSpec(
        owner=owner,
        query=transcript.query,
        sampling=sampling_of(body.temperature, body.top_p),
        max_tokens=body.max_output_tokens,
        api="responses",
        start=start,
        system=instructions if not isinstance(start, NewConversation) else None,
        replay=transcript.turns,
        keys=lambda reply: [RESPONSE_KEY + rid] if body.store else [],
        record=record,
        commit=body.store,
    )
    turn = await service.start(spec)

    def view(status: str, text: str | None = None) -> dict:
        result = turn.result() if text is not None else None
        usage = None
        if result is not None:
            usage = {
                "input_tokens": result.prompt_tokens,
                "output_tokens": len(result.token_ids),
            }
        return fmt.response_object(
            rid,
            model=model,
            created=turn.created,
            status=status,
            text=text,
            finish=result.finish_reason if result else None,
            usage=usage,
            previous_response_id=previous,
            conversation_id=conversation_id,
            instructions=instructions,
            metadata=body.metadata,
            store=body.store,
            temperature=body.temperature,
            top_p=body.top_p,
            max_output_tokens=body.max_output_tokens,
        )

    headers = turn_headers(turn)
    if not body.stream:
        text = "".join([piece async for piece in turn.text()])
        return JSONResponse(view("completed", text), headers=headers)
    return StreamingResponse(
        _events(turn, rid, view), media_type="text/event-stream", headers=headers
    )


async def _events(turn: ActiveTurn, rid: str, view):
    sequence = 0
    msg_id = "msg_" + rid[5:]
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        sequence += 1
        return fmt.sse({"type": kind, "sequence_number": sequence - 1, **fields}, event=kind)

    try:
        yield event("response.created", response=view("in_progress"))
        yield event("response.in_progress", response=view("in_progress"))
        item = fmt.output_message(msg_id, "", status="in_progress")
        yield event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", **where, part=part)
        pieces: list[str] = []
        try:
            async for text in turn.text():
                pieces.append(text)
                yield event("response.output_text.delta", **where, delta=text, logprobs=[])
        except APIError as exc:
            yield event("error", code=exc.code, message=exc.message, param=exc.param)
            return
        text = "".join(pieces)
        final = view("completed", text)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part={**part, "text": text})
        # The item as the final response holds it (``incomplete`` if cut at the limit).
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event(f"response.{final['status']}", response=final)
    finally:
        turn.abandon()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    service: TurnService = request.app.state.service
    turn = await _stored_turn(service, request.state.owner, response_id)
    return response_view(response_id, request.app.state.settings.model_name, turn)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    service: TurnService = request.app.state.service
    owner = request.state.owner
    await _stored_turn(service, owner, response_id)  # 404 if it is not there
    await service.run(service.store.unbind, owner, RESPONSE_KEY + response_id)
    return {"id": response_id, "object": "response", "deleted": True}  # as OpenAI answers


async def _stored_turn(service: TurnService, owner: str, response_id: str) -> dict[str, Any]:
    start = FromKey(RESPONSE_KEY + response_id, "response", response_id)
    cid, version = await service.resolve_key(owner, start)
    turn = await service.run(service.store.get_turn, owner, cid, version)
    if turn is None or turn.get("response_id") != response_id:
        raise not_found("response", response_id)
    return turn
