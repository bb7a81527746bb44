"""Mentions → one FHIR R4 transaction Bundle: deterministic identifiers, traceability, Provenance, revisions.

The transaction for one note version holds:

- a conditional create (``ifNoneExist`` on the identifier) for each resource the version newly yields,
  the model's ``Device`` and one ``Provenance`` (activity CREATE) whose targets are those resources;
- when the EHR already holds resources derived from this note (``existing``, found by the worker), a PUT
  (``ifMatch`` on the version read) that marks each stale one entered-in-error, and one ``Provenance``
  (activity NULLIFY) whose targets are those. Resources the version still yields are left alone when their
  content is what this version maps them to; when it is not (another mapping profile or model codes or files
  the same mention differently), they are PUT in place under their ids (``ifMatch``), and the CREATE
  ``Provenance`` names them too.

See ``mappings/identity.py`` for the identifiers and tags, ``mappings/revisions.py`` for the rules.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

import mappings.mappers  # noqa: F401  (registers the built-in mappers and retirement rules)
from mappings.context import DocumentContext
from mappings.identity import (
    DERIVATION_REFERENCE,
    NLP_TAG,
    NLP_TAG_SYSTEM,
    document_tag,
    mention_key_system,
    provenance_tag_system,
    stable_hash,
)
from mappings.mentions import CandidateCode, Mention
from mappings.profile import LabelMapping, MappingProfile
from mappings.registry import get_mapper, mapper_resource_type
from mappings.revisions import DerivedResource, parse_existing, reconcile, retired_copy
from mappings.terminology import (
    DEFAULT_MIN_SCORE,
    CodeRequest,
    Terminology,
    code_request,
    min_scores,
    normalise,
    written_codes,
)

__all__ = [
    "DERIVATION_REFERENCE",
    "NLP_TAG",
    "NLP_TAG_SYSTEM",
    "MappedResource",
    "MappingValidationError",
    "ModelInfo",
    "WritebackPlan",
    "build_retraction",
    "build_transaction",
    "map_mentions",
    "mention_identifier",
    "mention_key",
    "plan_transaction",
    "profile_fingerprint",
    "provenance_entry",
    "stable_hash",
    "validate_r4",
]

PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
ADAPTER_NAME = "fhir-ner-adapter"


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
    mention_key: str = ""


@dataclass(frozen=True)
class WritebackPlan:
    """The transaction for one note version and what it does, for the note's status record."""

    bundle: dict[str, Any]
    created: list[MappedResource] = field(default_factory=list)
    kept: list[DerivedResource] = field(default_factory=list)  # with the content now written, for `updated`
    retired: list[DerivedResource] = field(default_factory=list)
    superseded_by: str | None = None
    updated: list[DerivedResource] = field(default_factory=list)  # kept ones rewritten in place (new content)

    @property
    def empty(self) -> bool:
        return not self.bundle["entry"]


def mention_identifier(context: DocumentContext, mention: Mention, model: ModelInfo) -> str:
    """Same note version, mention and model → same identifier, so a replay finds what it wrote."""
    return stable_hash(
        context.document_id, context.version_id, mention.label, mention.start, mention.end, model.revision
    )


def profile_fingerprint(profile: MappingProfile) -> str:
    """A short hash of a mapping profile: which profile a note's resources were mapped with."""
    return stable_hash("profile", profile.model_dump_json())[:16]


def mention_key(document_id: str, resource_type: str, mention: Mention, occurrence: int) -> str:
    """Version-, offset- and model-independent: the same finding in a revised note has the same key."""
    # A resolution cue ("neumonía resuelta") is part of the finding; without one the key is as it always was.
    resolution = (mention.resolution,) if mention.resolution else ()
    return stable_hash(
        "mention",
        document_id,
        resource_type,
        mention.label,
        mention.assertion,
        *resolution,
        normalise(mention.text),
        occurrence,
    )


