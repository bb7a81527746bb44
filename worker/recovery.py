"""The EHR calls behind id-only and empty notifications, gaps and silences. Runs in the workers, never in a request.

* :func:`run_resolve_note` (task ``worker.tasks.resolve_note``): an id-only notification named a note
  without a version: read its current version (with the notification's authorization hint when it
  carried one, else our own credentials) and hand it to the intake, which skips, queues or de-duplicates it.
* :func:`run_recover_events` (task ``worker.tasks.recover_events``): events we know of but did not receive
  (a gap, a silent subscription, or an ``empty`` notification). Ask the EHR's ``$events`` for them (after
  ``$status`` when the last number is unknown); when the EHR does not support ``$events`` or returns
  events without focus, search ``DocumentReference?_lastUpdated=ge...`` from the last event processed
  (less an overlap), with the Subscription's own filter criteria when it has any.

Every URL is resolved against the configured EHR base URL and refused when it points anywhere else
(``next`` links included); redirects are not followed. :class:`EhrUnavailableError` means "retry later".
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx

from core.intake import Intake, IntakeOutcome, IntakeRejectedError
from core.notifications import Notification, NotificationError, parse_notification, parse_status_resource
from core.origin import EhrBase, OutsideEhrError, parse_reference
from core.settings import Settings
from core.subscriptions import subscription_key
from worker.ehr_auth import shared_tls_context

logger = logging.getLogger("fhir_ner.recovery")

FHIR_JSON = "application/fhir+json"
FILTER_CRITERIA_URL = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria"
# How a server says "I do not have this operation".
UNSUPPORTED_STATUS = {400, 404, 405, 501}
MAX_SEARCH_PAGES = 200
_PARAM = re.compile(r"^[A-Za-z][A-Za-z0-9_\-.:]{0,63}$")


class EhrUnavailableError(RuntimeError):
    """The EHR did not answer, or answered 429 or 5xx (but 501, "not implemented"): retry later."""


class EhrRefusedError(RuntimeError):
    """The EHR refused a request (4xx) or answered something we cannot use: retrying will not help."""


class EhrReader:
    """GET requests to the one configured EHR; a URL outside its base URL raises ``OutsideEhrError``."""

    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 30.0, client: httpx.Client | None = None
    ) -> None:
        self.ehr = EhrBase(base_url)
        self.token = token
        self._client = client or httpx.Client(timeout=timeout, verify=shared_tls_context())
        self._owns_client = client is None

    @classmethod
    def from_settings(cls, settings: Settings) -> EhrReader:
        token = settings.ehr_bearer_token.get_secret_value() if settings.ehr_bearer_token else None
        return cls(settings.ehr_base_url, token, settings.ehr_timeout_seconds)

    def get(self, url: str, params: Any = None, token: str | None = None) -> httpx.Response:
        absolute = self.ehr.resolve(url)
        headers = {"Accept": FHIR_JSON}
        bearer = token or self.token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            response = self._client.get(absolute, params=params, headers=headers, follow_redirects=False)
        except httpx.HTTPError as error:
            raise EhrUnavailableError(f"GET {self.ehr.relative_path(absolute)}: {type(error).__name__}") from None
        if response.status_code == 429 or (response.status_code >= 500 and response.status_code != 501):
            raise EhrUnavailableError(f"GET {self.ehr.relative_path(absolute)}: HTTP {response.status_code}")
        return response

    def read_json(self, url: str, params: Any = None, token: str | None = None) -> dict[str, Any]:
        response = self.get(url, params, token)
        if response.status_code >= 300:
            raise EhrRefusedError(f"GET {url.split('?')[0][:200]}: HTTP {response.status_code}")
        return _json(response)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise EhrRefusedError("the EHR answered something that is not JSON") from None
    if not isinstance(body, dict):
        raise EhrRefusedError("the EHR answered something that is not a FHIR resource")
    return body


def _unwrap_parameters(body: dict[str, Any]) -> dict[str, Any]:
    """An operation may wrap its one output in Parameters (``return``); give the resource itself."""
    if body.get("resourceType") == "Parameters":
        for parameter in body.get("parameter") or []:
            if isinstance(parameter, dict) and parameter.get("name") == "return":
                resource = parameter.get("resource")
                if isinstance(resource, dict):
                    return resource
    return body


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------- EHR queries


def fetch_events(
    reader: EhrReader, subscription_id: str, first: int, last: int, content: str = "full-resource"
) -> Notification | None:
    """``Subscription/{id}/$events`` for events ``first``..``last``; None when the EHR does not support it."""
    response = reader.get(
        f"Subscription/{subscription_id}/$events",
        params={"eventsSinceNumber": str(first), "eventsUntilNumber": str(last), "content": content},
    )
    if response.status_code in UNSUPPORTED_STATUS:
        return None
    if response.status_code >= 300:
        raise EhrRefusedError(f"$events: HTTP {response.status_code}")
    try:
        return parse_notification(_unwrap_parameters(_json(response)))
    except NotificationError as error:
        raise EhrRefusedError(f"$events answered an unusable Bundle: {error}") from None


def fetch_status(reader: EhrReader, subscription_id: str) -> Notification | None:
    """``Subscription/{id}/$status``; None when the EHR does not support it."""
    response = reader.get(f"Subscription/{subscription_id}/$status")
    if response.status_code in UNSUPPORTED_STATUS:
        return None
    if response.status_code >= 300:
        raise EhrRefusedError(f"$status: HTTP {response.status_code}")
    body = _unwrap_parameters(_json(response))
    candidates: list[Any] = [body]
    if body.get("resourceType") == "Bundle":
        candidates = [e.get("resource") for e in body.get("entry") or [] if isinstance(e, dict)]
    for candidate in candidates:
        if isinstance(candidate, dict) and candidate.get("resourceType") in ("Parameters", "SubscriptionStatus"):
            try:
                return parse_status_resource(candidate)
            except NotificationError:
                continue
    raise EhrRefusedError("$status answered no subscription status")


def subscription_filters(reader: EhrReader, subscription_id: str) -> list[tuple[str, str]]:
    """The Subscription's DocumentReference filter as search parameters (best effort: [] when unknown)."""
    try:
        subscription = reader.read_json(f"Subscription/{subscription_id}")
    except (EhrRefusedError, EhrUnavailableError, OutsideEhrError):
        return []
    criteria: list[str] = []
    for extension in (subscription.get("_criteria") or {}).get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == FILTER_CRITERIA_URL:
            criteria.append(str(extension.get("valueString") or ""))
    if isinstance(subscription.get("criteria"), str) and subscription["criteria"].startswith("DocumentReference?"):
        criteria.append(subscription["criteria"])
    params: list[tuple[str, str]] = []
    for criterion in criteria:
        resource, _, query = criterion.partition("?")
        if resource.strip() == "DocumentReference":
            params += parse_qsl(query)
    for item in subscription.get("filterBy") or []:
        if not isinstance(item, dict) or not str(item.get("resourceType") or "DocumentReference").endswith(
            "DocumentReference"
        ):
            continue
        name = str(item.get("filterParameter") or "")
        if item.get("modifier"):
            name += f":{item['modifier']}"
        value = str(item.get("value") or "")
        comparator = str(item.get("comparator") or "")
        params.append((name, comparator + value if comparator and comparator != "eq" else value))
    return [(k, v) for k, v in params if _PARAM.match(k) and not k.startswith("_") and v]


