"""Revisions without an EHR: which resources a note version keeps, creates and retires (pure functions)."""

from __future__ import annotations

import copy
from typing import Any

from mappings.bundle import ModelInfo, build_retraction, plan_transaction
from mappings.context import context_from_document_reference
from mappings.identity import derivation_source, document_search
from mappings.mentions import Mention
from mappings.profile import load_profile
from mappings.revisions import parse_existing, version_is_newer

NAMESPACE = "urn:test:ns"
MODEL = ModelInfo("tagger", "rev-1")
RECORDED = "2026-11-20T10:00:00Z"


def document(version: str, document_id: str = "doc-1") -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": document_id,
        "meta": {"versionId": version},
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain"}}],
    }


def found(text: str, *phrases: tuple[str, str, str]) -> list[Mention]:
    mentions = []
    for label, phrase, assertion in phrases:
        start = text.index(phrase)
        mentions.append(Mention(label, start, start + len(phrase), phrase, 0.9, assertion))
    return mentions


def stored(bundle: dict[str, Any], first_id: int = 1) -> list[dict[str, Any]]:
    """What an EHR would hold after the Bundle: the derived resources, with ids and versions."""
    resources = []
    for number, entry in enumerate(bundle["entry"], start=first_id):
        resource = copy.deepcopy(entry["resource"])
        if resource["resourceType"] in ("Device", "Provenance"):
            continue
        resource["id"] = f"r{number}"
        resource["meta"] = {**resource["meta"], "versionId": "1"}
        resources.append(resource)
    return resources


def plan(version: str, mentions: list[Mention], existing: list[dict[str, Any]]) -> Any:
    context = context_from_document_reference(document(version))
    return plan_transaction(context, mentions, load_profile(), MODEL, NAMESPACE, RECORDED, existing=existing)


V1 = "Fiebre y tos. Neumonía."
V2 = "Nota revisada. Fiebre. Sin Neumonía."


