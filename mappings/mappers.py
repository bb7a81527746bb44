"""The built-in mappers. Each is pure: a mention and its note context in, one FHIR R4 resource dict out."""

from __future__ import annotations

from typing import Any

from mappings.context import DocumentContext
from mappings.mentions import Mention
from mappings.registry import register_mapper

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
CONDITION_CLINICAL_BY_ASSERTION = {"historical": "resolved"}
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


@register_mapper("condition")
def map_condition(
    mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
) -> dict[str, Any]:
    verification = {**CONDITION_VERIFICATION_BY_ASSERTION, **params.get("verification", {})}
    clinical = {**CONDITION_CLINICAL_BY_ASSERTION, **params.get("clinical", {})}
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "clinicalStatus": _concept(CONDITION_CLINICAL, clinical.get(mention.assertion, "active")),
        "verificationStatus": _concept(CONDITION_VERIFICATION, verification.get(mention.assertion, "unconfirmed")),
        "category": [_concept(CONDITION_CATEGORY, params.get("category", "encounter-diagnosis"))],
        "code": code,
    }
    _with_context(resource, context, "encounter")
    if context.date:
        resource["recordedDate"] = context.date
    return resource


@register_mapper("observation")
def map_observation(
    mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
) -> dict[str, Any]:
    negated = mention.assertion == "negated"
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": params.get("status", "preliminary"),
        "category": [_concept(OBSERVATION_CATEGORY, params.get("category", "exam"))],
        "code": code,
        "valueBoolean": not negated,
    }
    if negated:
        resource["interpretation"] = [_concept(INTERPRETATION, "NEG")]
    _with_context(resource, context, "encounter")
    if context.date:
        resource["effectiveDateTime"] = context.date
    return resource


@register_mapper("procedure")
def map_procedure(
    mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
) -> dict[str, Any]:
    statuses = {**PROCEDURE_STATUS_BY_ASSERTION, **params.get("status", {})}
    resource: dict[str, Any] = {
        "resourceType": "Procedure",
        "status": statuses.get(mention.assertion, "completed"),
        "code": code,
    }
    return _with_context(resource, context, "encounter")


@register_mapper("family-member-history")
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