def changed_documents(
    reader: EhrReader, since: float, filters: list[tuple[str, str]] | None = None
) -> Iterator[dict[str, Any]]:
    """Every DocumentReference changed at or after ``since``, following ``next`` links inside the EHR."""
    params: list[tuple[str, str]] | None = [
        ("_lastUpdated", f"ge{_iso(since)}"),
        ("_sort", "_lastUpdated"),
        ("_count", "100"),
        *(filters or []),
    ]
    url = "DocumentReference"
    for _ in range(MAX_SEARCH_PAGES):
        body = reader.read_json(url, params)
        for entry in body.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "DocumentReference":
                yield resource
        next_url = next(
            (
                link.get("url")
                for link in body.get("link") or []
                if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str)
            ),
            None,
        )
        if not next_url:
            return
        url, params = next_url, None  # the next link carries the query; reader.get checks its origin
    logger.warning("search stopped after %d pages", MAX_SEARCH_PAGES)


# -------------------------------------------------------------------------------------- the two jobs


@dataclass
class RecoveryReport:
    subscription: str | None
    from_event: int | None
    to_event: int | None
    method: list[str] = field(default_factory=list)  # '$status', '$events', '_lastUpdated'
    events_recovered: int = 0
    documents_seen: int = 0
    queued: list[dict[str, str]] = field(default_factory=list)
    resolving: list[str] = field(default_factory=list)
    skipped: int = 0
    refused: int = 0
    gap_closed: bool = False

    def add(self, outcome: IntakeOutcome) -> None:
        self.queued += outcome.queued
        self.resolving += outcome.resolving
        self.skipped += len(outcome.skipped)
        self.refused += len(outcome.refused)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Recovery:
    def __init__(self, intake: Intake, reader: EhrReader) -> None:
        self.intake = intake
        self.reader = reader
        self.settings = intake.settings

    def resolve_note(self, document_id: str, subscription: str | None = None) -> dict[str, Any]:
        """Read the current version of an id-only note and pass it to the intake."""
        path = f"DocumentReference/{document_id}"
        hint = self.intake.notes.load_hint(document_id)
        response = self.reader.get(path, token=hint[1]) if hint else self.reader.get(path)
        if hint and response.status_code in (401, 403):
            response = self.reader.get(path)  # the hint did not work: our own credentials
        if response.status_code in (404, 410):
            return {"document": document_id, "status": "gone", "http": response.status_code}
        if response.status_code >= 300:
            raise EhrRefusedError(f"GET {path}: HTTP {response.status_code}")
        document = _json(response)
        if document.get("resourceType") != "DocumentReference" or document.get("id") != document_id:
            raise EhrRefusedError(f"GET {path} did not return that DocumentReference")
        try:
            outcome = self.intake.accept_document(document, "resolved")
        except IntakeRejectedError as error:
            version = str((document.get("meta") or {}).get("versionId") or "current")[:64]
            self.intake.notes.set_status(document_id, version, "failed", reason=str(error))
            return {"document": document_id, "status": "failed", "reason": str(error)}
        return {"document": document_id, "summary": outcome.summary(), "queued": outcome.queued}

    def recover_events(
        self,
        subscription: str | None,
        from_event: int | None,
        to_event: int | None,
        since: float | None,
    ) -> RecoveryReport:
        key = subscription_key(subscription)
        parsed = parse_reference(key) if key else None
        subscription_id = parsed.id if parsed is not None and parsed.resource_type == "Subscription" else None
        report = RecoveryReport(key, from_event, to_event)
        last = to_event
        search = subscription_id is None or from_event is None
        if not search:
            assert subscription_id is not None and from_event is not None
            if last is None:
                report.method.append("$status")
                status = fetch_status(self.reader, subscription_id)
                last = status.events_since_start if status is not None else None
                search = status is None or last is None
                report.to_event = last
            if last is not None and last >= from_event:
                report.method.append("$events")
                notification = fetch_events(self.reader, subscription_id, from_event, last)
                if notification is None:
                    search = True
                else:
                    outcome = self.intake.accept(notification, allow_recovery=False)
                    report.add(outcome)
                    numbers = {e.event_number for e in notification.events if e.event_number is not None}
                    report.events_recovered = len([n for n in numbers if from_event <= n <= last])
                    missing = set(range(from_event, last + 1)) - numbers if last - from_event < 100_000 else {-1}
                    search = search or bool(outcome.unfocused_events) or bool(missing)
        covered_until: float | None = None
        if search:
            report.method.append("_lastUpdated")
            started = time.time()
            base = since if since is not None else (self.intake.subscriptions.watermark_time(key) if key else None)
            start = (base if base is not None else started) - self.settings.recovery_overlap_seconds
            filters = subscription_filters(self.reader, subscription_id) if subscription_id else []
            for document in changed_documents(self.reader, start, filters):
                report.documents_seen += 1
                try:
                    report.add(self.intake.accept_document(document, "recovered"))
                except IntakeRejectedError as error:
                    logger.warning("recovered note refused", extra={"reason": str(error)})
            covered_until = started
        if key is not None:
            report.gap_closed = self.intake.subscriptions.mark_recovered(
                key, last, report.events_recovered, covered_until
            )
        logger.info("recovery done", extra={"report": {k: v for k, v in report.as_dict().items() if k != "queued"}})
        return report


# ----------------------------------------------------------------------------- worker task bodies


def build_recovery(settings: Settings | None = None) -> Recovery:
    from core.deps import get_intake
    from core.settings import get_settings

    settings = settings or get_settings()
    return Recovery(get_intake(), EhrReader.from_settings(settings))


def run_resolve_note(document_id: str, subscription: str | None = None) -> dict[str, Any]:
    """Body of ``worker.tasks.resolve_note``; raises :class:`EhrUnavailableError` when a retry may help."""
    recovery = build_recovery()
    try:
        return recovery.resolve_note(document_id, subscription)
    finally:
        recovery.reader.close()


def run_recover_events(
    subscription: str | None, from_event: int | None, to_event: int | None, since: float | None
) -> dict[str, Any]:
    """Body of ``worker.tasks.recover_events``; raises :class:`EhrUnavailableError` when a retry may help."""
    recovery = build_recovery()
    try:
        return recovery.recover_events(subscription, from_event, to_event, since).as_dict()
    finally:
        recovery.reader.close()
