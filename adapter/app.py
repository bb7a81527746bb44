"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from adapter.outcomes import outcome_response
from adapter.routers import health, notify


def create_app() -> FastAPI:
    app = FastAPI(
        title="FHIR clinical NER adapter",
        version="0.1.0",
        description="Receives FHIR Subscription notifications about clinical notes and queues them for NER.",
    )
    app.include_router(health.router)
    app.include_router(notify.router)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return outcome_response(400, "invalid", "invalid request parameters")

    return app
