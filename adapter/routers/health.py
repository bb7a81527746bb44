"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from adapter.deps import get_redis

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz() -> JSONResponse:
    try:
        get_redis().ping()
    except Exception:
        return JSONResponse({"status": "unavailable", "redis": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ready", "redis": "ok"})
