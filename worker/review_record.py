"""The worker's record of a note version for the review pages (issue 16): what it read and what each mention became.

Written after the write-back, into Redis under the note's key prefix (``core/review.py``), for as long as the note
state is kept. It holds the note text (the note view shows it), so it is never logged; a failure to keep it is
logged by type only and never fails the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from core.deps import get_review_store
from core.settings import get_settings
from mappings.bundle import ModelInfo, WritebackPlan, map_mentions
from mappings.context import DocumentContext
from mappings.explain import text_only_reason, why_not_mapped
from mappings.identity import identifier_value
from mappings.mentions import Mention
from mappings.profile import MappingProfile

logger = logging.getLogger("fhir_ner.worker")


class RecordingWriter:
    """Passes writes to the real writer and keeps the last transaction and its response."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.bundle: dict[str, Any] | None = None
        self.response: dict[str, Any] | None = None

    def write(self, bundle: dict[str, Any], name: str) -> dict[str, Any]:
        response: dict[str, Any] = self.writer.write(bundle, name)
        self.bundle, self.response = bundle, response
        return response

    def derived_resources(
        self, namespace: str, document_id: str, resource_types: Sequence[str]
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.writer.derived_resources(namespace, document_id, resource_types)
        return found


def _location(response_entry: dict[str, Any]) -> str | None:
    location = str((response_entry.get("response") or {}).get("location") or "")
    parts = location.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def written_references(
    bundle: dict[str, Any] | None, response: dict[str, Any] | None, namespace: str
) -> tuple[dict[str, str], str | None]:
    """(identifier value -> ``Type/id`` for every POSTed resource, the CREATE Provenance's ``Type/id``)."""
    by_identifier: dict[str, str] = {}
    provenance: str | None = None
    if not bundle or not response:
        return by_identifier, provenance
    for sent, got in zip(bundle.get("entry") or [], response.get("entry") or [], strict=False):
        resource = sent.get("resource") or {}
        location = _location(got)
        if location is None or (sent.get("request") or {}).get("method") != "POST":
            continue
        if resource.get("resourceType") == "Provenance":
            activity = ((resource.get("activity") or {}).get("coding") or [{}])[0].get("code")
            if activity == "CREATE":
                provenance = location
            continue
        value = identifier_value(resource, namespace)
        if value:
            by_identifier[value] = location
    return by_identifier, provenance


def _codes(resource: dict[str, Any]) -> list[dict[str, str]]:
    concept = resource.get("code") or {}
    return [
        {"system": str(c.get("system") or ""), "code": str(c.get("code") or ""), "display": str(c.get("display") or "")}
        for c in concept.get("coding") or []
    ]


def _status(resource: dict[str, Any]) -> str:
    """The resource's own status words: verification for a Condition, else ``status``."""
    if resource.get("resourceType") == "Condition":
        coding = ((resource.get("verificationStatus") or {}).get("coding") or [{}])[0]
        return str(coding.get("code") or "")
    return str(resource.get("status") or "")


def build_record(
    context: DocumentContext,
    text: str | None,
    mentions: Sequence[Mention],
    plan: WritebackPlan,
    profile: MappingProfile,
    model: ModelInfo,
    references: dict[str, str],
    provenance: str | None,
) -> dict[str, Any]:
    """The review record of one note version (see ``core/review.py``)."""
    settings = get_settings()
    namespace = settings.identifier_namespace
    # Mapped again without the terminology (cheap): the mention keys say which resource each mention is.
    mapped = map_mentions(context, list(mentions), profile, model, namespace)
    by_mention = {
        (m.mention.label, m.mention.start, m.mention.end, m.mention.assertion): m for m in mapped if m.mention
    }
    kept = {derived.mention_key: derived for derived in plan.kept if derived.mention_key}
    created = {item.mention_key: item for item in plan.created}
    entries: list[dict[str, Any]] = []
    seen: set[tuple[str, int, int, str]] = set()
    for index, mention in enumerate(sorted(mentions, key=lambda m: (m.start, m.end, m.label))):
        key = (mention.label, mention.start, mention.end, mention.assertion)
        item = by_mention.get(key)
        entry: dict[str, Any] = {
            "index": index,
            "label": mention.label,
            "start": mention.start,
            "end": mention.end,
            "text": mention.text,
            "confidence": round(float(mention.confidence), 4),
            "assertion": mention.assertion,
            "codes": [],
            "resource": None,
            "resource_type": None,
            "mention_key": None,
            "status": None,
            "outcome": "none",
            "reason": None,
        }
        if item is None:
            entry["reason"] = why_not_mapped(mention, profile) or "dropped by profile"
        elif key in seen:
            entry["reason"] = "deduplicated: the same mention is already written"
        else:
            seen.add(key)
            entry.update(
                resource_type=item.resource.get("resourceType"),
                mention_key=item.mention_key,
                reason=text_only_reason(mention, profile),
            )
            if item.mention_key in created:
                written = created[item.mention_key]
                entry.update(
                    resource=references.get(written.identifier_value),
                    outcome="written",
                    codes=_codes(written.resource),
                    status=_status(written.resource),
                )
            elif item.mention_key in kept:
                derived = kept[item.mention_key]
                entry.update(
                    resource=derived.reference,
                    outcome="kept",
                    codes=_codes(derived.resource),
                    status=_status(derived.resource),
                )
            elif plan.superseded_by is not None:
                entry["reason"] = f"superseded: the EHR holds results of version {plan.superseded_by}"
            else:
                entry["reason"] = "not written: a reviewer rejected this finding"
        entries.append(entry)
    entries.extend(_reviewer_entries(plan, {m.mention_key for m in mapped}, text, profile, len(entries)))
    retired = [
        {
            "reference": derived.reference,
            "text": str(((derived.resource.get("code") or {}).get("text")) or ""),
            "from_version": derived.document_version,
        }
        for derived in plan.retired
    ]
    return {
        "document": context.document_id,
        "version": context.version_id,
        "subject": context.subject,
        "date": context.date,
        "language": context.language,
        "attachment": context.attachment_path,
        "text": text,
        "mentions": entries,
        "model": {"name": model.name, "revision": model.revision},
        "provenance": provenance,
        "retired": retired,
        "superseded_by": plan.superseded_by,
        "profile": profile.name,
        "ehr_base_url": None if settings.writeback_dir else settings.ehr_base_url,
        "recorded": time.time(),
    }


def _derivation_span(resource: dict[str, Any]) -> tuple[int, int] | None:
    for extension in resource.get("extension") or []:
        parts = {part.get("url"): part for part in extension.get("extension") or []}
        if "offset" in parts and "length" in parts:
            start = int(parts["offset"].get("valueInteger") or 0)
            return start, start + int(parts["length"].get("valueInteger") or 0)
    return None


def _reviewer_entries(
    plan: WritebackPlan, machine_keys: set[str], text: str | None, profile: MappingProfile, first_index: int
) -> list[dict[str, Any]]:
    """Resources a reviewer added (or moved to another type) that this version keeps without the model yielding
    them: listed too, at their words in this version's text when they are still there."""
    from mappings.registry import mapper_resource_type

    entries: list[dict[str, Any]] = []
    for derived in plan.kept:
        if not derived.review or derived.mention_key in machine_keys:
            continue
        concept = derived.resource.get("code") or {}
        said = str(concept.get("text") or "")
        span = _derivation_span(derived.resource)
        if text is not None and span and text[span[0] : span[1]] != said:
            found = text.find(said) if said else -1
            span = (found, found + len(said)) if found >= 0 else None
        label = next(
            (name for name, m in profile.labels.items() if mapper_resource_type(m.mapper) == derived.resource_type),
            derived.resource_type,
        )
        entries.append(
            {
                "index": first_index + len(entries),
                "label": label,
                "start": span[0] if span else 0,
                "end": span[1] if span else 0,
                "text": said,
                "confidence": 1.0,
                "assertion": "present",
                "codes": _codes(derived.resource),
                "resource": derived.reference,
                "resource_type": derived.resource_type,
                "mention_key": derived.mention_key,
                "status": _status(derived.resource),
                "outcome": "kept",
                "reason": f"{derived.review} by a reviewer" + ("" if span else "; its words are not in this version"),
                "reviewed": derived.review,
            }
        )
    return entries


def keep_review_text(context: DocumentContext, text: str) -> None:
    """The read stage keeps the note text for the review record (the hand-off to the model drops it)."""
    try:
        get_review_store().put_text(context.document_id, context.version_id, text)
    except Exception as error:  # noqa: BLE001 - the review record is a by-product; the job goes on
        logger.warning("review text not kept (%s)", type(error).__name__)


def keep_review_record(
    context: DocumentContext,
    mentions: Sequence[Mention],
    plan: WritebackPlan,
    profile: MappingProfile,
    model: ModelInfo,
    recorder: RecordingWriter,
) -> None:
    """Store the record; never fails the job (the write-back is done), and never logs the note."""
    try:
        settings = get_settings()
        store = get_review_store()
        references, provenance = written_references(recorder.bundle, recorder.response, settings.identifier_namespace)
        text = store.get_text(context.document_id, context.version_id)
        record = build_record(context, text, mentions, plan, profile, model, references, provenance)
        store.put_record(context.document_id, context.version_id, record)
        store.drop_text(context.document_id, context.version_id)
    except Exception as error:  # noqa: BLE001 - the review record is a by-product of a finished job
        logger.warning(
            "review record not kept (%s)",
            type(error).__name__,
            extra={"document_version": f"{context.document_id}/{context.version_id}"},
        )