def _full_url(namespace: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{namespace}#{value}')}"


def _code_concept(mention: Mention, codes: Sequence[CandidateCode]) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": mention.text}
    if codes:
        concept["coding"] = [
            {"system": c.system, "code": c.code, **({"display": c.display} if c.display else {})} for c in codes
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


@dataclass(frozen=True)
class _Selected:
    mention: Mention
    mapping: LabelMapping
    mapper: str
    text_only: bool


def _select(mentions: Sequence[Mention], profile: MappingProfile) -> list[_Selected]:
    """Apply the profile's filters: unknown labels, low confidence, dropped assertions, family mentions."""
    selected: list[_Selected] = []
    for mention in sorted(mentions, key=lambda m: (m.start, m.end, m.label)):
        mapping = profile.labels.get(mention.label)
        if mapping is None or mention.assertion in mapping.drop_assertions:
            continue
        below = mention.confidence < mapping.min_confidence
        if below and mapping.below_threshold == "drop":
            continue
        mapper = mapping.mapper
        if mention.assertion == "family":
            if profile.family_action(mention.label) == "drop":
                continue
            mapper = profile.family_mapper
        selected.append(_Selected(mention, mapping, mapper, text_only=below))
    return selected


def _choose_codes(
    selected: Sequence[_Selected],
    profile: MappingProfile,
    terminology: Terminology | None,
    language: str | None,
) -> list[tuple[CandidateCode, ...]]:
    """The codings of each selected mention: from the mention itself, or from the terminology (one batch)."""
    requests: list[CodeRequest] = []
    asked: list[int] = []
    for index, item in enumerate(selected):
        options = item.mapping.codes
        if options is None or item.text_only or item.mention.codes or terminology is None:
            continue
        # Only the written codes matter here: the terminology may leave unranked what cannot be written.
        floors = min_scores(terminology, options.systems, item.mention.label, options.min_score)
        requests.append(code_request(item.mention.text, item.mention.label, options, language, floors))
        asked.append(index)
    answers = terminology.lookup(requests) if (terminology is not None and requests) else []
    found = dict(zip(asked, answers, strict=True))
    chosen: list[tuple[CandidateCode, ...]] = []
    for index, item in enumerate(selected):
        options = item.mapping.codes
        if item.text_only:
            chosen.append(())
        elif item.mention.codes:
            minimum = (DEFAULT_MIN_SCORE if options.min_score is None else options.min_score) if options else 0.0
            chosen.append(tuple(c for c in item.mention.codes if c.score >= minimum))
        elif options is None or index not in found:
            chosen.append(())
        else:
            chosen.append(
                written_codes(found[index], options, item.mention.label, terminology, profile.custom_system_names())
            )
    return chosen


def map_mentions(
    context: DocumentContext,
    mentions: list[Mention],
    profile: MappingProfile,
    model: ModelInfo,
    namespace: str,
    terminology: Terminology | None = None,
) -> list[MappedResource]:
    """Apply the profile to each mention: one resource each, identified, tagged and traceable."""
    selected = _select(mentions, profile)
    codes = _choose_codes(selected, profile, terminology, context.language)
    occurrences: Counter[tuple[str, str, str, str]] = Counter()
    mapped: list[MappedResource] = []
    for item, chosen in zip(selected, codes, strict=True):
        mention = item.mention
        resource = get_mapper(item.mapper)(mention, context, item.mapping.params, _code_concept(mention, chosen))
        resource_type = mapper_resource_type(item.mapper)
        same = (resource_type, mention.label, mention.assertion, normalise(mention.text))
        key = mention_key(context.document_id, resource_type, mention, occurrences[same])
        occurrences[same] += 1
        value = mention_identifier(context, mention, model)
        resource["identifier"] = [
            {"system": namespace, "value": value},
            {"use": "secondary", "system": mention_key_system(namespace), "value": key},
        ]
        resource["meta"] = {"tag": [NLP_TAG, document_tag(namespace, context.document_id)]}
        resource["extension"] = [derivation_extension(context, mention)]
        mapped.append(MappedResource(mention=mention, identifier_value=value, resource=resource, mention_key=key))
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

    kind = resource.get("resourceType")
    try:
        get_fhir_model_class(str(kind)).model_validate(resource)
    except ValidationError as error:
        # Where and what, never the offending values: they may be note text (PHI) and end up in logs.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()[:5]
        )
        raise MappingValidationError(f"{kind} failed validation: {problems}") from None
    except (KeyError, ValueError):
        raise MappingValidationError(f"{kind} failed validation: unknown resource type") from None


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


def provenance_entry(
    namespace: str,
    document_id: str,
    tag_value: str,
    targets: list[dict[str, str]],
    recorded: str,
    activity: str,
    activity_text: str,
    agent: dict[str, Any] | list[dict[str, Any]],
    entity: dict[str, Any],
    policy: list[str] | None = None,
) -> dict[str, Any]:
    """A conditional POST of a Provenance, idempotent by its per-write tag (the model's writes and reviewers')."""
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": targets,
        "recorded": recorded,
        "activity": {"coding": [{"system": DATA_OPERATION, "code": activity}], "text": activity_text},
        "agent": agent if isinstance(agent, list) else [agent],
        "entity": [entity],
        **({"policy": policy} if policy else {}),
        # R4 Provenance has no identifier: a per-note-version tag makes its conditional create idempotent.
        "meta": {
            "tag": [
                NLP_TAG,
                document_tag(namespace, document_id),
                {"system": provenance_tag_system(namespace), "code": tag_value},
            ]
        },
    }
    return {
        "fullUrl": _full_url(namespace, tag_value),
        "resource": provenance,
        "request": {
            "method": "POST",
            "url": "Provenance",
            "ifNoneExist": f"_tag={provenance_tag_system(namespace)}|{tag_value}",
        },
    }


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    """What a derived resource says, without what only names or places it: its id and meta, its identifiers
    (they hold the note version and the model revision) and its derivation reference (offsets in the version
    read), and the mention's spelling in ``code.text`` is compared as its mention key compares it (a revision
    that writes "FIEBRE" for "fiebre" keeps the resource as it is). Equal contents: the resource is still
    derived identically and is not written again."""
    extensions = [e for e in resource.get("extension") or [] if e.get("url") != DERIVATION_REFERENCE]
    content = {k: v for k, v in resource.items() if k not in ("id", "meta", "identifier", "extension", "text")}
    if extensions:
        content["extension"] = extensions
    if isinstance(content.get("code"), dict):
        content["code"] = _normalised_text(content["code"])
    if isinstance(content.get("condition"), list):  # FamilyMemberHistory.condition[].code
        content["condition"] = [
            {**item, "code": _normalised_text(item["code"])} if isinstance(item.get("code"), dict) else item
            for item in content["condition"]
        ]
    return content


