"""The FastAPI application: ``create_app(model, settings, keys)``.

Routes live in :mod:`rxt.serve.routes` (chat, responses, conversations, a conversation's memory
summary and state file), the web page in :mod:`rxt.serve.page`; this module wires the engine,
the store, the turn service, authentication, the body-size limit, metrics and the error
handlers together.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rxt.engine import Engine
from rxt.model.reactive_transformer import ReactiveTransformer
from rxt.serve.auth import KeyRing
from rxt.serve.errors import APIError, error_body, install_error_handlers
from rxt.serve.metrics import CONTENT_TYPE, Metrics
from rxt.serve.page import install_page
from rxt.serve.service import TurnService
from rxt.serve.settings import ServerSettings
from rxt.serve.store import open_store

log = logging.getLogger("rxt.serve")


def create_app(
    model: ReactiveTransformer, settings: ServerSettings | None = None, keys: KeyRing | None = None
) -> FastAPI:
    """An app serving ``model`` (its tokenizer set). The engine and the store open when the app
    starts (uvicorn's lifespan) and close, after every pending commit, when it stops."""
    settings = settings or ServerSettings()
    keys = keys or KeyRing([])
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(
            settings.store_url,
            ttl_seconds=settings.ttl_seconds,
            keep_versions=settings.keep_versions,
        )
        engine = Engine(model, max_batch_size=settings.max_batch_size)
        service = TurnService(engine, store, settings, metrics)
        app.state.service = service
        metrics.gauges(
            queue_depth=lambda: engine.stats().waiting,
            batch_rows=lambda: engine.stats().active,
            updates_pending=lambda: engine.stats().updates_pending,
            active_conversations=lambda: len(service.locks),
        )
        if keys.dev_mode:
            log.warning(
                "NO API KEYS CONFIGURED: local development mode, every caller shares one "
                "owner and sees every conversation. Pass --api-keys FILE or set RXT_API_KEYS."
            )
        # Everything loaded so far lives as long as the server: keep it out of the collector's
        # generations, so collections during serving scan only per-request garbage.
        gc.collect()
        gc.freeze()
        purging = asyncio.create_task(_purge_loop(service, settings.ttl_seconds))
        try:
            yield
        finally:
            purging.cancel()
            await service.drain()
            engine.close()
            service.close()
            store.close()

    app = FastAPI(
        title="rxt",
        summary="Reactive Transformer served with OpenAI-compatible, stateful endpoints",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = keys
    app.state.metrics = metrics
    app.state.model = model
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)

    app.add_middleware(CountRequests, metrics=metrics)

    from rxt.serve.routes import chat, conversations, memory, responses, state

    for module in (chat, responses, conversations, memory, state):
        app.include_router(module.router, dependencies=[Depends(owner)])
    install_page(app)

    @app.get("/v1/models", dependencies=[Depends(owner)])
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(settings)]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(owner)])
    async def get_model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist.", param="model")
        return _model_card(settings)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict:
        service: TurnService = request.app.state.service
        stats = service.engine.stats()
        return {
            "status": "ok",
            "model": settings.model_name,
            "store": type(service.store).__name__,
            "dev_mode": keys.dev_mode,
            "engine": {
                "active": stats.active,
                "waiting": stats.waiting,
                "updates_pending": stats.updates_pending,
            },
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _purge_loop(service: TurnService, ttl_seconds: float | None) -> None:
    """Drop conversations idle longer than the TTL, every tenth of it (at most every minute).
    Redis expires keys by itself; SQLite needs this."""
    if ttl_seconds is None:
        return
    interval = min(ttl_seconds / 10, 60.0)
    while True:
        await asyncio.sleep(interval)
        try:
            dropped = await service.run(service.store.purge)
        except Exception:  # a failing store must not end the loop: try again next time
            log.exception("purging idle conversations failed")
            continue
        if dropped:
            log.info("dropped %d conversations idle for over %.0f s", dropped, ttl_seconds)


async def owner(request: Request) -> str:
    """The caller's owner id (a digest of its API key); 401 if the key is missing or unknown."""
    found = request.app.state.keys.owner(request.headers.get("authorization"))
    if found is None:
        raise APIError(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    request.state.owner = found
    return found


def _model_card(settings: ServerSettings) -> dict:
    return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "rxt"}


def _version() -> str:
    from rxt import __version__

    return __version__


class CountRequests:
    """``rxt_requests_total{route, status}``. Plain ASGI: it only watches the response start,
    where an ``http`` middleware would relay every streamed chunk through a task of its own."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def watched(message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, watched)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: by Content-Length before reading,
    and by counting while reading when the length is not declared (chunked uploads). The body
    is read here in full (it is at most ``max_bytes``) and handed on unchanged."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as ASGI does

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = error_body(
            413,
            f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )
        response = JSONResponse(body, status_code=413)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}
