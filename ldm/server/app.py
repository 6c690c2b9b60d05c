"""The ASGI app: A1111's ``/sdapi/v1`` routes (:mod:`ldm.server.routes`), the web page, and what guards them.

FastAPI + uvicorn, as A1111 itself: pydantic models give A1111's field names and an OpenAPI schema (``/docs``),
and uvicorn is the ASGI server the A1111 ecosystem runs on. Guards: HTTP basic auth and bearer tokens
(``--api-auth``, ``--api-token``), a body size limit (413), CORS only for the origins given, and error handlers that
answer every failure as JSON (:mod:`ldm.server.errors`) without a traceback.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ldm.errors import UserError
from ldm.server.errors import QueueFull, error_response
from ldm.server.jobs import JobQueue
from ldm.server.routes import api_router
from ldm.server.service import Service

STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class Guard:
    """Who may call the server: ``users`` (user, password) for HTTP basic auth, bearer ``tokens``; none: anyone.
    ``max_body``: the largest request body in bytes; ``cors_origins``: origins a browser page may call from."""

    users: Sequence[tuple[str, str]] = ()
    tokens: Sequence[str] = ()
    max_body: int = 64 << 20
    cors_origins: Sequence[str] = field(default_factory=tuple)


def _authorized(header: str, guard: Guard) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic" and guard.users:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # Compare every pair in full, so the time taken tells nothing about which part was wrong.
        return any(hmac.compare_digest(user, u) & hmac.compare_digest(password, p) for u, p in guard.users)
    if scheme.lower() == "bearer" and guard.tokens:
        return any(hmac.compare_digest(value.strip(), token) for token in guard.tokens)
    return False


class AuthGate:
    """ASGI middleware: 401 unless the request carries the server's credentials; it covers every path (the page,
    its static files, ``/docs``), not only the API routes."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (self.guard.users or self.guard.tokens):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not _authorized(header, self.guard):
                challenge = 'Basic realm="ldm"' if self.guard.users else "Bearer"
                detail = "give the server's credentials (HTTP basic auth, --api-auth) or its token (--api-token)."
                response = error_response(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by its Content-Length, or, for a streamed body without
    one, as it comes in (read whole, within the limit, then handed on)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        detail = f"the request body is over the {self.limit >> 20} MiB limit (--max_body_mb); send smaller images."
        await error_response(413, "too_large", detail)(scope, receive, send)


def create_app(service: Service, queue: JobQueue, guard: Guard = Guard()) -> FastAPI:
    """The server's app for a loaded ``service`` and its job ``queue``."""
    app = FastAPI(title="ldm", description="A1111-compatible API")
    app.state.service, app.state.queue = service, queue
    app.include_router(api_router(service, queue))
    _add_error_handlers(app)
    _add_page(app)
    if guard.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(guard.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(BodyLimit, limit=guard.max_body)
    app.add_middleware(AuthGate, guard=guard)  # added last, so it runs first
    return app


def _add_page(app: FastAPI) -> None:
    if not (STATIC / "index.html").is_file():
        return

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def bad_input(request: Request, err: UserError) -> Any:
        return error_response(422, "invalid_request", str(err), getattr(err, "field", None))

    @app.exception_handler(RequestValidationError)
    async def bad_types(request: Request, err: RequestValidationError) -> Any:
        errors = err.errors()
        first = errors[0] if errors else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        name = where[0] if where else None
        detail = f"{'.'.join(where) or 'the body'}: {first.get('msg', 'is invalid')}"
        if first.get("type") == "json_invalid":
            name, detail = None, "the body is not valid JSON; send a JSON object with A1111's fields."
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return error_response(422, "invalid_request", detail, name, errors=problems)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> Any:
        return error_response(429, "queue_full", str(err), headers={"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Any:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        detail = f"no such endpoint: {request.method} {request.url.path}" if err.status_code == 404 else err.detail
        return error_response(err.status_code, kind, str(detail), headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> Any:  # a bug: JSON for the client, the traceback logged
        return error_response(500, "server_error", f"{type(err).__name__}: {err}")
