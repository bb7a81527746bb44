"""The facts about a note that every derived resource needs, read from its DocumentReference."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


class DocumentContextError(ValueError):
    """The DocumentReference lacks something the mappings cannot do without (e.g. a subject)."""


@dataclass(frozen=True)
class DocumentContext:
    document_id: str
    version_id: str
    subject: str
    encounter: str | None = None
    date: str | None = None
    authors: tuple[str, ...] = field(default_factory=tuple)
    language: str | None = None
    attachment_index: int = 0
    # The note's kind (e.g. LOINC 11506-3 progress note) and class, as given: profiles and audits may use them.
    document_type: str | None = None
    categories: tuple[str, ...] = field(default_factory=tuple)

    @property
    def document_reference(self) -> str:
        return f"DocumentReference/{self.document_id}"

    @property
    def versioned_reference(self) -> str:
        """Derived resources point at the exact version they were read from."""
        return f"DocumentReference/{self.document_id}/_history/{self.version_id}"

    @property
    def attachment_path(self) -> str:
        return f"DocumentReference.content[{self.attachment_index}].attachment"


def document_version(document: dict[str, Any]) -> str:
    """``meta.versionId`` when the EHR gives one, else a content hash so that new content is a new version."""
    version = (document.get("meta") or {}).get("versionId")
    if version:
        return str(version)
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return "h" + hashlib.sha256(canonical).hexdigest()[:16]


def _relative(reference: str | None) -> str | None:
    """Keep ``Type/id`` of an absolute or relative reference, so results point into the EHR we write to."""
    if not reference:
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) < 2:
        return reference
    return f"{parts[-2]}/{parts[-1]}"


def context_from_document_reference(document: dict[str, Any], attachment_index: int = 0) -> DocumentContext:
    """Build the context from a (validated) DocumentReference as a JSON dict; R4 and R4B shapes alike."""
    if document.get("resourceType") != "DocumentReference":
        raise DocumentContextError("expected a DocumentReference")
    document_id = document.get("id")
    if not document_id:
        raise DocumentContextError("DocumentReference has no id")
    subject = _relative((document.get("subject") or {}).get("reference"))
    if not subject:
        raise DocumentContextError("DocumentReference has no subject reference")
    context = document.get("context") or {}
    encounters = context.get("encounter") or []
    encounter = _relative(encounters[0].get("reference")) if encounters else None
    authors = tuple(ref for ref in (_relative(a.get("reference")) for a in document.get("author") or []) if ref)
    contents = document.get("content") or []
    language = None
    if 0 <= attachment_index < len(contents):
        language = (contents[attachment_index].get("attachment") or {}).get("language")
    return DocumentContext(
        document_id=str(document_id),
        version_id=document_version(document),
        subject=subject,
        encounter=encounter,
        date=document.get("date"),
        authors=authors,
        language=language or document.get("language"),
        attachment_index=attachment_index,
        document_type=_concept_key(document.get("type")),
        categories=tuple(key for key in (_concept_key(c) for c in document.get("category") or []) if key),
    )


def _concept_key(concept: Any) -> str | None:
    """``system|code`` of a CodeableConcept's first coding, else its text."""
    if not isinstance(concept, dict):
        return None
    for coding in concept.get("coding") or []:
        if coding.get("code"):
            return f"{coding.get('system', '')}|{coding['code']}"
    text = concept.get("text")
    return str(text) if text else None
