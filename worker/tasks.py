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
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_init, worker_ready
from celery_batches import Batches
from kombu.exceptions import OperationalError

from core.deps import get_note_state, get_redis
from core.documents import attachment_text, decode_attachment_data, find_text_attachment
from core.settings import get_settings
from mappings.bundle import ModelInfo, WritebackPlan, build_retraction, plan_transaction
from mappings.context import context_from_document_reference
from mappings.mentions import Mention
from mappings.registry import retirable_types
from worker.dlq import DeadLetter, DeadLetterStore
from worker.ehr import EhrClient, EhrError, FolderWriter, ResultWriter, check_transaction_response
from worker.inference import tag_texts
from worker.review_record import RecordingWriter, keep_review_record, keep_review_text
from worker.runtime import ModelNotConfiguredError, get_pipeline, get_profile, inference_max_notes
from worker.work import TaggingInput, WorkStore

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
    found, model = tag_texts(pipeline or get_pipeline(), [text], [language])
    return found[0], model


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
    rewritten: list[str] = []
    if not plan.empty:
        response = writer.write(plan.bundle, name)
        outcome = check_transaction_response(plan.bundle, response)
        created, existing = outcome.created, outcome.existing
        # Every PUT is an update; those of kept resources rewrote their content, the others retired them.
        # ("rewritten", not "updated": the status record's "updated" is its time.)
        in_place = {derived.reference for derived in plan.updated}
        rewritten = [ref for ref in outcome.updated if ref in in_place]
        retired = [ref for ref in outcome.updated if ref not in in_place]
    return {
        "resources": created,
        "existing": existing,
        "kept": [derived.reference for derived in plan.kept],
        "rewritten": rewritten,
        "retired": retired,
    }


def read_note(document: dict[str, Any]) -> TaggingInput:
    """The I/O half of reading a note: its text (inline, or fetched from the EHR) and its language."""
    attachment_index, text = note_text(document)
    context = context_from_document_reference(document, attachment_index)
    keep_review_text(context, text)  # for the review pages (worker/review_record.py)
    return TaggingInput(document, attachment_index, text, context.language)


def write_mentions(
    document: dict[str, Any], attachment_index: int, version_id: str, mentions: list[Mention], model: ModelInfo
) -> dict[str, Any]:
    """Map the mentions and write them back in one transaction, retiring what earlier versions said."""
    from core.backfill import queued_by_reprocess
    from worker.backfill import profile_fingerprint
    from worker.terminology import get_terminology

    settings = get_settings()
    context = context_from_document_reference(document, attachment_index)
    profile = get_profile()
    terminology = get_terminology(profile)
    # A note re-read for `fhir-ner reprocess`: its Provenance names the new model even if nothing changed.
    attest = queued_by_reprocess(get_redis(), settings.key_prefix, context.document_id, version_id)
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
            attest=attest,
        )
        recorder = RecordingWriter(writer)
        result = write_plan(recorder, plan, f"{context.document_id}-{version_id}")
        keep_review_record(context, mentions, plan, profile, model, recorder)
        # Which model and profile the note's resources now stand for (what `fhir-ner reprocess` compares).
        return {"mentions": len(mentions), "model": model.revision, "profile": profile_fingerprint(), **result}


def process_document(document: dict[str, Any], version_id: str) -> dict[str, Any]:
    """The whole job for one note version in this process (the three stages the queues split); returns
    the status record."""
    if is_retracted(document):
        return retract_document(str(document.get("id") or ""), version_id)
    item = read_note(document)
    mentions, model = tag_note(item.text, language=item.language)
    return write_mentions(document, item.attachment_index, version_id, mentions, model)


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


def work_store() -> WorkStore:
    return WorkStore(get_redis(), get_settings().key_prefix)


def _store_dead_letter(task_name: str, args: list[Any], reason: str, attempts: int) -> str:
    """Keep a job that is out of retries (or not retryable) with its last error; returns its letter id."""
    from worker.metrics import DEAD_LETTERS

    short_name = task_name.rsplit(".", 1)[-1]
    letter_id = ":".join([short_name, *(str(a) for a in args)])
    dead_letter_store().add(DeadLetter(id=letter_id, task=task_name, args=args, error=reason, attempts=attempts))
    DEAD_LETTERS.labels(short_name).inc()
    return letter_id


def dead_letter(task_name: str, document_id: str, version_id: str, reason: str, attempts: int) -> None:
    """A note version's job dead-lettered: kept, and the note's status says so."""
    from worker.metrics import NOTES

    letter_id = _store_dead_letter(task_name, [document_id, version_id], reason, attempts)
    get_note_state().set_status(document_id, version_id, "dead-lettered", reason=reason, dead_letter=letter_id)
    NOTES.labels("dead-lettered").inc()
    logger.error(
        "job dead-lettered", extra={"document_version": f"{document_id}/{version_id}", "dead_letter": letter_id}
    )


