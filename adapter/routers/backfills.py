"""``GET /backfills``: where each ``fhir-ner backfill`` / ``fhir-ner reprocess`` run stands, read from Redis
(:mod:`core.backfill`), so any API process shows the runs any worker machine drives."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from adapter.outcomes import outcome_response
from adapter.routers.notify import _token_ok
from core.backfill import BulkState
from core.deps import get_redis
from core.settings import get_settings

router = APIRouter()


@router.get("/backfills", responses={401: {"description": "Missing or invalid bearer token"}})
async def backfills(authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Per run: kind, parameters, state (running, interrupted, done, failed, dry-run), source ($export or
    search), notes scanned of the total, queued, already processed, skipped, up to date (reprocess), pace,
    rate in force (lower after the EHR's 429s), ETA."""
    settings = get_settings()
    if not _token_ok(authorization, settings):
        return outcome_response(401, "login", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    runs = BulkState(get_redis(), settings.key_prefix).runs()
    for run in runs:
        run.pop("position", None)  # internal: where to resume (export manifest, page URL)
    return JSONResponse({"backfills": runs})
