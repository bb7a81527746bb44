"""Golden tests: a note and its mentions in, the exact transaction Bundle out, one JSON file per case.

``tests/mappings/golden/*.json`` hold the note, its DocumentReference, the mentions (label, offsets,
assertion, confidence), what the terminology answers for each mention text, and the expected Bundle.
There is one case for each label and each assertion, and one with several mentions and code systems.

After an intended change of the mappings, regenerate the expected Bundles and review the diff::

    FHIR_NER_UPDATE_GOLDEN=1 .venv/bin/pytest tests/mappings/test_golden.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mappings.bundle import ModelInfo, build_transaction, validate_r4
from mappings.context import context_from_document_reference
from mappings.mentions import CandidateCode, Mention
from mappings.profile import MappingProfile, load_profile
from mappings.terminology import DEFAULT_MIN_SCORE, CodeRequest

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.glob("*.json"))
MODEL = ModelInfo("fhir-ner-tagger-es", "rev-2026-11")
NAMESPACE = "urn:fhir-ner-adapter:derived"
RECORDED = "2026-11-20T10:00:00Z"
UPDATE = os.environ.get("FHIR_NER_UPDATE_GOLDEN") == "1"


class TableTerminology:
    """Answers from the case file: mention text → candidates (source, system, code, display, score)."""

    def __init__(self, table: dict[str, list[list[Any]]]) -> None:
        self.table = table
        self.requests: list[CodeRequest] = []

    def lookup(self, requests: Sequence[CodeRequest]) -> list[list[CandidateCode]]:
        self.requests.extend(requests)
        return [
            [
                CandidateCode(system, code, display, float(score), source)
                for source, system, code, display, score in self.table.get(request.text, [])
                if source in request.systems
            ]
            for request in requests
        ]


def case_profile(case: dict[str, Any]) -> MappingProfile:
    name = case.get("profile")
    return load_profile(GOLDEN / "profiles" / f"{name}.yaml") if name else load_profile()


def render(case: dict[str, Any]) -> dict[str, Any]:
    context = context_from_document_reference(case["document"])
    mentions = [Mention(**m) for m in case["mentions"]]
    for mention in mentions:
        assert case["note"][mention.start : mention.end] == mention.text, "mention offsets must match the note"
    terminology = TableTerminology(case.get("terminology") or {})
    return build_transaction(context, mentions, case_profile(case), MODEL, NAMESPACE, RECORDED, terminology=terminology)


def test_there_is_a_golden_case_for_each_label_and_assertion() -> None:
    names = {path.stem for path in CASES}
    for label in ("disease", "symptom", "procedure"):
        for assertion in ("present", "negated", "possible", "hypothetical", "historical", "family"):
            assert f"{label}-{assertion}" in names


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(path: Path) -> None:
    case = json.loads(path.read_text(encoding="utf-8"))
    bundle = render(case)
    if UPDATE or case.get("expected") is None:
        case["expected"] = bundle
        path.write_text(json.dumps(case, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"{path.name} had no expected Bundle: written, review it and run again")
    assert bundle == case["expected"]
    for entry in bundle["entry"]:
        validate_r4(entry["resource"])


def expected(name: str) -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))["expected"]
    return bundle


def derived(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] not in ("Device", "Provenance")]


def test_golden_cases_say_what_the_issue_asks() -> None:
    """Spot checks on the golden files, so that regenerating them cannot silently change the semantics."""
    (condition,) = derived(expected("disease-negated"))
    assert condition["verificationStatus"]["coding"][0]["code"] == "refuted"
    for name in ("disease-possible", "disease-hypothetical"):
        (condition,) = derived(expected(name))
        assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"
    (condition,) = derived(expected("disease-present"))
    assert condition["code"]["coding"][0]["code"] == "J18.9"
    assert condition["verificationStatus"]["coding"][0]["code"] == "unconfirmed"
    assert condition["clinicalStatus"]["coding"][0]["code"] == "active"
    assert condition["category"][0]["coding"][0]["code"] == "encounter-diagnosis"
    assert condition["recordedDate"] == "2026-11-20T09:30:00Z"
    (family,) = derived(expected("disease-family"))
    assert family["resourceType"] == "FamilyMemberHistory"
    (observation,) = derived(expected("symptom-negated"))
    assert observation["valueBoolean"] is False
    assert observation["interpretation"][0]["coding"][0]["code"] == "NEG"
    (observation,) = derived(expected("symptom-present"))
    assert observation["valueBoolean"] is True and observation["status"] == "preliminary"
    assert observation["effectiveDateTime"] == "2026-11-20T09:30:00Z"
    assert derived(expected("symptom-hypothetical")) == []
    statuses = {
        name: derived(expected(f"procedure-{name}"))[0]["status"]
        for name in ("present", "negated", "hypothetical", "historical")
    }
    assert statuses == {
        "present": "completed",
        "negated": "not-done",
        "hypothetical": "preparation",
        "historical": "completed",
    }
    assert derived(expected("procedure-family")) == []
    # Below the code threshold (0.85 < 0.9): code.text only.
    (family,) = derived(expected("symptom-family"))
    assert family["condition"][0]["code"] == {"text": "migraña"}
    mixed = {r["code"]["text"]: r for r in derived(expected("mixed-codes"))}
    assert mixed["Hipertensión arterial"]["code"]["coding"][0]["system"] == "http://snomed.info/sct"
    assert len(mixed["Hipertensión arterial"]["code"]["coding"]) == 1
    assert mixed["Dolor torácico"]["code"]["coding"][0]["code"] == "R07.9"
    assert "coding" not in mixed["disnea"]["code"]
    assert mixed["Hipertensión arterial"]["category"][0]["coding"][0]["code"] == "problem-list-item"


def test_the_terminology_is_asked_with_the_profile_systems_prefixes_and_note_language() -> None:
    case = json.loads((GOLDEN / "mixed-codes.json").read_text(encoding="utf-8"))
    terminology = TableTerminology(case["terminology"])
    build_transaction(
        context_from_document_reference(case["document"]),
        [Mention(**m) for m in case["mentions"]],
        case_profile(case),
        MODEL,
        NAMESPACE,
        RECORDED,
        terminology=terminology,
    )
    asked = {r.text: r for r in terminology.requests}
    assert asked["Dolor torácico"].systems == ("icd-10-cm",)
    assert asked["Dolor torácico"].prefixes == {"icd-10-cm": ("R",)}
    assert asked["Hipertensión arterial"].systems == ("icd-10-cm", "local-snomed")
    assert {r.language for r in terminology.requests} == {"es"}
    # Only written codes matter to a transaction: each request says under which score nothing is written (the
    # profile's min_score, else the default, as written_codes applies it; this stub calibrates none).
    profile = case_profile(case)
    for request in terminology.requests:
        options = profile.labels[request.label].codes
        assert options is not None
        expected = DEFAULT_MIN_SCORE if options.min_score is None else options.min_score
        assert dict(request.floors) == dict.fromkeys(options.systems, expected)
