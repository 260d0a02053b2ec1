"""OpenAI-style error objects, and the handlers that turn every failure into one.

Clients of an OpenAI-compatible server parse ``{"error": {"message", "type", "param", "code"}}``;
the ``openai`` package raises ``BadRequestError``/``NotFoundError``/... from the status and shows
the message. Bad input is always a 4xx with a message naming the field or limit — never a 500
from deep inside, never a dropped connection.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rxt.serve.store import StoreConflict, StoreCorrupt, StoreError, StoreNotFound


def _backend_errors() -> tuple[type[Exception], ...]:
    """The store backends' own failures (database locked or full, Redis unreachable)."""
    import sqlite3

    errors: list[type[Exception]] = [sqlite3.Error]
    try:
        import redis
    except ImportError:  # the Redis backend is optional
        pass
    else:
        errors.append(redis.RedisError)
    return tuple(errors)


BACKEND_ERRORS = _backend_errors()

log = logging.getLogger("rxt.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client as ``status`` with an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(what: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"No {what} found with id {ident!r}.", param=param, code="not_found")


def store_status(exc: Exception) -> tuple[int, str]:
    """The HTTP status and message of a store error (ours or a backend's)."""
    if isinstance(exc, StoreNotFound):
        return 404, str(exc)
    if isinstance(exc, StoreConflict):
        return 409, f"{exc} (a concurrent request changed it; retry)"
    if isinstance(exc, StoreCorrupt):
        return 503, f"stored state is damaged and was not used: {exc}"
    if isinstance(exc, (StoreError, *BACKEND_ERRORS)):
        return 503, f"the state store is unavailable: {exc}"
    return 500, "The server had an internal error; it has been logged."


def _location(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _location(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        else:
            message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
            if len(errors) > 1:
                message += f" ({len(errors) - 1} more error(s))"
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "Unknown endpoint."
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers
        )

    async def _store(request: Request, exc: Exception) -> JSONResponse:
        status, message = store_status(exc)
        if status >= 500:
            log.error("state store error in %s %s: %r", request.method, request.url.path, exc)
        return JSONResponse(error_body(status, message), status_code=status)

    for kind in (StoreError, *BACKEND_ERRORS):
        app.add_exception_handler(kind, _store)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback, answered without internals.
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(500, "The server had an internal error; it has been logged."),
            status_code=500,
        )
