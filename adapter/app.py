"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.outcomes import outcome_response
from adapter.review import install_review_pages
from adapter.routers import backfills, health, notify
from adapter.watch import watch_forever
from core.logging_config import request_id_from, request_id_var
from core.notifications import warm_up


class RequestIdMiddleware:
    """Every log line of a request carries its id; the response returns it (``X-Request-ID``).

    A plain ASGI middleware: ``@app.middleware("http")`` (starlette's ``BaseHTTPMiddleware``) runs each request
    in a task group of its own and streams the response through memory channels, which cost more CPU per
    notification than the rest of the middleware stack together (README, "Acknowledgement benchmark").
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        request_id = request_id_from(header.decode("latin-1") if header is not None else None)
        raw_id = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", raw_id)]}
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    warm_up()  # the FHIR models, built before the first notification rather than while answering it
    # Gaps and silences are looked for in the background, never while answering a request.
    watcher = asyncio.create_task(watch_forever())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def create_app() -> FastAPI:
    app = FastAPI(
        title="FHIR clinical NER adapter",
        version="0.1.0",
        description="Receives FHIR Subscription notifications about clinical notes and queues them for NER.",
        lifespan=_lifespan,
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    app.include_router(notify.router)
    app.include_router(backfills.router)
    install_review_pages(app)  # /review: off (404) unless FHIR_NER_REVIEW_TOKENS is set

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return outcome_response(400, "invalid", "invalid request parameters")

    return app