def _has_retries_left(task: Any) -> bool:
    return bool(task.request.retries < get_settings().task_max_retries)


def _retry(task: Any) -> NoReturn:
    """Send ``task`` again later (exponential backoff with jitter); Celery's ``retry`` raises."""
    raise task.retry(countdown=retry_delay(task.request.retries), max_retries=get_settings().task_max_retries)


def _retry_recovery(task: Any, args: list[Any], error: Exception) -> Exception:
    """Retry a recovery job (resolve a note, fetch missed events) while the EHR is unavailable; out of
    retries, dead-letter it: kept, never dropped."""
    if _has_retries_left(task):
        _retry(task)
    letter_id = _store_dead_letter(task.name, args, str(error), int(task.request.retries) + 1)
    logger.error("job dead-lettered", extra={"dead_letter": letter_id})
    return error


@dataclass(frozen=True)
class Handoff:
    """A stage finished and queued the next one; the note is still being processed."""

    stage: str


ALREADY_DONE = Handoff("done")  # a stage delivered again after the note was finished: nothing to do


def retry_delay(retries: int) -> float:
    """Exponential backoff with full jitter, capped by ``FHIR_NER_TASK_RETRY_MAX_DELAY``."""
    cap = min(get_settings().task_retry_max_delay, 2.0 ** (retries + 1))
    return cap * (0.5 + 0.5 * random.random())  # noqa: S311 - jitter, not crypto


def wait_for_redis(error: Exception) -> None:
    """Redis (broker and state) is unreachable: pause a moment before the message is given back.

    A failed task's message is acknowledged and gone; a rejected one goes back on its queue, or, if Redis
    cannot even take it back, stays among the unacknowledged messages that are delivered again after the
    visibility timeout. Either way the job runs again once Redis is back (the stages are idempotent).
    """
    time.sleep(1.0)
    logger.warning("Redis unavailable, job given back to the queue (%s)", type(error).__name__)


# Redis unreachable, as redis-py (state) or kombu (publishing the next stage, a retry) reports it.
BROKER_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OperationalError)


def _finish(
    self: Any, document_id: str, version_id: str, job: Callable[[], dict[str, Any] | Handoff]
) -> dict[str, Any]:
    """Run one stage of a note version's job and record its outcome; transient EHR errors are retried.

    If Redis fails at any point (the stage, the retry, the dead-lettering), the message is given back.
    """
    try:
        return _run_stage(self, document_id, version_id, job)
    except BROKER_ERRORS as error:
        wait_for_redis(error)
        raise Reject(f"Redis unavailable: {type(error).__name__}", requeue=True) from None


def _run_stage(
    self: Any, document_id: str, version_id: str, job: Callable[[], dict[str, Any] | Handoff]
) -> dict[str, Any]:
    from worker.metrics import NOTES

    state = get_note_state()
    try:
        result = job()
    except BROKER_ERRORS:
        raise
    except EhrError as error:
        if error.transient and _has_retries_left(self):
            # Unless another delivery of the note has finished it meanwhile (then the retry finds it done).
            state.advance_status(document_id, version_id, "queued", reason=f"retrying: {error}")
            _retry(self)
        dead_letter(self.name, document_id, version_id, str(error), int(self.request.retries or 0) + 1)
        raise
    except Exception as error:
        dead_letter(self.name, document_id, version_id, f"{type(error).__name__}: {error}", 1)
        logger.exception("note failed", extra={"document_version": f"{document_id}/{version_id}"})
        raise
    if result is ALREADY_DONE:
        return {"already": "done"}
    if isinstance(result, Handoff):  # its status was recorded before the next stage was queued
        return {"handoff": result.stage}
    if "skipped" in result:
        state.set_status(document_id, version_id, "skipped", reason=result.pop("skipped"), **result)
        NOTES.labels("skipped").inc()
    else:
        state.set_status(document_id, version_id, "done", **result)
        NOTES.labels("retracted" if result.get("retracted") else "done").inc()
    logger.info(
        "note done",
        extra={"document_version": f"{document_id}/{version_id}", "mentions": result.get("mentions", 0)},
    )
    return result


def _send(task: str, document_id: str, version_id: str) -> None:
    """Queue the note's next stage, at the priority its job came with (a backfill's notes stay behind live ones)."""
    from core.backfill import note_priority
    from core.celery_app import get_celery_app

    priority = note_priority(get_redis(), get_settings().key_prefix, document_id, version_id)
    get_celery_app().send_task(task, args=[document_id, version_id], priority=priority)


