"""Celery tasks: read the note, tag it, map the mentions, write one transaction Bundle back.

Task messages carry only (document id, version); everything else is looked up, so tasks are small
and idempotent: running one twice writes nothing twice (conditional creates on stable identifiers).

Before writing, the worker searches the EHR for what earlier versions of the note produced (by the note's
document tag, then checked by identifier and derivation reference, see ``mappings/revisions.py``): the
transaction then also retires what the new version no longer says, and a retracted note retires it all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.signals import worker_init

from adapter.deps import get_note_state, get_redis
from adapter.documents import attachment_text, decode_attachment_data, find_text_attachment
from adapter.settings import get_settings
from mappings.bundle import ModelInfo, WritebackPlan, build_retraction, plan_transaction
from mappings.context import context_from_document_reference
from mappings.mentions import Mention
from mappings.registry import retirable_types
from worker.dlq import DeadLetter, DeadLetterStore
from worker.ehr import EhrClient, EhrError, FolderWriter, ResultWriter, check_transaction_response
from worker.runtime import get_pipeline, get_profile

if TYPE_CHECKING:
    from worker.nlp.tagger import TaggerPipeline

logger = logging.getLogger("fhir_ner.worker")


def result_writer() -> ResultWriter:
    settings = get_settings()
    if settings.writeback_dir is not None:
        return FolderWriter(settings.writeback_dir)
    return EhrClient.from_settings(settings)


def note_text(document: dict[str, Any]) -> tuple[int, str]:
    attachment = find_text_attachment(document)
    if attachment is None:
        raise ValueError("the note has no text attachment")
    if attachment.data is not None:
        return attachment.index, decode_attachment_data(attachment)
    if attachment.url is None:
        raise ValueError("the note's attachment has neither data nor url")
    client = EhrClient.from_settings(get_settings())
    try:
        raw = client.fetch_text(attachment.url)
    finally:
        client.close()
    return attachment.index, attachment_text(raw, attachment)


def tag_note(
    text: str, pipeline: TaggerPipeline | None = None, language: str | None = None
) -> tuple[list[Mention], ModelInfo]:
    """The note's mentions, with what the note says about each (assertion), and the model that found them.

    ``language`` is the DocumentReference's; without it the assertion rules' language is detected from the text.
    """
    from worker.nlp.assertion import default_detector

    pipeline = pipeline or get_pipeline()
    spans = pipeline.predict([text])[0]
    mentions = [Mention(s.label, s.start, s.end, text[s.start : s.end], s.score) for s in spans]
    mentions = default_detector().annotate(text, mentions, language)
    name, revision = pipeline.tagger.model_info()
    return mentions, ModelInfo(name, revision)


@contextlib.contextmanager
def _writer() -> Iterator[ResultWriter]:
    writer = result_writer()
    try:
        yield writer
    finally:
        close = getattr(writer, "close", None)
        if close is not None:
            close()


def _recorded() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def is_retracted(document: dict[str, Any]) -> bool:
    return "entered-in-error" in (document.get("status"), document.get("docStatus"))


def write_plan(writer: ResultWriter, plan: WritebackPlan, name: str) -> dict[str, Any]:
    """POST the plan's transaction (if it has entries), check the answer entry by entry, report what it did."""
    if plan.superseded_by is not None:
        return {"skipped": f"superseded: the EHR holds results of version {plan.superseded_by} of this note"}
    created: list[str] = []
    existing: list[str] = []
    retired: list[str] = []
    if not plan.empty:
        response = writer.write(plan.bundle, name)
        outcome = check_transaction_response(plan.bundle, response)
        created, existing, retired = outcome.created, outcome.existing, outcome.updated
    return {
        "resources": created,
        "existing": existing,
        "kept": [derived.reference for derived in plan.kept],
        "retired": retired,
    }


def process_document(document: dict[str, Any], version_id: str) -> dict[str, Any]:
    """The whole job for one note version; returns the status record."""
    if is_retracted(document):
        return retract_document(str(document.get("id") or ""), version_id)
    from worker.terminology import get_terminology

    settings = get_settings()
    attachment_index, text = note_text(document)
    context = context_from_document_reference(document, attachment_index)
    mentions, model = tag_note(text, language=context.language)
    profile = get_profile()
    terminology = get_terminology(profile)
    with _writer() as writer:
        existing = writer.derived_resources(settings.identifier_namespace, context.document_id, retirable_types())
        plan = plan_transaction(
            context,
            mentions,
            profile,
            model,
            settings.identifier_namespace,
            _recorded(),
            terminology=terminology,
            existing=existing,
        )
        return {"mentions": len(mentions), **write_plan(writer, plan, f"{context.document_id}-{version_id}")}


