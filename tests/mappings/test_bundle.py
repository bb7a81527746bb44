"""Mentions → FHIR: each label, each assertion, determinism, traceability, profile validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mappings.bundle import DERIVATION_REFERENCE, ModelInfo, build_transaction
from mappings.context import DocumentContextError, context_from_document_reference, document_version
from mappings.mentions import Mention
from mappings.profile import ProfileError, load_profile

NOTE = "Neumonía. No fiebre. Posible asma. Se realizó TC. Madre con diabetes."
DOCUMENT = {
    "resourceType": "DocumentReference",
    "id": "doc-7",
    "meta": {"versionId": "3"},
    "status": "current",
    "subject": {"reference": "https://ehr.example/fhir/Patient/p9"},
    "context": {"encounter": [{"reference": "Encounter/e1"}]},
    "date": "2026-11-20T09:30:00Z",
    "content": [{"attachment": {"contentType": "text/plain", "language": "es"}}],
}
MODEL = ModelInfo("tagger", "rev-1")
NAMESPACE = "urn:test:ns"


def mention(label: str, surface: str, assertion: str = "present", confidence: float = 0.9) -> Mention:
    start = NOTE.index(surface)
    return Mention(label, start, start + len(surface), surface, confidence, assertion)


def transaction(mentions: list[Mention], profile: Any = None) -> dict[str, Any]:
    context = context_from_document_reference(DOCUMENT)
    return build_transaction(context, mentions, profile or load_profile(), MODEL, NAMESPACE, "2026-11-20T10:00:00Z")


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_each_label_and_assertion_maps_to_the_right_resource() -> None:
    bundle = transaction(
        [
            mention("DISEASE", "Neumonía"),
            mention("SYMPTOM", "fiebre", "negated"),
            mention("DISEASE", "asma", "possible"),
            mention("PROCEDURE", "TC"),
            mention("DISEASE", "diabetes", "family"),
        ]
    )
    conditions = {c["code"]["text"]: c for c in resources(bundle, "Condition")}
    assert set(conditions) == {"Neumonía", "asma"}  # the mother's diabetes is not the patient's
    assert conditions["Neumonía"]["verificationStatus"]["coding"][0]["code"] == "unconfirmed"
    assert conditions["asma"]["verificationStatus"]["coding"][0]["code"] == "provisional"
    assert conditions["Neumonía"]["category"][0]["coding"][0]["code"] == "encounter-diagnosis"
    assert conditions["Neumonía"]["subject"] == {"reference": "Patient/p9"}
    assert conditions["Neumonía"]["encounter"] == {"reference": "Encounter/e1"}
    assert conditions["Neumonía"]["recordedDate"] == "2026-11-20T09:30:00Z"
    (fever,) = resources(bundle, "Observation")
    assert fever["valueBoolean"] is False and fever["interpretation"][0]["coding"][0]["code"] == "NEG"
    assert fever["status"] == "preliminary" and fever["category"][0]["coding"][0]["code"] == "exam"
    (scan,) = resources(bundle, "Procedure")
    assert scan["status"] == "completed"
    (family,) = resources(bundle, "FamilyMemberHistory")
    assert family["condition"][0]["code"]["text"] == "diabetes"
    (provenance,) = resources(bundle, "Provenance")
    assert len(provenance["target"]) == 5
    assert provenance["entity"][0]["what"]["reference"] == "DocumentReference/doc-7/_history/3"
    assert provenance["agent"][0]["type"]["coding"][0]["code"] == "assembler"
    (device,) = resources(bundle, "Device")
    assert device["version"][0]["value"] == "rev-1"


def test_every_resource_is_traceable_and_conditionally_created() -> None:
    bundle = transaction([mention("DISEASE", "Neumonía"), mention("PROCEDURE", "TC")])
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["ifNoneExist"]
        assert entry["fullUrl"].startswith("urn:uuid:")
    for kind in ("Condition", "Procedure"):
        (resource,) = resources(bundle, kind)
        derivation = next(e for e in resource["extension"] if e["url"] == DERIVATION_REFERENCE)
        parts = {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in derivation["extension"]}
        assert parts["reference"] == {"reference": "DocumentReference/doc-7/_history/3"}
        assert parts["path"] == "DocumentReference.content[0].attachment"
        assert NOTE[parts["offset"] : parts["offset"] + parts["length"]] == resource["code"]["text"]
        assert resource["meta"]["tag"][0]["code"] == "nlp-derived"
        assert resource["identifier"][0]["system"] == NAMESPACE


def test_identifiers_are_deterministic_and_depend_on_version_and_offsets() -> None:
    first = transaction([mention("DISEASE", "Neumonía")])
    again = transaction([mention("DISEASE", "Neumonía")])
    assert first == again
    moved = Mention("DISEASE", 1, 9, "eumonía.", 0.9)
    other = transaction([moved])
    assert resources(first, "Condition")[0]["identifier"] != resources(other, "Condition")[0]["identifier"]


def test_nothing_to_map_gives_an_empty_transaction() -> None:
    assert transaction([])["entry"] == []
    assert transaction([Mention("MEDICATION", 0, 3, "Neu")])["entry"] == []


def test_low_confidence_is_dropped_or_kept_as_text_only(tmp_path: Path) -> None:
    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text(
        "name: strict\nlabels:\n"
        "  DISEASE: {mapper: condition, min_confidence: 0.8, below_threshold: drop}\n"
        "  SYMPTOM: {mapper: observation, min_confidence: 0.8, below_threshold: text-only}\n"
    )
    profile = load_profile(profile_file)
    bundle = transaction(
        [mention("DISEASE", "asma", confidence=0.5), mention("SYMPTOM", "fiebre", confidence=0.5)], profile
    )
    assert resources(bundle, "Condition") == []
    (observation,) = resources(bundle, "Observation")
    assert observation["code"] == {"text": "fiebre"}


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("name: x\nlabels:\n  DISEASE: {mapper: nonexistent}\n", "unknown mapper 'nonexistent'"),
        ("name: x\nlabels:\n  DISEASE: {mapper: condition, min_confidence: 2}\n", "min_confidence"),
        ("labels: {}\n", "name"),
        ("- just a list\n", "must be a YAML mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_profiles_fail_with_a_clear_message(tmp_path: Path, text: str, phrase: str) -> None:
    profile_file = tmp_path / "bad.yaml"
    profile_file.write_text(text)
    with pytest.raises(ProfileError, match="bad.yaml") as error:
        load_profile(profile_file)
    assert phrase in str(error.value)


def test_context_reads_the_note_type_and_category() -> None:
    document = {
        **DOCUMENT,
        "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
        "category": [{"text": "clinical-note"}],
    }
    context = context_from_document_reference(document)
    assert context.document_type == "http://loinc.org|11506-3"
    assert context.categories == ("clinical-note",)
    assert context_from_document_reference(DOCUMENT).document_type is None


def test_context_needs_a_subject_and_versions_fall_back_to_a_content_hash() -> None:
    with pytest.raises(DocumentContextError, match="subject"):
        context_from_document_reference({**DOCUMENT, "subject": None})
    unversioned = {k: v for k, v in DOCUMENT.items() if k != "meta"}
    assert document_version(unversioned) == document_version(dict(unversioned))
    assert document_version(unversioned) != document_version({**unversioned, "date": "2027-01-01"})


def test_mentions_reject_impossible_offsets_and_unknown_assertions() -> None:
    with pytest.raises(ValueError, match="offsets"):
        Mention("DISEASE", 5, 5, "")
    with pytest.raises(ValueError, match="assertion"):
        Mention("DISEASE", 0, 3, "Neu", assertion="maybe")


def test_validation_errors_name_the_field_but_never_the_value() -> None:
    from mappings.bundle import MappingValidationError, validate_r4

    with pytest.raises(MappingValidationError) as error:
        validate_r4({"resourceType": "Condition", "subject": {"reference": "Patient/1"}, "code": "fiebre alta"})
    assert "code" in str(error.value)
    assert "fiebre alta" not in str(error.value)