def _normalised_text(concept: dict[str, Any]) -> dict[str, Any]:
    text = concept.get("text")
    return {**concept, "text": normalise(text)} if isinstance(text, str) else concept


def _refresh_kept(
    kept: Sequence[DerivedResource], mapped: Sequence[MappedResource], version_id: str
) -> tuple[list[DerivedResource], list[DerivedResource]]:
    """(kept, updated): each kept resource as it stands after this version, and those whose content changes.

    A resource is kept by its mention key; a new profile or model may still map that mention to other content
    (code, category, status), and then the resource is rewritten in place so that the EHR says what the
    current mapping says. ``version_id`` stays the version read (the PUT's ``ifMatch``). A resource a reviewer
    confirmed, corrected or added (``review``) stays as the reviewer left it."""
    fresh = {m.mention_key: m for m in mapped}
    current: list[DerivedResource] = []
    updated: list[DerivedResource] = []
    for derived in kept:
        new = fresh.get(derived.mention_key or "")
        if new is None or derived.review or _content(new.resource) == _content(derived.resource):
            current.append(derived)
            continue
        rewritten = replace(derived, resource={**new.resource, "id": derived.id}, document_version=version_id)
        current.append(rewritten)
        updated.append(rewritten)
    return current, updated


def _update_entry(derived: DerivedResource) -> dict[str, Any]:
    request: dict[str, Any] = {"method": "PUT", "url": derived.reference}
    if derived.version_id:
        request["ifMatch"] = f'W/"{derived.version_id}"'
    return {"resource": derived.resource, "request": request}


def _retirement_entries(
    retire: Sequence[DerivedResource],
    namespace: str,
    document_id: str,
    version_id: str,
    recorded: str,
    retraction: bool,
) -> list[dict[str, Any]]:
    """PUT each stale resource back as entered-in-error, and one Provenance (NULLIFY) naming them."""
    if not retire:
        return []
    entries: list[dict[str, Any]] = []
    for derived in retire:
        request: dict[str, Any] = {"method": "PUT", "url": derived.reference}
        if derived.version_id:
            request["ifMatch"] = f'W/"{derived.version_id}"'
        entries.append({"resource": retired_copy(derived), "request": request})
    entries.append(
        provenance_entry(
            namespace,
            document_id,
            stable_hash("nullify", document_id, version_id),
            [{"reference": d.reference} for d in retire],
            recorded,
            "NULLIFY",
            "note retracted: derived resources entered in error"
            if retraction
            else "note revised: derived resources it no longer supports entered in error",
            {
                "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "performer"}]},
                "who": {"display": ADAPTER_NAME},
            },
            {
                "role": "removal" if retraction else "revision",
                "what": {"reference": f"DocumentReference/{document_id}/_history/{version_id}"},
            },
        )
    )
    return entries