def retract_document(document_id: str, version_id: str) -> dict[str, Any]:
    """The note was entered in error: mark everything derived from any of its versions entered-in-error."""
    if not document_id:
        raise ValueError("a retracted DocumentReference without an id")
    settings = get_settings()
    with _writer() as writer:
        existing = writer.derived_resources(settings.identifier_namespace, document_id, retirable_types())
        plan = build_retraction(document_id, version_id, existing, settings.identifier_namespace, _recorded())
        return {"mentions": 0, "retracted": True, **write_plan(writer, plan, f"{document_id}-{version_id}-retraction")}


def dead_letter_store() -> DeadLetterStore:
    return DeadLetterStore(get_redis(), get_settings().key_prefix)


def dead_letter(task: Any, document_id: str, version_id: str, reason: str) -> None:
    """Out of retries (or not retryable): keep the job with its last error instead of dropping it."""
    letter_id = f"{task.name.rsplit('.', 1)[-1]}:{document_id}:{version_id}"
    dead_letter_store().add(
        DeadLetter(
            id=letter_id,
            task=task.name,
            args=[document_id, version_id],
            error=reason,
            attempts=int(task.request.retries or 0) + 1,
        )
    )
    get_note_state().set_status(document_id, version_id, "dead-lettered", reason=reason, dead_letter=letter_id)


def _finish(self: Any, document_id: str, version_id: str, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a job for one note version and record its outcome; transient EHR errors are retried."""
    state = get_note_state()
    state.set_status(document_id, version_id, "processing")
    try:
        result = job()
    except EhrError as error:
        if error.transient and self.request.retries < self.max_retries:
            state.set_status(document_id, version_id, "queued", reason=f"retrying: {error}")
            raise self.retry(countdown=min(60, 2**self.request.retries)) from None
        dead_letter(self, document_id, version_id, str(error))
        raise
    except Exception as error:
        dead_letter(self, document_id, version_id, f"{type(error).__name__}: {error}")
        logger.exception("note failed", extra={"document_version": f"{document_id}/{version_id}"})
        raise
    if "skipped" in result:
        state.set_status(document_id, version_id, "skipped", reason=result.pop("skipped"), **result)
    else:
        state.set_status(document_id, version_id, "done", **result)
    logger.info(
        "note done",
        extra={"document_version": f"{document_id}/{version_id}", "mentions": result.get("mentions", 0)},
    )
    return result


@shared_task(
    name="worker.tasks.process_note",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=5,
)
def process_note(self: Any, document_id: str, version_id: str) -> dict[str, Any]:
    state = get_note_state()
    document = state.load_note(document_id, version_id)
    if document is None:
        client = EhrClient.from_settings(get_settings())
        try:
            document = client.read(f"DocumentReference/{document_id}/_history/{version_id}")
        finally:
            client.close()
    loaded = document
    return _finish(self, document_id, version_id, lambda: process_document(loaded, version_id))


@shared_task(
    name="worker.tasks.retract_note",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=5,
)
def retract_note(self: Any, document_id: str, version_id: str) -> dict[str, Any]:
    """The note became entered-in-error (version ``version_id``): retire everything derived from it."""
    return _finish(self, document_id, version_id, lambda: retract_document(document_id, version_id))


# The receiver's recovery jobs (adapter/jobs.py, adapter/recovery.py): thin wrappers that retry when the EHR is down.
@shared_task(name="worker.tasks.resolve_note", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=5)
def resolve_note(self: Any, document_id: str, subscription: str | None = None) -> dict[str, Any]:
    from adapter.recovery import EhrUnavailableError, run_resolve_note

    try:
        return run_resolve_note(document_id, subscription)
    except EhrUnavailableError as error:
        raise self.retry(countdown=min(60, 2**self.request.retries), exc=error) from None


@shared_task(name="worker.tasks.recover_events", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=5)
def recover_events(
    self: Any, subscription: str | None, from_event: int | None, to_event: int | None, since: float | None
) -> dict[str, Any]:
    from adapter.recovery import EhrUnavailableError, run_recover_events

    try:
        return run_recover_events(subscription, from_event, to_event, since)
    except EhrUnavailableError as error:
        raise self.retry(countdown=min(60, 2**self.request.retries), exc=error) from None


@worker_init.connect
def check_profile_at_start(**_: Any) -> None:
    """A worker with an unusable mapping profile or code system refuses to start, saying why in one line."""
    from mappings.profile import ProfileError
    from mappings.terminology import TerminologyError
    from worker.terminology import check_profile_code_systems

    try:
        check_profile_code_systems(get_profile())
    except (ProfileError, TerminologyError) as error:
        logger.error("cannot start: %s", error)
        raise SystemExit(f"fhir-ner worker: {error}") from None
