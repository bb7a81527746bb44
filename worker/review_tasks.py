"""The review pages' jobs (issue 16). The API never runs the model or calls the EHR: it sends these by name.

* ``try_text(request_id)`` (inference queue): the playground. Tags the pasted text kept in Redis, maps it with
  the shipped or an uploaded profile, and leaves the mentions and the transaction Bundle that *would* be written
  in Redis for the page, which waits for them. Nothing is written anywhere else.
* ``retry_dead_letter(letter_id)`` (I/O queue): what ``fhir-ner dlq retry ID`` does, from the queue page.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import shared_task

from core.deps import get_note_state
from core.deps import get_review_store as review_store
from core.settings import get_settings
from mappings.bundle import MappingValidationError, plan_transaction, validate_r4
from mappings.context import DocumentContext
from mappings.profile import ProfileError
from mappings.terminology import TerminologyError
from mappings.uploaded import parse_uploaded_profile
from worker.dlq import DeadLetter

logger = logging.getLogger("fhir_ner.worker")

TRY_TEXT = "worker.review_tasks.try_text"
RETRY_DEAD_LETTER = "worker.review_tasks.retry_dead_letter"
PLAYGROUND_SUBJECT = "Patient/example"


def run_try(request: dict[str, Any]) -> dict[str, Any]:
    """Tag and map the playground's text; the answer the page shows."""
    from worker.inference import tag_texts
    from worker.review_record import build_record
    from worker.runtime import get_pipeline, get_profile
    from worker.terminology import get_terminology, terminology_for

    settings = get_settings()
    text = str(request.get("text") or "")
    language = request.get("language") or None
    try:
        if request.get("profile_yaml"):
            profile = parse_uploaded_profile(str(request["profile_yaml"]))
            terminology = terminology_for(
                profile,
                settings.terminology,
                settings.terminology_cache_dir,
                settings.terminology_encoder,
                settings.cache_dir,
            )
        else:
            profile = get_profile()
            terminology = get_terminology(profile)
    except (ProfileError, TerminologyError) as error:
        return {"profile_error": str(error)}
    found, model = tag_texts(get_pipeline(), [text], [language])
    context = DocumentContext(document_id="playground", version_id="1", subject=PLAYGROUND_SUBJECT, language=language)
    recorded = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        plan = plan_transaction(
            context, found[0], profile, model, settings.identifier_namespace, recorded, terminology=terminology
        )
    except MappingValidationError as error:
        return {"profile_error": str(error)}
    validation = "valid FHIR R4 transaction Bundle"
    valid = True
    try:
        validate_r4(plan.bundle)
    except MappingValidationError as error:
        valid, validation = False, str(error)
    record = build_record(context, text, found[0], plan, profile, model, {}, None)
    return {
        "mentions": record["mentions"],
        "model": record["model"],
        "profile": profile.name,
        "bundle": plan.bundle,
        "valid": valid,
        "validation": validation,
    }


@shared_task(name=TRY_TEXT, acks_late=True)
def try_text(request_id: str) -> None:
    store = review_store()
    request = store.take_try(request_id)
    if request is None:  # expired, or answered already
        return
    try:
        result = run_try(request)
    except Exception as error:  # noqa: BLE001 - the page shows what went wrong; the note text is never logged
        logger.exception("playground request failed")
        result = {"error": f"{type(error).__name__}: {error}"}
    store.put_try_result(request_id, result)


def requeue_letter(letter: DeadLetter, reason: str) -> None:
    """Send a dead-lettered job back to its queue and out of the store; a note's job marks the note queued first
    (its worker may finish the note at once, and "queued" must not land after that)."""
    from core.celery_app import get_celery_app
    from worker.tasks import NOTE_TASKS, dead_letter_store

    if letter.task in NOTE_TASKS:
        get_note_state().set_status(str(letter.args[0]), str(letter.args[1]), "queued", reason=reason)
    get_celery_app().send_task(letter.task, args=letter.args)
    dead_letter_store().remove(letter.id)


def retry_letter(letter_id: str) -> bool:
    """Send a dead-lettered job back to its queue from the review page; False when there is no such job."""
    from worker.tasks import dead_letter_store

    letter = dead_letter_store().get(letter_id)
    if letter is None:
        return False
    requeue_letter(letter, "retried from the review page")
    logger.info("dead letter retried", extra={"dead_letter": letter_id})
    return True


@shared_task(name=RETRY_DEAD_LETTER, acks_late=True)
def retry_dead_letter(letter_id: str) -> bool:
    return retry_letter(letter_id)
