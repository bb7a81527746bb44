"""The receiver: authenticate, validate, record, enqueue, answer. No NLP and no EHR calls in a request.

* ``POST /fhir/notify``: topic-based notifications (R4 backport, R4B, R5, or wrapped in a FHIR message)
  and classic rest-hook deliveries of a bare DocumentReference;
* ``PUT /fhir/notify/DocumentReference/{id}``: classic rest-hook deliveries that PUT the resource;
* ``GET /documents/{id}``: where each version of a note stands;
* ``GET /subscriptions``: what the receiver knows of each subscription (counts, gaps, errors).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse, Response

from adapter import metrics
from adapter.auth import bearer_matches, signature_matches
from adapter.outcomes import FHIR_JSON, outcome_response
from core.deps import get_intake, get_note_state, get_subscription_state
from core.intake import IntakeOutcome, IntakeRejectedError, QueueUnavailableError
from core.notifications import Notification, NotificationError, parse_notification
from core.settings import Settings, get_settings

logger = logging.getLogger("fhir_ner.api")
router = APIRouter()

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"
_FHIR_ID = re.compile(FHIR_ID)

_OUTCOME_SCHEMA = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "severity": {"type": "string"},
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                },
            },
        },
    },
}
_OUTCOME = {"content": {FHIR_JSON: {"schema": _OUTCOME_SCHEMA}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Accepted (OperationOutcome saying what was queued, skipped, ignored)", **_OUTCOME},
    400: {"description": "Not a notification we can act on (bad JSON, wrong type, invalid FHIR, ...)", **_OUTCOME},
    401: {"description": "Missing or wrong bearer token or X-Signature", **_OUTCOME},
    413: {"description": "Body over FHIR_NER_MAX_BODY_BYTES", **_OUTCOME},
    415: {"description": "Content type other than application/fhir+json or application/json", **_OUTCOME},
    503: {"description": "Queue or Redis unavailable: retry (Retry-After)", **_OUTCOME},
}
_BODY_SCHEMA = {
    "type": "object",
    "description": "A notification Bundle (history + Parameters or SubscriptionStatus; subscription-notification; "
    "message) or a DocumentReference.",
    "required": ["resourceType"],
    "properties": {"resourceType": {"type": "string", "enum": ["Bundle", "DocumentReference"]}},
}
_NOTIFY_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {media: {"schema": _BODY_SCHEMA} for media in ("application/fhir+json", "application/json")},
    },
    "parameters": [
        {
            "name": "X-Signature",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "Hex HMAC-SHA256 of the raw body (Medplum), checked against FHIR_NER_SIGNATURE_SECRETS.",
        }
    ],
}
_PUT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": {"type": "object", "required": ["resourceType"]}}
            for media in ("application/fhir+json", "application/json")
        },
    },
}


_RETRY = {"Retry-After": "5"}
_RESULTS = {400: "invalid", 401: "unauthorised", 413: "too-large", 415: "unsupported-media", 503: "unavailable"}


class _RefusalError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.headers = status, code, diagnostics, headers


def _unauthorised() -> _RefusalError:
    return _RefusalError(401, "login", "missing or invalid bearer token or signature", {"WWW-Authenticate": "Bearer"})


def _token_ok(authorization: str | None, settings: Settings) -> bool:
    tokens = settings.accepted_tokens()
    if not tokens and not settings.signature_secrets:
        return settings.allow_unauthenticated
    return bearer_matches(authorization, tokens)


def _media(content_type: str | None) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in (content_type or "").split(";")]
    params = {}
    for part in parts[1:]:
        name, _, value = part.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return parts[0].lower(), params


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _RefusalError(413, "too-costly", f"body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _RefusalError(413, "too-costly", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes, fhir_version: str | None) -> Notification:
    try:
        body: Any = json.loads(raw)
    except (ValueError, RecursionError):
        raise _RefusalError(400, "structure", "the body is not valid JSON") from None
    try:
        return parse_notification(body, fhir_version)
    except NotificationError as error:
        raise _RefusalError(400, "invalid", str(error)) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as error:
        # A shape the parser did not foresee: still the sender's problem, never a 500.
        logger.warning("unreadable notification (%s)", type(error).__name__)
        raise _RefusalError(400, "invalid", "the notification could not be read") from None


def _answer(outcome: IntakeOutcome) -> JSONResponse:
    issues: list[dict[str, Any]] = [
        {"severity": "information", "code": "informational", "diagnostics": outcome.summary()}
    ]
    for refused in outcome.refused[:20]:
        where = refused.get("reference") or f"DocumentReference/{refused.get('document')}"
        issues.append({"severity": "warning", "code": "security", "diagnostics": f"{where}: {refused['reason']}"})
    for skipped in outcome.skipped[:20]:
        issues.append(
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": f"DocumentReference/{skipped['document']} skipped: {skipped['reason']}",
            }
        )
    for error in outcome.errors[:5]:
        issues.append({"severity": "warning", "code": "transient", "diagnostics": f"subscription error: {error}"})
    return JSONResponse({"resourceType": "OperationOutcome", "issue": issues}, media_type=FHIR_JSON)


def _count(outcome: IntakeOutcome) -> None:
    for name, count in (
        ("queued", sum(1 for q in outcome.queued if q.get("action") != "retract")),
        ("retraction", sum(1 for q in outcome.queued if q.get("action") == "retract")),
        ("skipped", len(outcome.skipped)),
        ("duplicate", outcome.duplicates),
        ("refused", len(outcome.refused)),
        ("resolving", len(outcome.resolving)),
        ("not-a-note", len(outcome.ignored)),
        ("recovery", len(outcome.recovering)),
    ):
        if count:
            metrics.NOTES.labels(name).inc(count)


async def _receive(request: Request, put_id: str | None = None) -> Response:
    started = time.perf_counter()
    settings = get_settings()
    kind, result = "unknown", "accepted"
    try:
        token_ok = _token_ok(request.headers.get("authorization"), settings)
        signature = request.headers.get("x-signature")
        if not token_ok and not (signature and settings.signature_secrets):
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
                raise _RefusalError(413, "too-costly", f"body exceeds {settings.max_body_bytes} bytes")
            raise _unauthorised()
        media, params = _media(request.headers.get("content-type"))
        if media not in JSON_TYPES:
            raise _RefusalError(415, "not-supported", "send application/fhir+json or application/json")
        raw = await _read_body(request, settings.max_body_bytes)
        if (
            signature
            and settings.signature_secrets
            and not signature_matches(signature, raw, settings.accepted_signature_secrets())
        ):
            raise _unauthorised()
        notification = _parse(raw, params.get("fhirversion"))
        kind = notification.notification_type if notification.shape != "rest-hook" else "rest-hook"
        if put_id is not None:
            _check_put(notification, put_id)
        try:
            outcome = get_intake().accept(notification)
        except IntakeRejectedError as error:
            raise _RefusalError(400, "invalid", str(error)) from None
        except QueueUnavailableError:
            raise _RefusalError(503, "transient", "queue unavailable, retry later", _RETRY) from None
        except redis.RedisError as error:
            logger.error("state store unavailable (%s)", type(error).__name__)
            raise _RefusalError(503, "transient", "state store unavailable, retry later", _RETRY) from None
        _count(outcome)
        logger.info(
            "notification accepted",
            extra={
                "shape": notification.shape,
                "type": notification.notification_type,
                "queued": len(outcome.queued),
                "document_versions": [f"{q['document']}/{q['version']}" for q in outcome.queued],
            },
        )
        return _answer(outcome)
    except _RefusalError as refusal:
        result = _RESULTS.get(refusal.status, str(refusal.status))
        return outcome_response(refusal.status, refusal.code, refusal.diagnostics, refusal.headers)
    finally:
        metrics.NOTIFICATIONS.labels(kind, result).inc()
        metrics.ACK_SECONDS.observe(time.perf_counter() - started)


def _check_put(notification: Notification, put_id: str) -> None:
    if notification.shape != "rest-hook":
        raise _RefusalError(400, "invalid", "PUT /fhir/notify/DocumentReference/{id} takes a DocumentReference")
    document = notification.documents[0]
    if document.get("id") is None:
        document["id"] = put_id
    elif document.get("id") != put_id:
        raise _RefusalError(400, "invalid", "the DocumentReference id does not match the URL")


@router.post(
    "/fhir/notify",
    response_class=JSONResponse,
    responses=_RESPONSES,
    openapi_extra=_NOTIFY_OPENAPI,
    summary="Receive a Subscription notification",
)
async def notify(request: Request) -> Response:
    """A topic-based notification (handshake, heartbeat, event-notification, query-status, query-event) in
    R4 backport, R4B or R5 shape, or a classic rest-hook DocumentReference. Needs a bearer token or an
    X-Signature."""
    return await _receive(request)


@router.put(
    "/fhir/notify/DocumentReference/{document_id}",
    response_class=JSONResponse,
    responses=_RESPONSES,
    openapi_extra=_PUT_OPENAPI,
    summary="Receive a classic rest-hook PUT of a DocumentReference",
)
async def notify_put(request: Request, document_id: Annotated[str, Path(pattern=FHIR_ID)]) -> Response:
    return await _receive(request, document_id)


@router.get("/documents/{document_id}", responses={401: _RESPONSES[401], 404: {"description": "Unknown note"}})
async def document_status(
    document_id: str,
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Where each version of a note stands (queued, processing, done, skipped, failed)."""
    settings = get_settings()
    if not _token_ok(authorization, settings):
        return outcome_response(401, "login", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    if not _FHIR_ID.match(document_id):
        return outcome_response(404, "not-found", "no record of that DocumentReference")
    versions = get_note_state().get_status(document_id)
    if not versions:
        return outcome_response(404, "not-found", f"no record of DocumentReference/{document_id}")
    return JSONResponse({"document": document_id, "versions": versions})


@router.get("/subscriptions", responses={401: _RESPONSES[401]})
async def subscriptions(authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Per subscription: notifications by type, event watermark and gaps, heartbeats, errors, recoveries."""
    settings = get_settings()
    if not _token_ok(authorization, settings):
        return outcome_response(401, "login", "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    state = get_subscription_state()
    return JSONResponse({"subscriptions": state.all(), "totals": state.totals()})
