"""Reviewer actions as FHIR writes, without an EHR (pure functions): what confirm, reject, correct and add build,
and how the review tags steer a later version's plan (never recreate a rejection, keep the reviewer's resources)."""

from __future__ import annotations

from typing import Any

from test_revisions import NAMESPACE, document, found, plan, stored

from mappings.bundle import validate_r4
from mappings.context import context_from_document_reference
from mappings.mentions import CandidateCode, Mention
from mappings.profile import load_profile
from mappings.review import (
    ReviewActionError,
    ReviewWrite,
    added_resource,
    confirmed_copy,
    corrected_copy,
    rejected_copy,
    review_state,
    review_transaction,
)

V1 = "Fiebre y tos. Neumonía. Cefalea."
PHRASES = (("SYMPTOM", "Fiebre", "present"), ("SYMPTOM", "tos", "present"), ("DISEASE", "Neumonía", "present"))


def first_version() -> dict[str, dict[str, Any]]:
    return {r["code"]["text"]: r for r in stored(plan("1", found(V1, *PHRASES), []).bundle)}


def test_confirm_and_reject_say_so_in_the_resource_and_its_review_tag() -> None:
    written = first_version()
    condition = confirmed_copy(written["Neumonía"], NAMESPACE)
    assert condition["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert review_state(condition, NAMESPACE) == "confirmed" and "versionId" not in condition["meta"]
    assert confirmed_copy(written["Fiebre"], NAMESPACE)["status"] == "final"
    refuted = {**written["Neumonía"], "verificationStatus": {"coding": [{"code": "refuted"}]}}
    assert confirmed_copy(refuted, NAMESPACE)["verificationStatus"]["coding"][0]["code"] == "refuted"
    rejected = rejected_copy(written["Neumonía"], NAMESPACE)
    assert rejected["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in rejected and review_state(rejected, NAMESPACE) == "rejected"
    try:
        confirmed_copy(rejected, NAMESPACE)
    except ReviewActionError as error:
        assert "entered-in-error" in str(error)
    else:
        raise AssertionError("a rejected resource was confirmed")
    for resource in (condition, rejected):
        validate_r4(resource)


def test_a_rejected_finding_is_never_recreated_and_reviewed_resources_are_kept_by_a_later_version() -> None:
    written = first_version()
    context = context_from_document_reference(document("1"))
    start = V1.index("Cefalea")
    added = added_resource(context, Mention("SYMPTOM", start, start + 7, "Cefalea"), load_profile(), NAMESPACE)
    ehr = [
        rejected_copy(written["tos"], NAMESPACE),
        confirmed_copy(written["Neumonía"], NAMESPACE),
        written["Fiebre"],
        {**added.resource, "id": "r99"},
    ]
    for resource in ehr:
        resource.setdefault("meta", {})["versionId"] = "2"
    # Version 2 says everything again but Neumonía and Cefalea: tos is not recreated; the confirmed Condition
    # and the added Observation are kept; only the unreviewed one the note no longer says would be retired.
    v2 = "Fiebre y tos."
    second = plan("2", found(v2, ("SYMPTOM", "Fiebre", "present"), ("SYMPTOM", "tos", "present")), ehr)
    assert second.created == []
    assert sorted(d.id for d in second.kept) == sorted([written["Neumonía"]["id"], written["Fiebre"]["id"], "r99"])
    assert second.retired == []
    # Without the review tag the same finding would be written again (what a revision does for a retirement).
    untagged = [dict(r) for r in ehr]
    untagged[0] = {**untagged[0], "meta": {"versionId": "2", "tag": written["tos"]["meta"]["tag"]}}
    again = plan("2", found(v2, ("SYMPTOM", "Fiebre", "present"), ("SYMPTOM", "tos", "present")), untagged)
    assert [m.mention.text for m in again.created if m.mention] == ["tos"]


def test_a_correction_rewrites_in_place_or_replaces_the_resource_when_the_type_changes() -> None:
    written = first_version()
    context = context_from_document_reference(document("1"))
    fever = written["Fiebre"]
    code = CandidateCode("http://hl7.org/fhir/sid/icd-10-cm", "R50.9", "Fever, unspecified")
    same = corrected_copy(fever, context, Mention("SYMPTOM", 0, 6, "Fiebre", codes=(code,)), load_profile(), NAMESPACE)
    assert isinstance(same, dict)
    assert same["id"] == fever["id"] and same["identifier"] == fever["identifier"]
    assert same["code"]["coding"][0]["code"] == "R50.9" and review_state(same, NAMESPACE) == "corrected"
    other = corrected_copy(fever, context, Mention("DISEASE", 0, 6, "Fiebre"), load_profile(), NAMESPACE)
    assert not isinstance(other, dict) and other.resource["resourceType"] == "Condition"


def test_an_action_is_one_transaction_with_the_reviewers_provenance_and_is_deterministic() -> None:
    written = first_version()
    confirmed = confirmed_copy(written["Neumonía"], NAMESPACE)
    write = ReviewWrite("confirm", "act-1", "Dr Ana Ruiz", "doc-1", "1", updates=[(confirmed, "1")])
    bundle = review_transaction(write, NAMESPACE, "2026-11-20T10:00:00Z")
    assert [e["request"]["method"] for e in bundle["entry"]] == ["POST", "PUT", "POST"]
    put = bundle["entry"][1]["request"]
    assert put == {"method": "PUT", "url": f"Condition/{confirmed['id']}", "ifMatch": 'W/"1"'}
    provenance = bundle["entry"][2]["resource"]
    assert [a["who"]["display"] for a in provenance["agent"]] == ["Dr Ana Ruiz", "fhir-ner-adapter"]
    assert provenance["target"] == [{"reference": f"Condition/{confirmed['id']}"}]
    assert bundle == review_transaction(write, NAMESPACE, "2026-11-20T10:00:00Z")
    assert bundle["entry"][2]["request"]["ifNoneExist"].startswith(f"_tag={NAMESPACE}/provenance|")
