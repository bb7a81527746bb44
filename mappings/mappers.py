"""The built-in mappers. Each is pure: a mention and its note context in, one FHIR R4 resource dict out."""

from __future__ import annotations

from typing import Any

from mappings.clinical_status import condition_clinical_status
from mappings.context import DocumentContext
from mappings.mentions import Mention
from mappings.registry import register_mapper, register_retirement

CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"

# What each assertion becomes; a profile may override any entry through ``params``.
CONDITION_VERIFICATION_BY_ASSERTION = {
    "present": "unconfirmed",
    "negated": "refuted",
    "possible": "provisional",
    "hypothetical": "provisional",
    "historical": "unconfirmed",
}
UNCERTAIN_ASSERTIONS = frozenset({"possible", "hypothetical"})
PROCEDURE_STATUS_BY_ASSERTION = {
    "present": "completed",
    "negated": "not-done",
    "possible": "unknown",
    "hypothetical": "preparation",
    "historical": "completed",
}


def _concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _reference(reference: str | None) -> dict[str, str] | None:
    return {"reference": reference} if reference else None


def _with_context(resource: dict[str, Any], context: DocumentContext, encounter_key: str) -> dict[str, Any]:
    resource["subject"] = {"reference": context.subject}
    if context.encounter:
        resource[encounter_key] = {"reference": context.encounter}
    return resource


# The note's author made the statement the resource was read from (Condition/Procedure.asserter,
# Observation.performer); only reference types those elements accept are used.
_PERSON_TYPES = ("Practitioner/", "PractitionerRole/", "Patient/", "RelatedPerson/")


def _author(context: DocumentContext, allowed: tuple[str, ...] = _PERSON_TYPES) -> dict[str, str] | None:
    for author in context.authors:
        if author.startswith(allowed):
            return {"reference": author}
    return None


@register_mapper("condition", "Condition")
def map_condition(
    mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
) -> dict[str, Any]:
    verification = {**CONDITION_VERIFICATION_BY_ASSERTION, **params.get("verification", {})}
    # A profile's ``clinical`` map (assertion -> status) wins; otherwise the text and the code decide.
    clinical = params.get("clinical", {}).get(mention.assertion) or condition_clinical_status(mention, code)
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "clinicalStatus": _concept(CONDITION_CLINICAL, clinical),
        "verificationStatus": _concept(CONDITION_VERIFICATION, verification.get(mention.assertion, "unconfirmed")),
        "category": [_concept(CONDITION_CATEGORY, params.get("category", "encounter-diagnosis"))],
        "code": code,
    }
    _with_context(resource, context, "encounter")
    if context.date:
        resource["recordedDate"] = context.date
    asserter = _author(context)
    if asserter:
        resource["asserter"] = asserter
    return resource


@register_mapper("observation", "Observation")
def map_observation(
    mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": params.get("status", "preliminary"),
        "category": [_concept(OBSERVATION_CATEGORY, params.get("category", "exam"))],
        "code": code,
    }
    if mention.assertion == "negated":
        resource["valueBoolean"] = False
        resource["interpretation"] = [_concept(INTERPRETATION, "NEG")]
    elif mention.assertion in UNCERTAIN_ASSERTIONS:
        # Neither present nor absent: no value, interpretation "indeterminate".
        resource["interpretation"] = [_concept(INTERPRETATION, "IND")]
    else:
        resource["valueBoolean"] = True
    _with_context(resource, context, "encounter")
    if context.date:
        resource["effectiveDateTime"] = context.date
    performer = _author(context, ("Practitioner/", "PractitionerRole/", "Patient/", "RelatedPerson/", "CareTeam/"))
    if performer:
        resource["performer"] = [performer]
    return resource


@register_mapper("procedure", "Procedure")
def map_procedure(
    mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
) -> dict[str, Any]:
    statuses = {**PROCEDURE_STATUS_BY_ASSERTION, **params.get("status", {})}
    resource: dict[str, Any] = {
        "resourceType": "Procedure",
        "status": statuses.get(mention.assertion, "completed"),
        "code": code,
    }
    _with_context(resource, context, "encounter")
    asserter = _author(context)
    if asserter:
        resource["asserter"] = asserter
    return resource


@register_mapper("family-member-history", "FamilyMemberHistory")
def map_family_member_history(
    mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
) -> dict[str, Any]:
    """The note says a relative has it: never a Condition of the patient."""
    return {
        "resourceType": "FamilyMemberHistory",
        "status": "partial",
        "patient": {"reference": context.subject},
        "relationship": {
            "coding": [{"system": ROLE_CODE, "code": params.get("relationship", "FAMMEMB")}],
            "text": "family member",
        },
        "condition": [{"code": code}],
        **({"date": context.date} if context.date else {}),
    }


# --------------------------------------------------------------------------------------------------
# Retirement: how each resource type is marked entered-in-error when its note no longer says it
# --------------------------------------------------------------------------------------------------
def _without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    retired = {key: value for key, value in resource.items() if key != "meta"}
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        retired["meta"] = meta
    return retired


def _retire_condition(resource: dict[str, Any]) -> dict[str, Any]:
    retired = _without_server_meta(resource)
    retired["verificationStatus"] = _concept(CONDITION_VERIFICATION, "entered-in-error")
    retired.pop("clinicalStatus", None)  # con-5: no clinicalStatus on an entered-in-error Condition
    return retired


def _condition_retired(resource: dict[str, Any]) -> bool:
    codings = (resource.get("verificationStatus") or {}).get("coding") or []
    return any(c.get("system") == CONDITION_VERIFICATION and c.get("code") == "entered-in-error" for c in codings)


def _retire_status(resource: dict[str, Any]) -> dict[str, Any]:
    retired = _without_server_meta(resource)
    retired["status"] = "entered-in-error"
    return retired


def _status_retired(resource: dict[str, Any]) -> bool:
    return resource.get("status") == "entered-in-error"


register_retirement("Condition", _retire_condition, _condition_retired)
for _resource_type in ("Observation", "Procedure", "FamilyMemberHistory"):
    register_retirement(_resource_type, _retire_status, _status_retired)