def test_a_revision_keeps_what_is_still_said_retires_the_rest_and_creates_the_new() -> None:
    first = plan(
        "1",
        found(V1, ("SYMPTOM", "Fiebre", "present"), ("SYMPTOM", "tos", "present"), ("DISEASE", "Neumonía", "present")),
        [],
    )
    existing = stored(first.bundle)
    assert [e.resource_type for e in parse_existing(existing, NAMESPACE, "doc-1")] == [
        "Condition",
        "Observation",
        "Observation",
    ]
    second = plan("2", found(V2, ("SYMPTOM", "Fiebre", "present"), ("DISEASE", "Neumonía", "negated")), existing)
    texts = {r["id"]: r["code"]["text"] for r in existing}
    assert [texts[k.id] for k in second.kept] == ["Fiebre"]
    assert sorted(texts[r.id] for r in second.retired) == ["Neumonía", "tos"]
    assert [m.mention.assertion for m in second.created if m.mention] == ["negated"]
    methods = [(e["request"]["method"], e["resource"]["resourceType"]) for e in second.bundle["entry"]]
    assert methods == [
        ("POST", "Device"),
        ("POST", "Condition"),
        ("POST", "Provenance"),
        ("PUT", "Condition"),
        ("PUT", "Observation"),
        ("POST", "Provenance"),
    ]
    put_condition = second.bundle["entry"][3]
    assert put_condition["request"] == {"method": "PUT", "url": "Condition/r4", "ifMatch": 'W/"1"'}
    assert put_condition["resource"]["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in put_condition["resource"]  # con-5
    assert "versionId" not in put_condition["resource"]["meta"]
    nullify = second.bundle["entry"][-1]["resource"]
    assert nullify["activity"]["coding"][0]["code"] == "NULLIFY"
    assert nullify["entity"] == [{"role": "revision", "what": {"reference": "DocumentReference/doc-1/_history/2"}}]
    assert sorted(t["reference"] for t in nullify["target"]) == ["Condition/r4", "Observation/r3"]


def test_a_replay_plans_nothing_and_a_late_older_version_is_superseded() -> None:
    mentions = found(V1, ("SYMPTOM", "Fiebre", "present"))
    existing = stored(plan("2", mentions, []).bundle)
    assert plan("2", mentions, existing).empty
    late = plan("1", mentions, existing)
    assert late.empty and late.superseded_by == "2"
    assert version_is_newer("10", "9") and not version_is_newer("h1a2b", "3") and not version_is_newer(None, "1")


def test_a_retraction_retires_everything_live_once() -> None:
    existing = stored(
        plan("1", found(V1, ("SYMPTOM", "tos", "present"), ("DISEASE", "Neumonía", "present")), []).bundle
    )
    retraction = build_retraction("doc-1", "2", existing, NAMESPACE, RECORDED)
    assert sorted(r.reference for r in retraction.retired) == ["Condition/r3", "Observation/r2"]
    assert retraction.bundle["entry"][-1]["resource"]["entity"][0]["role"] == "removal"
    after = [e["resource"] | {"id": e["request"]["url"].split("/")[1]} for e in retraction.bundle["entry"][:-1]]
    assert build_retraction("doc-1", "3", after, NAMESPACE, RECORDED).empty
    assert build_retraction("doc-1", "2", [], NAMESPACE, RECORDED).empty


def test_foreign_resources_are_never_ours() -> None:
    existing = stored(plan("1", found(V1, ("SYMPTOM", "tos", "present")), []).bundle)
    other_note = copy.deepcopy(existing[0])
    other_note["extension"][0]["extension"][0]["valueReference"]["reference"] = "DocumentReference/doc-2/_history/1"
    no_identifier = {k: v for k, v in existing[0].items() if k != "identifier"}
    unknown_type = {**existing[0], "resourceType": "Basic"}
    assert parse_existing([other_note, no_identifier, unknown_type], NAMESPACE, "doc-1") == []
    assert derivation_source(existing[0]) == ("doc-1", "1")
    assert document_search(NAMESPACE, "doc-1") == "_tag=urn:test:ns/document|doc-1"


def test_mention_keys_ignore_offsets_case_model_and_version_but_not_assertion_or_occurrence() -> None:
    def keys(version: str, text: str, *phrases: tuple[str, str, str], model: ModelInfo = MODEL) -> list[str]:
        context = context_from_document_reference(document(version))
        result = plan_transaction(context, found(text, *phrases), load_profile(), model, NAMESPACE, RECORDED)
        return [m.mention_key for m in result.created]

    base = keys("1", "Tos.", ("SYMPTOM", "Tos", "present"))
    assert keys("2", "Ayer: TOS.", ("SYMPTOM", "TOS", "present"), model=ModelInfo("tagger", "rev-2")) == base
    assert keys("1", "Tos.", ("SYMPTOM", "Tos", "negated")) != base
    assert keys("1", "Tos.", ("DISEASE", "Tos", "present")) != base
    two = keys("1", "Tos y tos.", ("SYMPTOM", "Tos", "present"), ("SYMPTOM", "tos", "present"))
    assert two[0] == base[0] and two[1] != base[0]


def test_a_kept_resource_whose_mapping_changed_is_put_in_place_and_an_unchanged_one_is_not_written() -> None:
    mentions = found(V1, ("SYMPTOM", "Fiebre", "present"), ("DISEASE", "Neumonía", "present"))
    existing = stored(plan("1", mentions, []).bundle)
    profile = load_profile()
    changed = profile.model_copy(deep=True)
    changed.labels["DISEASE"].params["category"] = "problem-list-item"
    context = context_from_document_reference(document("1"))
    again = plan_transaction(context, mentions, changed, MODEL, NAMESPACE, RECORDED, existing=existing)
    condition = next(r for r in existing if r["resourceType"] == "Condition")
    assert [d.reference for d in again.updated] == [f"Condition/{condition['id']}"] and again.retired == []
    assert not again.created and sorted(d.reference for d in again.kept) == sorted(
        f"{r['resourceType']}/{r['id']}" for r in existing
    )
    methods = [(e["request"]["method"], e["resource"]["resourceType"]) for e in again.bundle["entry"]]
    assert methods == [("POST", "Device"), ("PUT", "Condition"), ("POST", "Provenance")]
    put = again.bundle["entry"][1]
    assert put["request"] == {"method": "PUT", "url": f"Condition/{condition['id']}", "ifMatch": 'W/"1"'}
    assert put["resource"]["id"] == condition["id"]
    assert put["resource"]["category"][0]["coding"][0]["code"] == "problem-list-item"
    assert put["resource"]["identifier"] == condition["identifier"]  # same note version, mention and model
    provenance = again.bundle["entry"][-1]["resource"]
    # Its targets: what this note version's resources are now (the same version: the kept one too).
    assert sorted(t["reference"] for t in provenance["target"]) == sorted(d.reference for d in again.kept)
    assert provenance["policy"] != plan("1", mentions, []).bundle["entry"][-1]["resource"]["policy"]
    # Under the profile it was written with, nothing is written; under the new one, once it holds the new content.
    assert plan("1", mentions, existing).bundle["entry"] == []
    rewritten = [put["resource"] if r["id"] == condition["id"] else r for r in existing]
    assert plan_transaction(context, mentions, changed, MODEL, NAMESPACE, RECORDED, existing=rewritten).empty
