"""Parse what an EHR POSTs to /fhir/notify into one shape, whatever FHIR version or Subscription style.

Shapes recognised:

* ``r4-backport``: Bundle ``history`` whose first entry is a ``Parameters`` (backport-subscription-status-r4);
* ``r4b``: Bundle ``history`` whose first entry is a ``SubscriptionStatus``;
* ``r5``: Bundle ``subscription-notification`` whose first entry is a ``SubscriptionStatus``;
* any of these wrapped in a FHIR message (Bundle ``message``: ``MessageHeader`` + the notification Bundle);
* ``rest-hook``: a bare ``DocumentReference`` (classic criteria-based R4 Subscriptions, Medplum).

Status entries may come with or without ``request``/``response`` (HAPI omits them), and the other entries
with or without ``resource`` (id-only payloads carry only ``fullUrl``). Everything that reaches the caller
has been validated with ``fhir.resources``; anything we cannot act on raises :class:`NotificationError`,
whose message is safe to return (it never contains note text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

NotificationShape = Literal["r4-backport", "r4b", "r5", "rest-hook"]
FhirVersion = Literal["R4", "R4B", "R5"]
NOTIFICATION_TYPES = {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}
# Some servers send ``error`` as the type of an error notification; the standard puts it in ``status``.
ACCEPTED_TYPES = NOTIFICATION_TYPES | {"error"}
AUTHORIZATION_HINT_URL = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/notification-authorization-hint"
)
# Event numbers are counted in Redis (Lua numbers and sorted-set scores are doubles).
MAX_EVENT_NUMBER = 2**53 - 1
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class NotificationError(ValueError):
    """The body is not a notification we can act on; the message goes into the OperationOutcome."""


@dataclass(frozen=True)
class AuthorizationHint:
    """An authorization hint that came with an event (a token for fetching the focus); never logged."""

    type: str | None
    value: str = field(repr=False)


@dataclass(frozen=True)
class NotificationEvent:
    event_number: int | None
    focus: str | None
    timestamp: str | None = None
    additional_context: tuple[str, ...] = ()
    authorization: AuthorizationHint | None = field(default=None, repr=False)


@dataclass
class Notification:
    shape: NotificationShape
    notification_type: str
    fhir_version: FhirVersion = "R4"
    subscription: str | None = None
    topic: str | None = None
    status: str | None = None
    events_since_start: int | None = None
    timestamp: str | None = None
    events: list[NotificationEvent] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)
    # ``fullUrl`` of entries that carry no resource (id-only payloads).
    focus_references: list[str] = field(default_factory=list)
    # ``Type/id`` of resources in the Bundle that are not DocumentReferences (ignored, but reported).
    other_resources: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrapped_in_message: bool = False


# ------------------------------------------------------------------------------------------------ helpers


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _reference(value: Any) -> str | None:
    return _str(_dict(value).get("reference"))


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise NotificationError(f"{what} is not an integer")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise NotificationError(f"{what} is not an integer") from None
    if not 0 <= number <= MAX_EVENT_NUMBER:
        raise NotificationError(f"{what} is out of range")
    return number


def _codeable_text(value: Any) -> str | None:
    concept = _dict(value)
    for coding in _list(concept.get("coding")):
        code = _str(_dict(coding).get("code"))
        if code:
            system = _str(_dict(coding).get("system"))
            return f"{system}|{code}" if system else code
    return _str(concept.get("text"))


def _safe_location(loc: tuple[int | str, ...]) -> str:
    """Error locations may contain JSON keys chosen by the sender: keep only plain field names."""
    parts = [str(p) if isinstance(p, int) or _SAFE_NAME.match(str(p)) else "<key>" for p in loc]
    return ".".join(parts) or "<root>"


def _validate(resource: dict[str, Any], fhir_version: Literal["R4B", "R5"]) -> None:
    """Strict validation with fhir.resources; R4 payloads validate against the R4B models."""
    if fhir_version == "R5":
        from fhir.resources import get_fhir_model_class
    else:
        from fhir.resources.R4B import get_fhir_model_class
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise NotificationError("the body has no resourceType")
    try:
        model = get_fhir_model_class(resource_type)
    except KeyError:
        raise NotificationError("unknown resourceType") from None
    try:
        model.model_validate(resource)
    except ValidationError as error:
        first = error.errors()[0]
        message = str(first["msg"])[:200]
        raise NotificationError(
            f"invalid {resource_type} ({error.error_count()} problem(s)); first at {_safe_location(first['loc'])}: "
            f"{message}"
        ) from None
    except (ValueError, TypeError, RecursionError):
        raise NotificationError(f"invalid {resource_type}") from None


def _parameter_value(part: dict[str, Any]) -> Any:
    for key, value in part.items():
        if key.startswith("value"):
            return value
    return None


def _hint_from_extensions(extensions: Any) -> AuthorizationHint | None:
    for extension in _list(extensions):
        extension = _dict(extension)
        if extension.get("url") != AUTHORIZATION_HINT_URL:
            continue
        parts = {_dict(e).get("url"): _dict(e) for e in _list(extension.get("extension"))}
        value = _str(_dict(parts.get("value")).get("valueString"))
        if value:
            hint_type = _str(_dict(_dict(parts.get("type")).get("valueCoding")).get("code"))
            return AuthorizationHint(hint_type, value)
    return None


# ------------------------------------------------------------------------------------------ status parts


def _backport_status(parameters: dict[str, Any], notification: Notification) -> None:
    for parameter in _list(parameters.get("parameter")):
        parameter = _dict(parameter)
        name = parameter.get("name")
        value = _parameter_value(parameter)
        if name == "subscription":
            notification.subscription = _reference(value)
        elif name == "topic":
            notification.topic = _str(value)
        elif name == "status":
            notification.status = _str(value)
        elif name == "type":
            notification.notification_type = _str(value) or ""
        elif name == "events-since-subscription-start":
            notification.events_since_start = _int(value, "events-since-subscription-start")
        elif name == "error":
            notification.errors.append(_codeable_text(value) or "unspecified error")
        elif name == "notification-event":
            parts: dict[str, list[Any]] = {}
            for part in _list(parameter.get("part")):
                part = _dict(part)
                parts.setdefault(str(part.get("name")), []).append(_parameter_value(part))
            first = {key: values[0] for key, values in parts.items()}
            hint_value = _str(first.get("authorization-value"))
            hint_type = _str(_dict(first.get("authorization-type")).get("code"))
            notification.events.append(
                NotificationEvent(
                    event_number=_int(first.get("event-number"), "event-number"),
                    focus=_reference(first.get("focus")),
                    timestamp=_str(first.get("timestamp")),
                    additional_context=tuple(
                        ref for ref in (_reference(v) for v in parts.get("additional-context", [])) if ref
                    ),
                    authorization=AuthorizationHint(hint_type, hint_value) if hint_value else None,
                )
            )


def _subscription_status(status: dict[str, Any], notification: Notification) -> None:
    notification.subscription = _reference(status.get("subscription"))
    notification.topic = _str(status.get("topic"))
    notification.status = _str(status.get("status"))
    notification.notification_type = _str(status.get("type")) or ""
    notification.events_since_start = _int(status.get("eventsSinceSubscriptionStart"), "eventsSinceSubscriptionStart")
    for error in _list(status.get("error")):
        notification.errors.append(_codeable_text(error) or "unspecified error")
    for event in _list(status.get("notificationEvent")):
        event = _dict(event)
        notification.events.append(
            NotificationEvent(
                event_number=_int(event.get("eventNumber"), "eventNumber"),
                focus=_reference(event.get("focus")),
                timestamp=_str(event.get("timestamp")),
                additional_context=tuple(
                    ref for ref in (_reference(c) for c in _list(event.get("additionalContext"))) if ref
                ),
                authorization=_hint_from_extensions(event.get("extension")),
            )
        )


def parse_status_resource(resource: Any, shape: NotificationShape = "r4b") -> Notification:
    """Read a bare status resource (``Parameters`` or ``SubscriptionStatus``), e.g. from ``$status``."""
    resource = _dict(resource)
    if resource.get("resourceType") == "Parameters":
        notification = Notification(shape="r4-backport", notification_type="")
        _backport_status(resource, notification)
    elif resource.get("resourceType") == "SubscriptionStatus":
        notification = Notification(shape=shape, notification_type="")
        _subscription_status(resource, notification)
    else:
        raise NotificationError("not a subscription status resource")
    return notification


# ---------------------------------------------------------------------------------------------- bundles


def _unwrap_message(body: dict[str, Any]) -> dict[str, Any]:
    """A FHIR message (MessageHeader + the notification Bundle): return the notification Bundle."""
    entries = [_dict(e) for e in _list(body.get("entry"))]
    header = _dict(entries[0].get("resource")) if entries else {}
    if header.get("resourceType") != "MessageHeader":
        raise NotificationError("a message Bundle must start with a MessageHeader")
    focus = {_reference(f) for f in _list(header.get("focus"))}
    candidates = [
        (_str(e.get("fullUrl")), _dict(e.get("resource")))
        for e in entries[1:]
        if _dict(e.get("resource")).get("resourceType") == "Bundle"
        and _dict(e.get("resource")).get("type") in ("history", "subscription-notification")
    ]
    chosen = [bundle for url, bundle in candidates if url in focus] or [bundle for _, bundle in candidates]
    if not chosen:
        raise NotificationError("the message Bundle carries no subscription notification")
    return chosen[0]


def parse_notification(body: Any, fhir_version: str | None = None) -> Notification:
    """Recognise the shape, validate it, and collect the status and any DocumentReferences it carries.

    ``fhir_version`` is the ``fhirVersion`` parameter of the Content-Type, when given: it decides
    whether a bare DocumentReference is validated as R4 or R5.
    """
    if not isinstance(body, dict):
        raise NotificationError("the body must be a JSON object (a FHIR resource)")
    resource_type = body.get("resourceType")
    if resource_type == "DocumentReference":
        r5 = (fhir_version or "").startswith("5")
        _validate(body, "R5" if r5 else "R4B")
        return Notification(
            shape="rest-hook",
            notification_type="event-notification",
            fhir_version="R5" if r5 else "R4",
            documents=[body],
        )
    if resource_type != "Bundle":
        raise NotificationError(
            "expected a notification Bundle or a DocumentReference, got "
            + (resource_type if isinstance(resource_type, str) and _SAFE_NAME.match(resource_type) else "another body")
        )
    wrapped = False
    outer = body
    if body.get("type") == "message":
        body = _unwrap_message(body)
        wrapped = True
    bundle_type = body.get("type")
    if bundle_type not in ("history", "subscription-notification"):
        shown = bundle_type if isinstance(bundle_type, str) and _SAFE_NAME.match(bundle_type.replace("-", "_")) else "?"
        raise NotificationError(f"Bundle.type {shown!r} is not a subscription notification")
    entries = body.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise NotificationError("the notification Bundle has no status entry")
    status = entries[0].get("resource")
    if not isinstance(status, dict):
        raise NotificationError("the notification Bundle's first entry has no status resource")
    status_type = status.get("resourceType")
    if bundle_type == "subscription-notification":
        if status_type != "SubscriptionStatus":
            raise NotificationError("an R5 notification must start with a SubscriptionStatus")
        _validate(outer, "R5")
        notification = Notification(shape="r5", notification_type="", fhir_version="R5")
        _subscription_status(status, notification)
    elif status_type == "Parameters":
        _validate(outer, "R4B")
        notification = Notification(shape="r4-backport", notification_type="", fhir_version="R4")
        _backport_status(status, notification)
    elif status_type == "SubscriptionStatus":
        _validate(outer, "R4B")
        notification = Notification(shape="r4b", notification_type="", fhir_version="R4B")
        _subscription_status(status, notification)
    else:
        raise NotificationError("the notification Bundle's first entry is not a subscription status")
    if notification.notification_type not in ACCEPTED_TYPES:
        shown = notification.notification_type[:40]
        raise NotificationError(f"unknown notification type {shown!r}")
    notification.timestamp = _str(body.get("timestamp"))
    notification.wrapped_in_message = wrapped
    for entry in entries[1:]:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        full_url = _str(entry.get("fullUrl"))
        if isinstance(resource, dict):
            kind = _str(resource.get("resourceType")) or "?"
            if kind == "DocumentReference":
                notification.documents.append(resource)
            else:
                notification.other_resources.append(f"{kind}/{_str(resource.get('id')) or '?'}")
        elif resource is None and full_url:
            notification.focus_references.append(full_url)
    return notification


def warm_up() -> None:
    """Validate one small notification of each FHIR version, so that the models (imported and built lazily, about
    0.1 s of CPU per version) are ready before the first notification arrives rather than delaying it."""
    document = {
        "resourceType": "DocumentReference",
        "id": "warm-up",
        "meta": {"versionId": "1"},
        "status": "current",
        "docStatus": "final",
        "subject": {"reference": "Patient/warm-up"},
        "date": "2026-01-01T00:00:00Z",
        "content": [{"attachment": {"contentType": "text/plain", "language": "en", "data": "d2FybS11cA=="}}],
    }
    reference = {"reference": "Subscription/warm-up"}
    backport = {
        "resourceType": "Parameters",
        "meta": {"profile": ["http://example.org/StructureDefinition/warm-up"]},
        "parameter": [
            {"name": "subscription", "valueReference": reference},
            {"name": "topic", "valueCanonical": "http://example.org/topic"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": "1"},
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": "1"},
                    {"name": "focus", "valueReference": {"reference": "DocumentReference/warm-up"}},
                ],
            },
        ],
    }
    status = {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": "event-notification",
        "subscription": reference,
        "topic": "http://example.org/topic",
        "notificationEvent": [{"eventNumber": "1", "focus": {"reference": "DocumentReference/warm-up"}}],
    }
    entry = {
        "fullUrl": "urn:uuid:0b1c5d0e-0000-4000-8000-000000000000",
        "resource": document,
        "request": {"method": "PUT", "url": "DocumentReference/warm-up"},
        "response": {"status": "200"},
    }
    for bundle_type, first in (
        ("history", backport),  # R4 backport: R4B models
        ("history", status),  # R4B
        ("subscription-notification", {**status, "eventsSinceSubscriptionStart": "1"}),  # R5 models
    ):
        parse_notification({"resourceType": "Bundle", "type": bundle_type, "entry": [{"resource": first}, entry]})
