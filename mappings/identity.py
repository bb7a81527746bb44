"""How derived resources are named and found again: identifiers, tags and the derivation reference.

Every derived resource carries:

- ``identifier[0]`` (system = the namespace): a hash of note id, note version, label, offsets and model
  revision. It names this resource of this note version; the transaction's ``ifNoneExist`` uses it, so a
  replay writes nothing twice.
- ``identifier[1]`` (system = ``{namespace}/mention``, use ``secondary``): the *mention key*, a hash of the
  note id, the resource type, the label, the assertion, the normalised mention text and its occurrence
  number among equal mentions in the note. It leaves out the version, the offsets and the model, so the
  same finding in a later version of the note has the same key even when text around it moved.
- ``meta.tag`` ``{namespace}/document|{note id}``: every resource derived from any version of a note is
  found with one search per resource type, ``Condition?_tag={namespace}/document|{note id}``.
- the HL7 ``derivation-reference`` extension, pointing at ``DocumentReference/{id}/_history/{version}``.
"""

from __future__ import annotations

import hashlib
from typing import Any

DERIVATION_REFERENCE = "http://hl7.org/fhir/StructureDefinition/derivation-reference"
NLP_TAG_SYSTEM = "urn:fhir-ner-adapter:tag"
NLP_TAG = {"system": NLP_TAG_SYSTEM, "code": "nlp-derived", "display": "Derived by clinical NLP"}


def stable_hash(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:40]


def mention_key_system(namespace: str) -> str:
    return f"{namespace}/mention"


def document_tag_system(namespace: str) -> str:
    return f"{namespace}/document"


def provenance_tag_system(namespace: str) -> str:
    return f"{namespace}/provenance"


def document_tag(namespace: str, document_id: str) -> dict[str, str]:
    return {"system": document_tag_system(namespace), "code": document_id}


def document_search(namespace: str, document_id: str) -> str:
    """The search parameters that find every resource derived from any version of a note."""
    return f"_tag={document_tag_system(namespace)}|{document_id}"


def identifier_value(resource: dict[str, Any], system: str) -> str | None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("system") == system and identifier.get("value"):
            return str(identifier["value"])
    return None


def derivation_source(resource: dict[str, Any]) -> tuple[str, str | None] | None:
    """(note id, note version) from the resource's derivation-reference extension, or None."""
    for extension in resource.get("extension") or []:
        if extension.get("url") != DERIVATION_REFERENCE:
            continue
        for part in extension.get("extension") or []:
            if part.get("url") != "reference":
                continue
            reference = str((part.get("valueReference") or {}).get("reference") or "")
            head, _, version = reference.partition("/_history/")
            kind, _, document_id = head.rpartition("/")
            if kind.endswith("DocumentReference") and document_id:
                return document_id, version or None
    return None
