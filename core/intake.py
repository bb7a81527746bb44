"""From a parsed notification to jobs: what the receiver does, shared by the API and the recovery workers.

At-least-once in, exactly-once effect: a note version is claimed once in Redis and an event number once
per subscription (:class:`core.subscriptions.SubscriptionState`), so a redelivered, replayed or
recovered notification creates no second job. Each job's task message is pushed by the same Redis script
that makes its claim (see :mod:`core.jobs`), and a whole notification is one Redis round trip.

Everything is checked before anything is written, so a notification refused with a 4xx leaves nothing
behind. When a job has to be sent separately (a queue other than Redis) and cannot be, the claims whose
jobs were not sent are released and :class:`QueueUnavailableError` is raised (503), so that the EHR's retry
is accepted.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from core.documents import (
    AttachmentError,
    decode_attachment_data,
    find_text_attachment,
    is_retraction,
    skip_reason,
)
from core.jobs import Envelope, Job, JobQueue
from core.notifications import Notification, NotificationEvent
from core.origin import EhrBase, OutsideEhrError, parse_reference
from core.settings import Settings
from core.state import NoteState
from core.subscriptions import EventInput, SubscriptionState, subscription_key
from mappings.context import document_version

logger = logging.getLogger("fhir_ner.intake")

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
EVENT_TYPES = {"event-notification", "query-event", "error"}
Source = Literal["full-resource", "id-only", "resolved", "recovered"]


class IntakeRejectedError(ValueError):
    """The notification cannot be accepted as it is (4xx); the message is safe to return."""


class QueueUnavailableError(RuntimeError):
    """A job could not be enqueued; nothing that was not sent stays claimed."""


@dataclass
class IntakeOutcome:
    notification_type: str
    subscription: str | None = None
    queued: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: int = 0
    ignored: list[str] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    resolving: list[str] = field(default_factory=list)
    recovering: list[dict[str, Any]] = field(default_factory=list)
    # Events that named no focus, when the caller recovers them itself (the recovery worker).
    unfocused_events: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.notification_type}: {len(self.queued)} queued, {len(self.skipped)} skipped"
        extras = [
            (self.duplicates, "duplicate(s)"),
            (len(self.resolving), "to fetch from the EHR"),
            (len(self.recovering), "recovery job(s)"),
            (len(self.ignored), "not a note"),
            (len(self.refused), "refused"),
        ]
        return text + "".join(f", {n} {what}" for n, what in extras if n)


@dataclass(frozen=True)
class _Prepared:
    document: dict[str, Any]
    document_id: str
    version_id: str
    action: Literal["process", "retract", "skip"]
    reason: str | None = None
    refused_url: bool = False


@dataclass
class _Claim:
    """A (document, version) claim with its job, in the notification's one Redis round trip."""

    document_id: str
    version_id: str
    document: dict[str, Any] | None
    action: Literal["process", "retract"]
    source: Source
    event: int | None = None  # index of the event that named it (id-only), else None
    index: int = -1  # position of its result in the pipeline
    envelope: Envelope | None = None  # its task message, pushed with the claim (None: sent afterwards)


@dataclass
class _EventPlan:
    """What an event will do if it is new (decided before Redis is asked)."""

    event: NotificationEvent
    job: Job | None = None
    kind: Literal["covered", "unfocused", "ignored", "refused", "resolve", "claim", "none"] = "none"
    detail: str = ""
    envelope: Envelope | None = None  # its task message, pushed with the event's claim (None: sent afterwards)