def _hand_on(task: str, document_id: str, version_id: str, stage: str) -> Handoff:
    """Record the stage, then queue it. In that order: the next stage may finish the note at once, and its
    final status must be the last one written (a late "processing" is refused once the note is finished)."""
    get_note_state().advance_status(document_id, version_id, "processing", stage=stage)
    _send(task, document_id, version_id)
    return Handoff(stage)


def load_document(document_id: str, version_id: str) -> dict[str, Any]:
    """The version's DocumentReference: as the notification brought it, else read from the EHR."""
    document = get_note_state().load_note(document_id, version_id)
    if document is not None:
        return document
    client = EhrClient.from_settings(get_settings())
    try:
        return client.read(f"DocumentReference/{document_id}/_history/{version_id}")
    finally:
        client.close()


def is_done(document_id: str, version_id: str) -> bool:
    return get_note_state().get_status(document_id).get(version_id, {}).get("status") == "done"


def start_note(document_id: str, version_id: str) -> dict[str, Any] | Handoff:
    """I/O stage one: read the note, keep its text for the inference workers, queue it for tagging."""
    state = get_note_state()
    if is_done(document_id, version_id):  # delivered again after the note was finished (an acknowledgement lost)
        return ALREADY_DONE
    state.advance_status(document_id, version_id, "processing", stage="reading")
    document = load_document(document_id, version_id)
    if is_retracted(document):
        return retract_document(str(document.get("id") or document_id), version_id)
    item = read_note(document)
    work_store().put_input(document_id, version_id, item)
    return _hand_on(TAG_NOTES, document_id, version_id, "waiting for the model")


def finish_note(document_id: str, version_id: str) -> dict[str, Any] | Handoff:
    """I/O stage three: write the tagged mentions back. Without them (expired), start the job again."""
    store = work_store()
    output = store.get_output(document_id, version_id)
    if output is None:
        if is_done(document_id, version_id):
            return ALREADY_DONE
        logger.warning(
            "tagging output missing, note restarted", extra={"document_version": f"{document_id}/{version_id}"}
        )
        return _hand_on(PROCESS_NOTE, document_id, version_id, "restarted")
    # A backfill's note reaches the EHR at its run's rate, however many of them the workers have in hand.
    from core.backfill import pace_bulk_note

    time.sleep(pace_bulk_note(get_redis(), get_settings().key_prefix, document_id, version_id))
    result = write_mentions(output.document, output.attachment_index, version_id, output.mentions, output.model)
    store.discard(document_id, version_id)
    return result


PROCESS_NOTE = "worker.tasks.process_note"
TAG_NOTES = "worker.tasks.tag_notes"
WRITE_NOTE = "worker.tasks.write_note"
RETRACT_NOTE = "worker.tasks.retract_note"
NOTE_TASKS = (PROCESS_NOTE, TAG_NOTES, WRITE_NOTE, RETRACT_NOTE)  # args: (document id, version)
_IO_TASK = {"bind": True, "acks_late": True, "reject_on_worker_lost": True}


@shared_task(name=PROCESS_NOTE, **_IO_TASK)
def process_note(self: Any, document_id: str, version_id: str) -> dict[str, Any]:
    return _finish(self, document_id, version_id, lambda: start_note(document_id, version_id))


@shared_task(name=WRITE_NOTE, **_IO_TASK)
def write_note(self: Any, document_id: str, version_id: str) -> dict[str, Any]:
    return _finish(self, document_id, version_id, lambda: finish_note(document_id, version_id))


@shared_task(name=RETRACT_NOTE, **_IO_TASK)
def retract_note(self: Any, document_id: str, version_id: str) -> dict[str, Any]:
    """The note became entered-in-error (version ``version_id``): retire everything derived from it."""
    return _finish(self, document_id, version_id, lambda: retract_document(document_id, version_id))


class NoteBatches(Batches):  # type: ignore[misc]
    """Collects waiting inference messages: up to ``FHIR_NER_INFERENCE_MAX_NOTES``, or what arrived within
    ``FHIR_NER_INFERENCE_MAX_WAIT_MS``, then runs them as one call.

    Acknowledgement is per message: a message is acknowledged once its note is handed to the write stage or
    dead-lettered; the others (Redis failed mid-way) go back on the queue.
    """

    @property
    def flush_every(self) -> int:  # type: ignore[override]
        return inference_max_notes()

    @property
    def flush_interval(self) -> float:  # type: ignore[override]
        return get_settings().inference_max_wait_ms / 1000

    def flush(self, requests: Any) -> Any:
        from celery_batches import SimpleRequest
        from celery_batches.trace import apply_batches_task

        requests = list(requests)
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(handled: Any) -> None:
            done = set(handled or ())
            for request in requests:
                if request.id in done:
                    request.acknowledge()
                else:
                    request.reject(requeue=True)

        return self._pool.apply_async(apply_batches_task, (self, serializable, 0, None), callback=on_return)


