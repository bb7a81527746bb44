"""A reviewer's actions on derived resources as one FHIR transaction each (issue 16). Pure: the worker reads the
resource and the note from the EHR and writes what these functions build.

Four actions, each a transaction of the changed resource(s), the adapter's ``Device`` and one ``Provenance``
that names the reviewer (by display name, from the login) and the adapter (the Device):

* ``confirm``: a Condition's ``verificationStatus`` becomes ``confirmed`` (a refuted one stays refuted: the
  reviewer agrees the note rules it out), an Observation's ``status`` becomes ``final``; others keep their
  content. Provenance activity UPDATE.
* ``reject``: the resource becomes entered-in-error (the same rule a note revision uses). Activity NULLIFY.
* ``correct``: the mention's span, label or code changes; the resource is mapped again from the corrected
  mention by the profile's mappers and PUT in place (same id, same identifiers). When the new label maps to
  another resource type, the old resource is marked rejected and a new one is created. Activity UPDATE.
* ``add``: a missed mention becomes a new resource through the same mappers as the model's mentions, with
  the mention key the model would give it (so a later run that finds it keeps it, not a copy). Activity CREATE.

Every resource a reviewer touched carries a ``meta.tag`` ``{namespace}/review|{state}`` (confirmed, rejected,
corrected, added). The write stage reads those tags on the resources it finds for the note
(``mappings/revisions.py``): a rejected finding is never created again by a later version or a reprocess,
and a confirmed, corrected or added resource is kept as the reviewer left it.

Idempotent: PUTs carry ``ifMatch`` on the version read, the Device and the Provenance are conditional creates
(the Provenance's tag is a hash of the action id), new resources have deterministic identifiers.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mappings.bundle import (
    ADAPTER_NAME,
    PARTICIPANT_TYPE,
    MappedResource,
    ModelInfo,
    map_mentions,
    provenance_entry,
    validate_r4,
)
from mappings.context import DocumentContext
from mappings.identity import NLP_TAG, stable_hash
from mappings.mappers import CONDITION_VERIFICATION
from mappings.mentions import Mention
from mappings.profile import MappingProfile
from mappings.registry import get_retirement

REVIEW_STATES = ("confirmed", "rejected", "corrected", "added")
#: The "model" of reviewer-made resources: their namespace identifier hashes this revision in, not a model's.
REVIEW_MODEL = ModelInfo(f"{ADAPTER_NAME} review", "review")
ACTIVITIES = {
    "confirm": ("UPDATE", "reviewer confirmed the derived resource", "verifier"),
    "reject": ("NULLIFY", "reviewer rejected the derived resource: entered in error", "verifier"),
    "correct": ("UPDATE", "reviewer corrected the mention's span, label or code", "author"),
    "add": ("CREATE", "reviewer added a mention the model missed", "author"),
}


class ReviewActionError(ValueError):
    """The action cannot be applied (e.g. confirming a rejected resource); the message is shown to the reviewer."""


def review_tag_system(namespace: str) -> str:
    return f"{namespace}/review"


def review_state(resource: dict[str, Any], namespace: str) -> str | None:
    """The reviewer's last word on a resource (one of ``REVIEW_STATES``), or None when no reviewer touched it."""
    system = review_tag_system(namespace)
    for tag in (resource.get("meta") or {}).get("tag") or []:
        if tag.get("system") == system and tag.get("code") in REVIEW_STATES:
            return str(tag["code"])
    return None


