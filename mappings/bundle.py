"""Mentions → one FHIR R4 transaction Bundle: deterministic identifiers, traceability, Provenance."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from mappings.context import DocumentContext
from mappings.mentions import Mention
from mappings.profile import MappingProfile
from mappings.registry import get_mapper

DERIVATION_REFERENCE = "http://hl7.org/fhir/StructureDefinition/derivation-reference"
NLP_TAG_SYSTEM = "urn:fhir-ner-adapter:tag"
NLP_TAG = {"system": NLP_TAG_SYSTEM, "code": "nlp-derived", "display": "Derived by clinical NLP"}
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"


class MappingValidationError(ValueError):
    """A resource we built failed FHIR validation: a bug in a mapper or a profile, never sent out."""


@dataclass(frozen=True)
class ModelInfo:
    """The model that produced the mentions; named in identifiers, the Device and the Provenance."""

    name: str
    revision: str


@dataclass(frozen=True)
class MappedResource:
    mention: Mention | None
    identifier_value: str
    resource: dict[str, Any]


def stable_hash(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:40]


def mention_identifier(context: DocumentContext, mention: Mention, model: ModelInfo) -> str:
    """Same note version, mention and model → same identifier, so a replay finds what it wrote."""
    return stable_hash(
        context.document_id, context.version_id, mention.label, mention.start, mention.end, model.revision
    )


def _full_url(namespace: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{namespace}#{value}')}"


def _code_concept(mention: Mention, text_only: bool) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": mention.text}
    if mention.codes and not text_only:
        concept["coding"] = [
            {"system": c.system, "code": c.code, **({"display": c.display} if c.display else {})} for c in mention.codes
        ]
    return concept


def derivation_extension(context: DocumentContext, mention: Mention) -> dict[str, Any]:
    return {
        "url": DERIVATION_REFERENCE,
        "extension": [
            {"url": "reference", "valueReference": {"reference": context.versioned_reference}},
            {"url": "path", "valueString": context.attachment_path},
            {"url": "offset", "valueInteger": mention.start},
            {"url": "length", "valueInteger": mention.end - mention.start},
        ],
    }


def map_mentions(
    context: DocumentContext, mentions: list[Mention], profile: MappingProfile, model: ModelInfo, namespace: str
) -> list[MappedResource]:
    """Apply the profile to each mention; unknown labels and low-confidence drops are skipped."""
    mapped: list[MappedResource] = []
    for mention in sorted(mentions, key=lambda m: (m.start, m.end, m.label)):
        label_mapping = profile.labels.get(mention.label)
        if label_mapping is None:
            continue
        below = mention.confidence < label_mapping.min_confidence
        if below and label_mapping.below_threshold == "drop":
            continue
        if mention.assertion == "family":
            if profile.family == "drop":
                continue
            mapper = get_mapper(profile.family_mapper)
        else:
            mapper = get_mapper(label_mapping.mapper)
        resource = mapper(mention, context, label_mapping.params, _code_concept(mention, text_only=below))
        value = mention_identifier(context, mention, model)
        resource["identifier"] = [{"system": namespace, "value": value}]
        resource["meta"] = {"tag": [NLP_TAG]}
        resource["extension"] = [derivation_extension(context, mention)]
        mapped.append(MappedResource(mention=mention, identifier_value=value, resource=resource))
    return mapped


def device_resource(model: ModelInfo, namespace: str) -> tuple[str, dict[str, Any]]:
    value = stable_hash("device", model.name, model.revision)
    return value, {
        "resourceType": "Device",
        "identifier": [{"system": namespace, "value": value}],
        "status": "active",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "version": [{"value": model.revision}],
        "meta": {"tag": [NLP_TAG]},
    }


def validate_r4(resource: dict[str, Any]) -> None:
    """Validate with the fhir.resources R4B models (R4-compatible for every type we emit)."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except (ValidationError, KeyError, ValueError) as error:
        raise MappingValidationError(f"{resource.get('resourceType')} failed validation: {error}") from None


def build_transaction(
    context: DocumentContext,
    mentions: list[Mention],
    profile: MappingProfile,
    model: ModelInfo,
    namespace: str,
    recorded: str,
) -> dict[str, Any]:
    """The transaction Bundle for one note version; empty (no entries) when nothing maps.

    Every entry is a conditional create on its identifier, so posting the same Bundle twice writes once.
    """
    mapped = map_mentions(context, mentions, profile, model, namespace)
    if not mapped:
        return {"resourceType": "Bundle", "type": "transaction", "entry": []}
    device_value, device = device_resource(model, namespace)
    device_url = _full_url(namespace, device_value)
    entries: list[dict[str, Any]] = [_entry(device_url, device, namespace, device_value)]
    targets: list[dict[str, str]] = []
    for item in mapped:
        url = _full_url(namespace, item.identifier_value)
        entries.append(_entry(url, item.resource, namespace, item.identifier_value))
        targets.append({"reference": url})
    provenance_value = stable_hash("provenance", context.document_id, context.version_id, model.revision)
    provenance = {
        "resourceType": "Provenance",
        "target": targets,
        "recorded": recorded,
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE"}], "text": "clinical NLP extraction"},
        "agent": [
            {
                "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "assembler"}]},
                "who": {"reference": device_url, "display": f"{model.name} ({model.revision})"},
            }
        ],
        "entity": [{"role": "source", "what": {"reference": context.versioned_reference}}],
        # R4 Provenance has no identifier: a per-note-version tag makes its conditional create idempotent.
        "meta": {"tag": [NLP_TAG, {"system": f"{namespace}/provenance", "code": provenance_value}]},
    }
    provenance_entry = _entry(_full_url(namespace, provenance_value), provenance, namespace, provenance_value)
    provenance_entry["request"]["ifNoneExist"] = f"_tag={namespace}/provenance|{provenance_value}"
    entries.append(provenance_entry)
    for entry in entries:
        validate_r4(entry["resource"])
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _entry(full_url: str, resource: dict[str, Any], namespace: str, value: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={namespace}|{value}",
        },
    }
