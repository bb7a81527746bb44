"""Celery tasks: read the note, tag it, map the mentions, write one transaction Bundle back.

Task messages carry only (document id, version); everything else is looked up, so tasks are small
and idempotent: running one twice writes nothing twice (conditional creates on stable identifiers).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import shared_task

from adapter.deps import get_note_state
from adapter.documents import decode_attachment_data, find_text_attachment
from adapter.settings import get_settings
from mappings.bundle import ModelInfo, build_transaction
from mappings.context import context_from_document_reference
from mappings.mentions import Mention
from worker.ehr import EhrClient, EhrError, FolderWriter, ResultWriter
from worker.runtime import get_pipeline, get_profile

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
    return attachment.index, raw.decode(attachment.charset)


def tag_note(text: str) -> tuple[list[Mention], ModelInfo]:
    pipeline = get_pipeline()
    spans = pipeline.predict([text])[0]
    mentions = [Mention(s.label, s.start, s.end, text[s.start : s.end], s.score) for s in spans]
    name, revision = pipeline.tagger.model_info()
    return mentions, ModelInfo(name, revision)


def process_document(document: dict[str, Any], version_id: str) -> dict[str, Any]:
    """The whole job for one note version; returns the status record."""
    settings = get_settings()
    attachment_index, text = note_text(document)
    context = context_from_document_reference(document, attachment_index)
    mentions, model = tag_note(text)
    recorded = datetime.now(UTC).isoformat(timespec="seconds")
    bundle = build_transaction(context, mentions, get_profile(), model, settings.identifier_namespace, recorded)
    created: list[str] = []
    if bundle["entry"]:
        response = result_writer().write(bundle, f"{context.document_id}-{version_id}")
        created = [(entry.get("response") or {}).get("location", "") for entry in response.get("entry") or []]
    return {"mentions": len(mentions), "resources": created}


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
    state.set_status(document_id, version_id, "processing")
    try:
        result = process_document(document, version_id)
    except EhrError as error:
        if error.transient and self.request.retries < self.max_retries:
            state.set_status(document_id, version_id, "queued", reason=f"retrying: {error}")
            raise self.retry(countdown=min(60, 2**self.request.retries)) from None
        state.set_status(document_id, version_id, "failed", reason=str(error))
        raise
    except Exception as error:
        state.set_status(document_id, version_id, "failed", reason=f"{type(error).__name__}: {error}")
        logger.exception("note failed", extra={"document_version": f"{document_id}/{version_id}"})
        raise
    state.set_status(document_id, version_id, "done", **result)
    logger.info(
        "note done",
        extra={"document_version": f"{document_id}/{version_id}", "mentions": result["mentions"]},
    )
    return result