def _with_review_tag(resource: dict[str, Any], namespace: str, state: str) -> dict[str, Any]:
    """A copy without the server's meta (versionId, lastUpdated), its review tag set to ``state``."""
    result = copy.deepcopy(resource)
    meta = {k: v for k, v in (result.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    system = review_tag_system(namespace)
    tags = [t for t in meta.get("tag") or [] if t.get("system") != system]
    tags.append({"system": system, "code": state, "display": f"{state} by a reviewer"})
    meta["tag"] = tags
    result["meta"] = meta
    return result


def is_retired(resource: dict[str, Any]) -> bool:
    return bool(get_retirement(str(resource.get("resourceType"))).is_retired(resource))


def confirmed_copy(resource: dict[str, Any], namespace: str) -> dict[str, Any]:
    if is_retired(resource):
        raise ReviewActionError("it is entered-in-error: a rejected or retired resource cannot be confirmed")
    result = _with_review_tag(resource, namespace, "confirmed")
    kind = result.get("resourceType")
    if kind == "Condition":
        codings = (result.get("verificationStatus") or {}).get("coding") or [{}]
        if codings[0].get("code") != "refuted":
            result["verificationStatus"] = {"coding": [{"system": CONDITION_VERIFICATION, "code": "confirmed"}]}
    elif kind == "Observation" and result.get("status") in ("preliminary", "registered"):
        result["status"] = "final"
    return result


def rejected_copy(resource: dict[str, Any], namespace: str) -> dict[str, Any]:
    retired = get_retirement(str(resource.get("resourceType"))).retire(resource)
    return _with_review_tag(retired, namespace, "rejected")


def reviewed_mapping(
    context: DocumentContext, mention: Mention, profile: MappingProfile, namespace: str
) -> MappedResource:
    """The reviewer's mention through the profile's mappers, as the model's would be; raises when the profile
    writes nothing for it (an unknown label, a dropped assertion)."""
    mapped = map_mentions(context, [mention], profile, REVIEW_MODEL, namespace)
    if not mapped:
        raise ReviewActionError(f"the profile {profile.name} writes no resource for a {mention.label} mention")
    return mapped[0]


def corrected_replacement(
    old: dict[str, Any], context: DocumentContext, mention: Mention, profile: MappingProfile, namespace: str
) -> MappedResource | None:
    """The new resource of a correction whose label now maps to another resource type; None when it does not."""
    item = reviewed_mapping(context, mention, profile, namespace)
    if item.resource.get("resourceType") == old.get("resourceType"):
        return None
    return MappedResource(
        item.mention, item.identifier_value, _with_review_tag(item.resource, namespace, "added"), item.mention_key
    )


def corrected_copy(
    old: dict[str, Any], context: DocumentContext, mention: Mention, profile: MappingProfile, namespace: str
) -> dict[str, Any] | MappedResource:
    """The old resource rewritten from the corrected mention (same id and identifiers) when the type stays;
    otherwise the new resource to create (the caller rejects the old one)."""
    if is_retired(old):
        raise ReviewActionError("it is entered-in-error: a rejected or retired resource cannot be corrected")
    replacement = corrected_replacement(old, context, mention, profile, namespace)
    if replacement is not None:
        return replacement
    item = reviewed_mapping(context, mention, profile, namespace)
    result = copy.deepcopy(item.resource)
    result["id"] = old["id"]
    result["identifier"] = copy.deepcopy(old.get("identifier") or item.resource["identifier"])
    result["meta"] = copy.deepcopy(old.get("meta") or {})
    return _with_review_tag(result, namespace, "corrected")


def added_resource(
    context: DocumentContext, mention: Mention, profile: MappingProfile, namespace: str
) -> MappedResource:
    item = reviewed_mapping(context, mention, profile, namespace)
    return MappedResource(
        item.mention, item.identifier_value, _with_review_tag(item.resource, namespace, "added"), item.mention_key
    )


def _full_url(namespace: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{namespace}#{value}')}"


def adapter_device(namespace: str) -> tuple[str, dict[str, Any]]:
    """The adapter itself as a Device: the Provenance's second agent, next to the reviewer."""
    value = stable_hash("device", ADAPTER_NAME)
    return value, {
        "resourceType": "Device",
        "identifier": [{"system": namespace, "value": value}],
        "status": "active",
        "deviceName": [{"name": ADAPTER_NAME, "type": "user-friendly-name"}],
        "meta": {"tag": [NLP_TAG]},
    }


def review_provenance_tag(action_id: str) -> str:
    return stable_hash("review", action_id)


@dataclass(frozen=True)
class ReviewWrite:
    """What one action writes: PUTs of existing resources (``Type/id`` -> (resource, version read)), new
    resources, and who did it."""

    kind: str
    action_id: str
    reviewer: str
    document_id: str
    document_version: str
    #: ``Practitioner/{id}`` (or PractitionerRole) of a reviewer who came by a SMART launch, else None.
    reviewer_reference: str | None = None
    updates: Sequence[tuple[dict[str, Any], str | None]] = ()
    creates: Sequence[MappedResource] = ()
    unchanged: Sequence[str] = ()  # ``Type/id`` already as the action leaves it (a rerun): Provenance targets only


def review_transaction(write: ReviewWrite, namespace: str, recorded: str) -> dict[str, Any]:
    """The action's transaction Bundle: Device, the PUTs (ifMatch), the creates (ifNoneExist), the Provenance."""
    activity, activity_text, reviewer_role = ACTIVITIES[write.kind]
    device_value, device = adapter_device(namespace)
    device_url = _full_url(namespace, device_value)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": device_url,
            "resource": device,
            "request": {"method": "POST", "url": "Device", "ifNoneExist": f"identifier={namespace}|{device_value}"},
        }
    ]
    targets: list[dict[str, str]] = [{"reference": reference} for reference in write.unchanged]
    for resource, version in write.updates:
        reference = f"{resource['resourceType']}/{resource['id']}"
        request: dict[str, Any] = {"method": "PUT", "url": reference}
        if version:
            request["ifMatch"] = f'W/"{version}"'
        entries.append({"resource": resource, "request": request})
        targets.append({"reference": reference})
    for item in write.creates:
        url = _full_url(namespace, item.identifier_value)
        entries.append(
            {
                "fullUrl": url,
                "resource": item.resource,
                "request": {
                    "method": "POST",
                    "url": item.resource["resourceType"],
                    "ifNoneExist": f"identifier={namespace}|{item.identifier_value}",
                },
            }
        )
        targets.append({"reference": url})
    reviewer_who = (
        {"reference": write.reviewer_reference, "display": write.reviewer}
        if write.reviewer_reference
        else {"display": write.reviewer}
    )
    entries.append(
        provenance_entry(
            namespace,
            write.document_id,
            review_provenance_tag(write.action_id),
            targets,
            recorded,
            activity,
            activity_text,
            agent=[
                {"type": {"coding": [{"system": PARTICIPANT_TYPE, "code": reviewer_role}]}, "who": reviewer_who},
                {
                    "type": {"coding": [{"system": PARTICIPANT_TYPE, "code": "enterer"}]},
                    "who": {"reference": device_url, "display": ADAPTER_NAME},
                },
            ],
            entity={
                "role": "source",
                "what": {"reference": f"DocumentReference/{write.document_id}/_history/{write.document_version}"},
            },
        )
    )
    for entry in entries:
        validate_r4(entry["resource"])
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
