"""``/v1/conversations``: create (optionally from earlier items), read, list turns, delete.

A conversation is a chain of stored STM versions, one per turn. Its items (the messages of
every turn, a fork's inherited turns first) are kept as text beside the states for listing;
the model itself only ever reads the newest state.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request

from rxt.serve import openai_format as fmt
from rxt.serve.errors import APIError, bad_request, not_found
from rxt.serve.schemas import ConversationCreate
from rxt.serve.service import TurnService
from rxt.serve.store import MAX_ID_LEN, ConversationInfo
from rxt.serve.transcript import content_text, parse_messages

router = APIRouter()

# A conversation id in a path: visible ASCII, as the server makes them (``conv_…``) and as chat's
# ``conversation_id`` allows. Anything else is refused (400 naming the field) before the store
# is asked.
ConversationId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_ID_LEN,
        pattern=r"^[!-~]+$",
        description="a conversation id: 1-256 visible ASCII characters",
    ),
]


def conversation_object(info: ConversationInfo) -> dict:
    meta = info.metadata
    return {
        "id": info.conversation_id,
        "object": "conversation",
        "created_at": int(meta.get("created_at", info.created_at)),
        "metadata": meta.get("metadata") or {},
        "turns": info.latest_version,
        "forked_from": meta.get("forked_from"),
    }


async def conversation_info(request: Request, cid: str) -> ConversationInfo:
    """The caller's conversation ``cid``; 404 if it is missing or another key's."""
    service: TurnService = request.app.state.service
    info = await service.run(service.store.get_conversation, request.state.owner, cid)
    if info is None:
        raise not_found("conversation", cid)
    return info


async def stored_version(
    request: Request, cid: str, version: int | None
) -> tuple[ConversationInfo, int]:
    """The caller's conversation and one of its versions (None: the latest; 0: its start)."""
    info = await conversation_info(request, cid)
    if version is None:
        return info, info.latest_version
    if version > info.latest_version:
        raise APIError(
            404,
            f"conversation {cid!r} has no version {version}: its latest is {info.latest_version}",
            param="version",
            code="not_found",
        )
    return info, version


@router.post("/v1/conversations")
async def create_conversation(body: ConversationCreate, request: Request):
    service: TurnService = request.app.state.service
    limits = request.app.state.settings.limits
    metadata = body.metadata or {}
    system, turns = None, []
    if body.items:
        messages = []
        for i, item in enumerate(body.items):
            role = item.get("role")
            if item.get("type", "message") != "message" or not isinstance(role, str):
                raise bad_request(
                    f"item {i}: only messages with a role are supported", f"items.{i}"
                )
            messages.append((role, content_text(item.get("content"), f"items.{i}.content")))
        if messages[-1][0] not in ("assistant", "system", "developer"):
            raise bad_request(
                "items must end with an assistant message: every user message needs its answer "
                "(send a new user message with POST /v1/responses and this conversation)",
                param="items",
            )
        transcript = parse_messages([*messages, ("user", "")], limits, param="items")
        system, turns = transcript.system, transcript.turns
    cid = await service.seed(request.state.owner, system, metadata, turns)
    return conversation_object(await conversation_info(request, cid))


@router.get("/v1/conversations")
async def list_conversations(request: Request, limit: int = Query(20, ge=1, le=100)):
    service: TurnService = request.app.state.service
    found = await service.run(service.store.list_conversations, request.state.owner, limit)
    return {"object": "list", "data": [conversation_object(i) for i in found]}


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request):
    return conversation_object(await conversation_info(request, conversation_id))


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request):
    service: TurnService = request.app.state.service
    owner = request.state.owner
    if not await service.run(service.store.delete_conversation, owner, conversation_id):
        raise not_found("conversation", conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(
    conversation_id: str,
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = Query(None, max_length=64),
):
    """The conversation's messages, OpenAI's conversation-items list."""
    turns = await _turns(request, conversation_id)
    items = []
    for n, turn in enumerate(turns, 1):
        if turn.get("imported"):  # a memory loaded from a file: no messages to list
            continue
        items.append(fmt.message_item(f"msg_{n:06d}u", "user", turn.get("user", "")))
        items.append(fmt.message_item(f"msg_{n:06d}a", "assistant", turn.get("assistant", "")))
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"no item {after!r} in this conversation", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


@router.get("/v1/conversations/{conversation_id}/turns")
async def list_turns(conversation_id: str, request: Request):
    """rxt extension: every turn as stored (text, usage, finish reason, response id), oldest
    first, a fork's inherited turns included."""
    turns = await _turns(request, conversation_id)
    return {"object": "list", "data": turns}


async def _turns(request: Request, cid: str) -> list[dict]:
    await conversation_info(request, cid)
    service: TurnService = request.app.state.service
    return await service.run(service.history, request.state.owner, cid)