@shared_task(name=TAG_NOTES, base=NoteBatches, acks_late=True, reject_on_worker_lost=True)
def tag_notes(requests: list[Any]) -> list[str]:
    """Inference stage: tag the waiting notes in one pass; returns the ids of the messages dealt with."""
    jobs = [(str(r.args[0]), str(r.args[1])) for r in requests]
    try:
        done = _tag_or_dead_letter(jobs)
    except BROKER_ERRORS as error:  # nothing acknowledged: the messages go back and the batch runs again
        wait_for_redis(error)
        return []
    return [r.id for r, job in zip(requests, jobs, strict=True) if job in done]


def _tag_or_dead_letter(jobs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """:func:`tag_jobs`, with a defect (not an outage) dead-lettering the batch rather than looping on it."""
    try:
        return tag_jobs(jobs)
    except BROKER_ERRORS:
        raise
    except Exception as error:
        logger.exception("inference batch failed")
        for job in dict.fromkeys(jobs):
            dead_letter(TAG_NOTES, *job, f"{type(error).__name__}: {error}", 1)
        return set(jobs)


def tag_jobs(jobs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Tag the notes of ``jobs`` together and queue their write-back; returns the jobs dealt with (handed on,
    restarted or dead-lettered). Broker errors propagate: nothing is acknowledged and the batch runs again."""
    state = get_note_state()
    store = work_store()
    unique = list(dict.fromkeys(jobs))
    items = store.get_inputs(unique)
    done: set[tuple[str, str]] = set()
    ready: list[tuple[tuple[str, str], TaggingInput]] = []
    for job, item in zip(unique, items, strict=True):
        if item is None:
            # Delivered twice: finished already (nothing to do), or tagged already (hand on again; the write
            # is idempotent). Otherwise the input expired or Redis lost it: read the note again.
            if not is_done(*job):
                _send(WRITE_NOTE if store.has_output(*job) else PROCESS_NOTE, *job)
            done.add(job)
        else:
            ready.append((job, item))
    if not ready:
        return done
    for job, _ in ready:
        state.advance_status(*job, "processing", stage="tagging")
    try:
        found, model = tag_texts(get_pipeline(), [item.text for _, item in ready], [item.language for _, item in ready])
    except BROKER_ERRORS:
        raise
    except Exception as error:
        if len(ready) > 1 and not isinstance(error, ModelNotConfiguredError):
            # One bad note must not sink the others: tag them one by one to find it.
            for job, _ in ready:
                done |= tag_jobs([job])
            return done
        reason = f"{type(error).__name__}: {error}"
        logger.exception("tagging failed")
        for job, _ in ready:
            dead_letter(TAG_NOTES, *job, reason, 1)
            done.add(job)
        return done
    store.put_outputs({job: (mentions, model) for (job, _), mentions in zip(ready, found, strict=True)})
    for job, _ in ready:
        _hand_on(WRITE_NOTE, *job, "writing")
        done.add(job)
    return done


# The receiver's recovery jobs (core/jobs.py, worker/recovery.py): thin wrappers that retry when the EHR is down.
@shared_task(name="worker.tasks.resolve_note", **_IO_TASK)
def resolve_note(self: Any, document_id: str, subscription: str | None = None) -> dict[str, Any]:
    from worker.recovery import EhrUnavailableError, run_resolve_note

    try:
        return run_resolve_note(document_id, subscription)
    except EhrUnavailableError as error:
        raise _retry_recovery(self, [document_id, subscription], error) from None


@shared_task(name="worker.tasks.recover_events", **_IO_TASK)
def recover_events(
    self: Any, subscription: str | None, from_event: int | None, to_event: int | None, since: float | None
) -> dict[str, Any]:
    from worker.recovery import EhrUnavailableError, run_recover_events

    try:
        return run_recover_events(subscription, from_event, to_event, since)
    except EhrUnavailableError as error:
        raise _retry_recovery(self, [subscription, from_event, to_event, since], error) from None


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


@worker_ready.connect
def serve_worker_metrics(**_: Any) -> None:
    """Task timings and counters on ``FHIR_NER_WORKER_METRICS_PORT`` (when set)."""
    from worker.metrics import connect_signals, serve_metrics

    connect_signals()
    serve_metrics(get_settings().worker_metrics_port)
