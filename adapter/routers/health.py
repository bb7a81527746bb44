"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapter.metrics import REGISTRY
from core.deps import get_redis

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz() -> JSONResponse:
    """Redis (queue and state) answers."""
    try:
        get_redis().ping()
    except Exception:
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ready", "redis": "ok"})


@router.get("/metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    """Prometheus text format: notifications by type and outcome, acknowledgement latency, queue depth,
    gaps detected and recovered."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