def plan_transaction(
    context: DocumentContext,
    mentions: list[Mention],
    profile: MappingProfile,
    model: ModelInfo,
    namespace: str,
    recorded: str,
    *,
    terminology: Terminology | None = None,
    existing: Sequence[dict[str, Any]] = (),
    attest: bool = False,
) -> WritebackPlan:
    """The transaction for one note version, given the resources the EHR holds for the note (``existing``).

    ``attest`` (a re-read by another model, ``fhir-ner reprocess``): the Provenance naming this model is written
    even when every resource is kept, and it points at all of them; without it, only new resources get one.
    """
    mapped = map_mentions(context, mentions, profile, model, namespace, terminology)
    # The profile is named in the Provenance (and its tag): a re-read under another profile is attested anew.
    fingerprint = profile_fingerprint(profile)
    derived = parse_existing(existing, namespace, context.document_id)
    plan = reconcile([m.mention_key for m in mapped], derived, context.version_id)
    if plan.superseded_by is not None:
        return WritebackPlan(
            {"resourceType": "Bundle", "type": "transaction", "entry": []}, superseded_by=plan.superseded_by
        )
    to_create = set(plan.create)
    created = [m for m in mapped if m.mention_key in to_create]
    kept, updated = _refresh_kept(plan.kept, mapped, context.version_id)
    entries: list[dict[str, Any]] = []
    if created or updated or (attest and kept):
        device_value, device = device_resource(model, namespace)
        device_url = _full_url(namespace, device_value)
        entries.append(_entry(device_url, device, namespace, device_value))
        # A rerun after a write that stopped part-way: what that run already wrote for this version is kept,
        # and the Provenance (written last) must point at it too; so must what is rewritten now.
        targets: list[dict[str, str]] = [
            {"reference": derived.reference}
            for derived in kept
            if attest or derived.document_version == context.version_id
        ]
        for item in created:
            url = _full_url(namespace, item.identifier_value)
            entries.append(_entry(url, item.resource, namespace, item.identifier_value))
            targets.append({"reference": url})
        entries.extend(_update_entry(derived) for derived in updated)
        entries.append(
            provenance_entry(
                namespace,
                context.document_id,
                stable_hash("provenance", context.document_id, context.version_id, model.revision, fingerprint),
                targets,
                recorded,
                "CREATE",
                "clinical NLP extraction",
                {
                    "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "assembler"}]},
                    "who": {"reference": device_url, "display": f"{model.name} ({model.revision})"},
                },
                {"role": "source", "what": {"reference": context.versioned_reference}},
                policy=[f"{namespace}/profile#{fingerprint}"],
            )
        )
    entries.extend(
        _retirement_entries(plan.retire, namespace, context.document_id, context.version_id, recorded, retraction=False)
    )
    for entry in entries:
        validate_r4(entry["resource"])
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return WritebackPlan(bundle, created=created, kept=kept, retired=plan.retire, updated=updated)


def build_transaction(
    context: DocumentContext,
    mentions: list[Mention],
    profile: MappingProfile,
    model: ModelInfo,
    namespace: str,
    recorded: str,
    *,
    terminology: Terminology | None = None,
    existing: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The transaction Bundle for one note version; empty (no entries) when there is nothing to write.

    Every create is conditional on its identifier, so posting the same Bundle twice writes once.
    """
    return plan_transaction(
        context, mentions, profile, model, namespace, recorded, terminology=terminology, existing=existing
    ).bundle


def build_retraction(
    document_id: str, version_id: str, existing: Sequence[dict[str, Any]], namespace: str, recorded: str
) -> WritebackPlan:
    """The note was retracted (entered-in-error): every live resource derived from it is retired."""
    derived = parse_existing(existing, namespace, document_id)
    live = [d for d in derived if not d.retired]
    entries = _retirement_entries(live, namespace, document_id, version_id, recorded, retraction=True)
    for entry in entries:
        validate_r4(entry["resource"])
    return WritebackPlan({"resourceType": "Bundle", "type": "transaction", "entry": entries}, retired=live)