def _epoch(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Intake:
    def __init__(self, notes: NoteState, subscriptions: SubscriptionState, jobs: JobQueue, settings: Settings) -> None:
        self.notes = notes
        self.subscriptions = subscriptions
        self.jobs = jobs
        self.settings = settings
        self.ehr = EhrBase(settings.ehr_base_url)

    # ------------------------------------------------------------------ checks (no side effects)
    def prepare(self, document: dict[str, Any]) -> _Prepared:
        document_id = document.get("id")
        if not isinstance(document_id, str) or not document_id:
            raise IntakeRejectedError("DocumentReference without an id")
        if not _ID.match(document_id):
            raise IntakeRejectedError("DocumentReference.id is not a valid FHIR id")
        version_id = document_version(document)
        if not _ID.match(version_id):
            raise IntakeRejectedError(f"DocumentReference/{document_id}: meta.versionId is not a valid FHIR id")
        if is_retraction(document):
            return _Prepared(document, document_id, version_id, "retract")
        reason = skip_reason(document, self.settings.accept_preliminary)
        refused = False
        if reason is None:
            attachment = find_text_attachment(document)
            if attachment is not None and attachment.data is not None:
                try:
                    text = decode_attachment_data(attachment)
                except AttachmentError as error:
                    raise IntakeRejectedError(f"DocumentReference/{document_id}: {error}") from None
                if len(text) > self.settings.max_note_chars:
                    reason = f"note has {len(text)} characters, over the limit of {self.settings.max_note_chars}"
            elif attachment is not None and attachment.url is not None and not self.ehr.contains(attachment.url):
                reason = f"content[{attachment.index}].attachment.url is outside the configured EHR base URL"
                refused = True
        if reason is not None:
            return _Prepared(document, document_id, version_id, "skip", reason, refused)
        return _Prepared(document, document_id, version_id, "process")

    # ------------------------------------------------------------------ notifications
    def accept(
        self, notification: Notification, *, received: float | None = None, allow_recovery: bool = True
    ) -> IntakeOutcome:
        received = time.time() if received is None else received
        prepared = [self.prepare(document) for document in notification.documents]
        subscription = subscription_key(notification.subscription) if notification.shape != "rest-hook" else None
        outcome = IntakeOutcome(notification.notification_type, subscription, errors=list(notification.errors))
        if notification.status == "error" and not outcome.errors:
            outcome.errors.append("the EHR reports the subscription in error")

        in_bundle = {item.document_id for item in prepared}
        source: Source = "recovered" if not allow_recovery else "full-resource"
        fallback_time = _epoch(notification.timestamp) or received
        events = self._numbered_events(notification) if notification.notification_type in EVENT_TYPES else []
        plans = [self._plan(event, in_bundle, subscription, fallback_time, allow_recovery) for event in events]
        loose: list[_EventPlan] = []  # focus entries without numbered events (HAPI-style id-only)
        if not events and notification.notification_type in EVENT_TYPES:
            for reference in notification.focus_references:
                plan = self._plan(NotificationEvent(None, reference), in_bundle, subscription, fallback_time, False)
                loose.append(plan)

        claims = [
            _Claim(p.document_id, p.version_id, p.document, "retract" if p.action == "retract" else "process", source)
            for p in prepared
            if p.action != "skip"
        ]
        for index, plan in enumerate(plans + loose):
            if plan.kind == "claim" and plan.job is not None:
                document_id, version_id = plan.job.args
                claims.append(_Claim(document_id, version_id, None, "process", "id-only", event=index))

        for plan in plans + loose:
            if plan.job is not None and plan.kind != "claim":
                plan.envelope = self.jobs.envelope(plan.job)
        for claim in claims:
            claim.envelope = self.jobs.envelope(self._claim_job(claim))

        # One round trip: the subscription's accounting with the events' jobs, every claim with its job,
        # the skipped notes' statuses, the hints.
        pipe = self.notes.client.pipeline(transaction=False)
        accept_index = -1
        if subscription is not None:
            accept_index = self.subscriptions.queue_accept(
                pipe,
                subscription,
                notification.notification_type,
                [
                    EventInput(
                        p.event.event_number or 0,
                        p.event.focus or "",
                        _epoch(p.event.timestamp) or fallback_time,
                        p.envelope,
                    )
                    for p in plans
                ],
                events_since_start=notification.events_since_start,
                status=notification.status,
                topic=notification.topic,
                shape=notification.shape,
                errors=outcome.errors,
                now=received,
            )
        for claim in claims:
            claim.index = len(pipe)
            self.notes.queue_claim(
                pipe,
                claim.document_id,
                claim.version_id,
                claim.document,
                claim.envelope,
                **self._details(claim, subscription),
            )
        for item in prepared:
            if item.action == "skip":
                self.notes.queue_status(pipe, item.document_id, item.version_id, "skipped", reason=item.reason)
        for plan in plans + loose:
            hint = plan.event.authorization
            if plan.kind == "resolve" and hint is not None and plan.job is not None:
                self.notes.store_hint(plan.job.args[0], hint.type, hint.value, pipe=pipe)
        # Jobs of events nobody counts (no subscription, or no event numbers) go out unconditionally.
        for plan in loose if subscription is not None else plans + loose:
            if plan.kind != "claim" and plan.envelope is not None:
                pipe.lpush(plan.envelope.key, plan.envelope.payload)
        results = pipe.execute()

        event_claims = ["new"] * len(plans)
        if subscription is not None:
            event_claims = self.subscriptions.accept_result(results[accept_index]).claims
        if outcome.errors:
            logger.warning("subscription error notification", extra={"subscription": subscription})

        # Account, and send what could not ride with its claim; undo what was not sent if sending fails.
        sent_events: set[int] = set()
        try:
            for item in prepared:
                if item.action == "skip":
                    assert item.reason is not None
                    entry = {"document": item.document_id, "version": item.version_id, "reason": item.reason}
                    outcome.skipped.append(entry)
                    if item.refused_url:
                        outcome.refused.append(entry)
            for claim in claims:
                event_dup = claim.event is not None and claim.event < len(plans) and event_claims[claim.event] == "dup"
                previous = self.notes.claim_result(results[claim.index])
                self._settle_claim(claim, previous, outcome, count_duplicate=not event_dup)
            for index, (plan, claim_state) in enumerate(zip(plans, event_claims, strict=True)):
                if claim_state == "dup":
                    if plan.kind != "covered":
                        outcome.duplicates += 1
                    continue
                self._settle_event(plan, outcome)
                sent_events.add(index)
            for plan in loose:
                self._settle_event(plan, outcome)
        except QueueUnavailableError:
            if subscription is not None:
                unsent = [p.event.event_number or 0 for i, p in enumerate(plans) if i not in sent_events]
                self.subscriptions.release_events(subscription, unsent)
            raise
        if outcome.refused:
            self.subscriptions.record_refused(subscription, len(outcome.refused))
            logger.warning("refused references outside the EHR", extra={"count": len(outcome.refused)})
        return outcome

    def accept_document(self, document: dict[str, Any], source: Source) -> IntakeOutcome:
        """One DocumentReference read from the EHR by a worker (id-only, empty payloads, recovery)."""
        outcome = IntakeOutcome("fetched")
        item = self.prepare(document)
        if item.action == "skip":
            assert item.reason is not None
            self.notes.set_status(item.document_id, item.version_id, "skipped", reason=item.reason)
            outcome.skipped.append({"document": item.document_id, "version": item.version_id, "reason": item.reason})
            return outcome
        action: Literal["process", "retract"] = "retract" if item.action == "retract" else "process"
        claim = _Claim(item.document_id, item.version_id, document, action, source)
        claim.envelope = self.jobs.envelope(self._claim_job(claim))
        previous = self.notes.claim_and_queue(
            claim.document_id, claim.version_id, document, claim.envelope, **self._details(claim, None)
        )
        self._settle_claim(claim, previous, outcome)
        return outcome

    # ------------------------------------------------------------------ planning
    @staticmethod
    def _numbered_events(notification: Notification) -> list[NotificationEvent]:
        events = [e for e in notification.events if e.event_number is not None]
        if (
            not notification.events
            and notification.notification_type == "event-notification"
            and notification.events_since_start is not None
        ):
            # Older backport servers list no notification-event: the notification is event N itself.
            focus = notification.focus_references[0] if len(notification.focus_references) == 1 else None
            events = [NotificationEvent(notification.events_since_start, focus, notification.timestamp)]
        return events

    def _plan(
        self,
        event: NotificationEvent,
        in_bundle: set[str],
        subscription: str | None,
        fallback_time: float,
        allow_recovery: bool,
    ) -> _EventPlan:
        plan = _EventPlan(event)
        if event.focus is None:
            plan.kind = "unfocused"
            if allow_recovery and event.event_number is not None:
                since = _epoch(event.timestamp) or fallback_time
                plan.job = Job("recover_events", (subscription, event.event_number, event.event_number, since))
            return plan
        parsed = parse_reference(event.focus)
        if parsed is None or parsed.resource_type != "DocumentReference":
            plan.kind, plan.detail = "ignored", parsed.relative if parsed else event.focus[:200]
            return plan
        if parsed.id in in_bundle:
            plan.kind = "covered"
            return plan
        try:
            parse_reference(event.focus, self.ehr)
        except OutsideEhrError:
            plan.kind, plan.detail = "refused", event.focus[:200]
            return plan
        if parsed.version is not None:
            plan.kind, plan.job = "claim", Job("process_note", (parsed.id, parsed.version))
        else:
            plan.kind, plan.job = "resolve", Job("resolve_note", (parsed.id, subscription))
        return plan

    @staticmethod
    def _claim_job(claim: _Claim) -> Job:
        kind = "retract_note" if claim.action == "retract" else "process_note"
        return Job(kind, (claim.document_id, claim.version_id))

    @staticmethod
    def _details(claim: _Claim, subscription: str | None) -> dict[str, Any]:
        details: dict[str, Any] = {"source": claim.source}
        if claim.action == "retract":
            details["action"] = "retract"
        if subscription:
            details["subscription"] = subscription
        return details

    # ------------------------------------------------------------------ settling
    def _send(self, job: Job) -> None:
        try:
            self.jobs.send(job)
        except Exception as error:
            logger.error("enqueue failed", extra={"task": job.task, "error": type(error).__name__})
            raise QueueUnavailableError("queue unavailable") from None

    def _settle_claim(
        self, claim: _Claim, previous: list[str] | None, outcome: IntakeOutcome, count_duplicate: bool = True
    ) -> None:
        if previous is None:
            if count_duplicate:
                outcome.duplicates += 1
            return
        if claim.envelope is None:  # not pushed with the claim: send it now
            try:
                self._send(self._claim_job(claim))
            except QueueUnavailableError:
                self.notes.release(claim.document_id, claim.version_id)
                self.notes.set_status(claim.document_id, claim.version_id, "failed", reason="could not enqueue")
                raise
        queued = {"document": claim.document_id, "version": claim.version_id, "action": claim.action}
        if previous:
            queued["revision_of"] = ",".join(sorted(previous))
        outcome.queued.append(queued)

    def _settle_event(self, plan: _EventPlan, outcome: IntakeOutcome) -> None:
        send = plan.job is not None and plan.envelope is None
        if plan.kind == "unfocused":
            if plan.job is None:
                outcome.unfocused_events.append(plan.event.event_number or 0)
                return
            if send:
                self._send(plan.job)
            _, first, last, _ = plan.job.args
            outcome.recovering.append({"subscription": outcome.subscription, "from": first, "to": last})
        elif plan.kind == "ignored":
            outcome.ignored.append(plan.detail)
        elif plan.kind == "refused":
            outcome.refused.append({"reference": plan.detail, "reason": "outside the configured EHR base URL"})
        elif plan.kind == "resolve" and plan.job is not None:
            if send:
                self._send(plan.job)
            outcome.resolving.append(str(plan.job.args[0]))
