"""Parse what an EHR POSTs to /fhir/notify into one shape, whatever FHIR version or Subscription style."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

NotificationShape = Literal["r4-backport", "r4b", "r5", "rest-hook"]
NOTIFICATION_TYPES = {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}


class NotificationError(ValueError):
    """The body is not a notification we can act on; the message goes into the OperationOutcome."""


@dataclass(frozen=True)
class NotificationEvent:
    event_number: int | None
    focus: str | None
    timestamp: str | None = None


@dataclass
class Notification:
    shape: NotificationShape
    notification_type: str
    subscription: str | None = None
    topic: str | None = None
    status: str | None = None
    events_since_start: int | None = None
    events: list[NotificationEvent] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)
    focus_references: list[str] = field(default_factory=list)


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise NotificationError(f"{what} is not an integer") from None


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
        raise NotificationError(f"unknown resourceType {resource_type!r}") from None
    try:
        model.model_validate(resource)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise NotificationError(
            f"invalid {resource_type} ({error.error_count()} problem(s)); first at {where or '<root>'}: {first['msg']}"
        ) from None


def _parameter_value(part: dict[str, Any]) -> Any:
    for key, value in part.items():
        if key.startswith("value"):
            return value
    return None


def _backport_status(parameters: dict[str, Any], notification: Notification) -> None:
    for parameter in parameters.get("parameter") or []:
        name = parameter.get("name")
        value = _parameter_value(parameter)
        if name == "subscription":
            notification.subscription = (value or {}).get("reference")
        elif name == "topic":
            notification.topic = value
        elif name == "status":
            notification.status = value
        elif name == "type":
            notification.notification_type = value
        elif name == "events-since-subscription-start":
            notification.events_since_start = _int(value, "events-since-subscription-start")
        elif name == "notification-event":
            parts = {p.get("name"): _parameter_value(p) for p in parameter.get("part") or []}
            focus = parts.get("focus")
            notification.events.append(
                NotificationEvent(
                    event_number=_int(parts.get("event-number"), "event-number"),
                    focus=focus.get("reference") if isinstance(focus, dict) else None,
                    timestamp=parts.get("timestamp"),
                )
            )


def _subscription_status(status: dict[str, Any], notification: Notification) -> None:
    notification.subscription = (status.get("subscription") or {}).get("reference")
    notification.topic = status.get("topic")
    notification.status = status.get("status")
    notification.notification_type = status.get("type") or ""
    notification.events_since_start = _int(status.get("eventsSinceSubscriptionStart"), "eventsSinceSubscriptionStart")
    for event in status.get("notificationEvent") or []:
        focus = event.get("focus") or {}
        notification.events.append(
            NotificationEvent(
                event_number=_int(event.get("eventNumber"), "eventNumber"),
                focus=focus.get("reference"),
                timestamp=event.get("timestamp"),
            )
        )


def parse_notification(body: Any) -> Notification:
    """Recognise the shape, validate it, and collect the status and any DocumentReferences it carries."""
    if not isinstance(body, dict):
        raise NotificationError("the body must be a JSON object (a FHIR resource)")
    resource_type = body.get("resourceType")
    if resource_type == "DocumentReference":
        _validate(body, "R4B")
        return Notification(shape="rest-hook", notification_type="event-notification", documents=[body])
    if resource_type != "Bundle":
        raise NotificationError(
            f"expected a notification Bundle or a DocumentReference, got {resource_type or 'no resourceType'}"
        )
    bundle_type = body.get("type")
    if bundle_type not in ("history", "subscription-notification"):
        raise NotificationError(f"Bundle.type {bundle_type!r} is not a subscription notification")
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
        _validate(body, "R5")
        notification = Notification(shape="r5", notification_type="")
        _subscription_status(status, notification)
    elif status_type == "Parameters":
        _validate(body, "R4B")
        notification = Notification(shape="r4-backport", notification_type="")
        _backport_status(status, notification)
    elif status_type == "SubscriptionStatus":
        _validate(body, "R4B")
        notification = Notification(shape="r4b", notification_type="")
        _subscription_status(status, notification)
    else:
        raise NotificationError("the notification Bundle's first entry is not a subscription status")
    if notification.notification_type not in NOTIFICATION_TYPES | {"error"}:
        raise NotificationError(f"unknown notification type {notification.notification_type!r}")
    for entry in entries[1:]:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") == "DocumentReference":
            notification.documents.append(resource)
        elif resource is None and entry.get("fullUrl"):
            notification.focus_references.append(entry["fullUrl"])
    return notification
