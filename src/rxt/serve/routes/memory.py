"""``GET /v1/conversations/{id}/memory``: a summary of one stored memory (rxt extension).

What the web page draws beside the chat: per-slot norms and their change at the last update,
the update's timing, and on request the stateless comparison
(:mod:`rxt.serve.memory_summary`). Another key's conversation is a 404, as everywhere.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from rxt.serve.memory_summary import summarise
from rxt.serve.routes.conversations import ConversationId, stored_version
from rxt.serve.service import TurnService

router = APIRouter()


@router.get("/v1/conversations/{conversation_id}/memory")
async def memory_summary(
    conversation_id: ConversationId,
    request: Request,
    version: int | None = Query(
        None, ge=0, description="the stored version to summarise (default: the latest)"
    ),
    stateless: bool = Query(
        False, description="also count the prompt tokens a stateless model re-reads per turn"
    ),
):
    service: TurnService = request.app.state.service
    info, version = await stored_version(request, conversation_id, version)
    body = await service.run(summarise, service, request.state.owner, info, version, stateless)
    return {**body, "model": request.app.state.settings.model_name}
