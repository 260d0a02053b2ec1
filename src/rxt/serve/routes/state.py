"""A conversation's memory as a file: download a stored state, start a conversation from one.

``GET /v1/conversations/{id}/state`` returns a stored version's blob byte for byte: the STM as
safetensors, tagged with the model's fingerprint and a checksum — the format of
``Conversation.export_state`` and of ``rxt chat``'s ``/save``. ``POST /v1/conversations/import``
takes such a blob as the raw request body and starts a new conversation of the caller's key
whose memory it is (version 1, its turn marked ``imported``); the next turn continues it with
``conversation``. A blob saved by another model, truncated or altered is refused with 400
``invalid_state`` and the reason, before anything is stored.
"""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from rxt.engine import StateError
from rxt.engine.state import stm_from_bytes
from rxt.serve.errors import APIError, bad_request
from rxt.serve.routes.conversations import (
    ConversationId,
    conversation_info,
    conversation_object,
    stored_version,
)
from rxt.serve.service import TurnService
from rxt.serve.store import sha256_hex

router = APIRouter()

_BLOB = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.get(
    "/v1/conversations/{conversation_id}/state",
    response_class=Response,
    responses={200: {"content": _BLOB, "description": "the state, as safetensors bytes"}},
)
async def download_state(
    conversation_id: ConversationId,
    request: Request,
    version: int | None = Query(
        None, ge=0, description="the stored version to download (default: the latest)"
    ),
):
    service: TurnService = request.app.state.service
    owner = request.state.owner
    info, version = await stored_version(request, conversation_id, version)

    def blob() -> bytes:
        if version == 0:  # the starting memory is not stored: built as a turn would build it
            return service.load(owner, conversation_id, 0, info.metadata).export_state()
        stored = service.store.get_version(owner, conversation_id, version)
        if stored is None:
            raise APIError(
                404,
                f"conversation {conversation_id!r} version {version} is no longer stored "
                "(retention)",
                param="version",
                code="not_found",
            )
        return stored.state

    data = await service.run(blob)
    # Ids are visible ASCII, but quotes and slashes still do not belong in a file name.
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", conversation_id)
    headers = {
        "Content-Disposition": f'attachment; filename="{name}-v{version}.stm.safetensors"',
        "X-RxT-State-Version": str(version),
    }
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.post(
    "/v1/conversations/import",
    openapi_extra={"requestBody": {"required": True, "content": _BLOB}},
)
async def import_state(request: Request):
    service: TurnService = request.app.state.service
    owner = request.state.owner
    data = await request.body()
    if not data:
        raise bad_request(
            "the body is empty: send the bytes of an exported state (as GET "
            "/v1/conversations/{id}/state returns them)",
            code="invalid_state",
        )
    engine = service.engine
    try:
        _, meta = stm_from_bytes(
            data, fingerprint=engine.fingerprint, shape=engine.model.config.stm_shape
        )
    except StateError as exc:
        raise bad_request(f"this state cannot be used: {exc}", code="invalid_state") from exc
    turns = meta.get("turns", "")
    record = {
        "turn": int(turns) if turns.isdigit() else 0,  # the turns that memory has taken in
        "imported": True,
        "user": "",
        "assistant": "",
        "api": "import",
        "keys": [],
        "sha256": sha256_hex(data),
        "created_at": int(time.time()),
    }

    def store() -> str:
        cid = service.create(owner, None, {})
        try:
            service.store.append_version(owner, cid, 0, data, record)
        except BaseException:
            service.store.delete_conversation(owner, cid)
            raise
        return cid

    cid = await service.run(store)
    return conversation_object(await conversation_info(request, cid))
