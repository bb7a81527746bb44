"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from adapter.outcomes import outcome_response
from adapter.routers import health, notify
from adapter.watch import watch_forever
from core.logging_config import request_id_from, request_id_var


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    @app.middleware("http")
    async def _request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Every log line of a request carries its id; the response returns it (``X-Request-ID``)."""
        request_id = request_id_from(request.headers.get("x-request-id"))
        token = request_id_var.set(request_id)
        try:
            response = await call_next(request)
        finally:
            request_id_var.reset(token)
        response.headers["X-Request-ID"] = request_id
        return response

    app.include_router(health.router)
    app.include_router(notify.router)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return outcome_response(400, "invalid", "invalid request parameters")

    return app
