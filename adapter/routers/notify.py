"""POST /fhir/notify: authenticate, validate, record, enqueue, answer. No NLP and no EHR calls here."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from adapter.deps import get_note_state
from adapter.documents import AttachmentError, decode_attachment_data, find_text_attachment, skip_reason
from adapter.notifications import NotificationError, parse_notification
from adapter.outcomes import FHIR_JSON, outcome_response
from adapter.settings import Settings, get_settings
from adapter.state import NoteState
from mappings.context import document_version

logger = logging.getLogger("fhir_ner.api")
router = APIRouter()

JSON_TYPES = ("application/fhir+json", "application/json")


def _authorised(authorization: str | None, settings: Settings) -> bool:
    tokens = settings.accepted_tokens()
    if not tokens:
        return settings.allow_unauthenticated
    if not authorization or not authorization.lower().startswith("bearer "):
        return False
    presented = authorization[7:].strip().encode()
    # Compare against every token without short-circuiting, so timing reveals nothing.
    matches = [hmac.compare_digest(presented, token.encode()) for token in tokens]
    return any(matches)


def enqueue_note(document_id: str, version_id: str) -> None:
    """Send the small task message (ids only) to the inference queue."""
    from worker.celery_app import get_celery_app

    get_celery_app().send_task("worker.tasks.process_note", args=[document_id, version_id])


@router.post("/fhir/notify", response_class=JSONResponse)
async def notify(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    state: Annotated[NoteState, Depends(get_note_state)],
    authorization: Annotated[str | None, Header()] = None,
    content_type: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    if not _authorised(authorization, settings):
        return outcome_response(401, "login", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in JSON_TYPES:
        return outcome_response(415, "not-supported", "send application/fhir+json or application/json")
    raw = await request.body()
    if len(raw) > settings.max_body_bytes:
        return outcome_response(413, "too-costly", f"body exceeds {settings.max_body_bytes} bytes")
    try:
        body: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return outcome_response(400, "structure", "the body is not valid JSON")
    try:
        notification = parse_notification(body)
    except NotificationError as error:
        return outcome_response(400, "invalid", str(error))

    state.record_notification(notification.subscription, notification.notification_type)
    queued: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    for document in notification.documents:
        document_id = str(document.get("id") or "")
        if not document_id:
            return outcome_response(400, "required", "DocumentReference without an id")
        version_id = document_version(document)
        reason = skip_reason(document)
        if reason is None:
            attachment = find_text_attachment(document)
            if attachment is not None and attachment.data is not None:
                try:
                    text = decode_attachment_data(attachment)
                except AttachmentError as error:
                    return outcome_response(400, "invalid", f"DocumentReference/{document_id}: {error}")
                if len(text) > settings.max_note_chars:
                    reason = f"note has {len(text)} characters, over the limit of {settings.max_note_chars}"
        if reason is not None:
            state.set_status(document_id, version_id, "skipped", reason=reason)
            skipped.append({"document": document_id, "version": version_id, "reason": reason})
            continue
        state.store_note(document_id, version_id, document)
        if not state.claim(document_id, version_id):
            continue  # a redelivery: the first delivery's job covers it
        state.set_status(document_id, version_id, "queued")
        try:
            enqueue_note(document_id, version_id)
        except Exception:  # broker down: let the EHR retry rather than lose the note
            state.release(document_id, version_id)
            state.set_status(document_id, version_id, "failed", reason="could not enqueue")
            logger.exception("enqueue failed", extra={"document_version": f"{document_id}/{version_id}"})
            return outcome_response(503, "transient", "queue unavailable, retry later", {"Retry-After": "5"})
        queued.append({"document": document_id, "version": version_id})
    logger.info(
        "notification accepted",
        extra={"shape": notification.shape, "type": notification.notification_type, "queued": len(queued)},
    )
    return JSONResponse(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"{notification.notification_type}: {len(queued)} queued, {len(skipped)} skipped",
                }
            ],
        },
        status_code=200,
        media_type=FHIR_JSON,
    )


@router.get("/documents/{document_id}")
async def document_status(
    document_id: str,
    settings: Annotated[Settings, Depends(get_settings)],
    state: Annotated[NoteState, Depends(get_note_state)],
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Where each version of a note stands (queued, processing, done, skipped, failed)."""
    if not _authorised(authorization, settings):
        return outcome_response(401, "login", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    versions = state.get_status(document_id)
    if not versions:
        return outcome_response(404, "not-found", f"no record of DocumentReference/{document_id}")
    return JSONResponse({"document": document_id, "versions": versions})
