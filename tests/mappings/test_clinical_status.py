"""clinicalStatus of a Condition: what the text says first, then what kind of condition the code names."""

from __future__ import annotations

from typing import Any

import pytest

from mappings.clinical_status import EPISODIC_ICD10CM, condition_clinical_status, episodic_reason
from mappings.context import DocumentContext
from mappings.mappers import map_condition
from mappings.mentions import Mention
from mappings.terminology import ICD10CM_URL


def _code(code: str | None, display: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": "x"}
    if code:
        concept["coding"] = [{"system": ICD10CM_URL, "code": code, **({"display": display} if display else {})}]
    return concept


def _mention(assertion: str = "present", resolution: str | None = None) -> Mention:
    return Mention("DISEASE", 0, 5, "x", assertion=assertion, resolution=resolution)


@pytest.mark.parametrize(
    ("assertion", "resolution", "code", "expected"),
    [
        # past history of chronic conditions stays on the problem list
        ("historical", None, "I10", "active"),
        ("historical", None, "E11.9", "active"),
        ("historical", None, "B20", "active"),  # HIV is not an infection that is over
        ("historical", None, "B18.2", "active"),  # chronic hepatitis C
        ("historical", None, None, "active"),  # no code: nature unknown, keep it
        # past conditions that are over by nature
        ("historical", None, "S72.001", "resolved"),  # hip fracture
        ("historical", None, "S72.001A", "resolved"),  # the same with its 7th character, as the linker codes it
        ("historical", None, "W19.XXXA", "resolved"),  # a fall
        ("historical", None, "J18.9", "resolved"),  # pneumonia
        ("historical", None, "A15.0", "resolved"),  # tuberculosis
        ("historical", None, "I21.9", "resolved"),  # myocardial infarction (the event)
        ("historical", None, "N39.0", "resolved"),  # urinary tract infection
        ("historical", None, "O80", "resolved"),  # a delivery
        # the text wins over the code
        ("historical", "resolved", "I10", "resolved"),
        ("present", "resolved", "J18.9", "resolved"),
        ("historical", "remission", "C81.90", "remission"),
        ("present", "remission", None, "remission"),
        # what is present now is active, whatever its nature
        ("present", None, "J18.9", "active"),
        ("possible", None, "S72.001", "active"),
    ],
)
def test_clinical_status_rules(assertion: str, resolution: str | None, code: str | None, expected: str) -> None:
    assert condition_clinical_status(_mention(assertion, resolution), _code(code)) == expected


def test_an_acute_title_makes_a_code_episodic_a_chronic_one_does_not() -> None:
    assert episodic_reason("H66.90", "Otitis media, unspecified, unspecified ear") is None
    assert episodic_reason("H65.00", "Acute serous otitis media, unspecified ear") == "acute condition (code title)"
    assert episodic_reason("N18.9", "Chronic kidney disease, unspecified") is None
    assert episodic_reason("J44.1", "Chronic obstructive pulmonary disease with (acute) exacerbation") is None


def test_episodic_ranges_are_well_formed() -> None:
    for first, last, reason in EPISODIC_ICD10CM:
        assert first <= last and len(first) == len(last) and reason


def test_the_mapper_writes_the_status_and_a_profile_map_still_wins() -> None:
    context = DocumentContext(document_id="n1", version_id="1", subject="Patient/p")
    history = _mention("historical")
    status = map_condition(history, context, {}, _code("E11.9"))["clinicalStatus"]["coding"][0]["code"]
    assert status == "active"
    fracture = map_condition(history, context, {}, _code("S72.001"))["clinicalStatus"]["coding"][0]["code"]
    assert fracture == "resolved"
    overridden = map_condition(history, context, {"clinical": {"historical": "inactive"}}, _code("E11.9"))
    assert overridden["clinicalStatus"]["coding"][0]["code"] == "inactive"


def test_a_resolution_cue_changes_the_mention_key() -> None:
    from mappings.bundle import mention_key

    plain = mention_key("n1", "Condition", _mention("historical"), 0)
    resolved = mention_key("n1", "Condition", _mention("historical", "resolved"), 0)
    assert plain != resolved
    # without a cue the key is the one earlier releases wrote, so existing resources are still recognised
    from mappings.identity import stable_hash
    from mappings.terminology import normalise

    assert plain == stable_hash("mention", "n1", "Condition", "DISEASE", "historical", normalise("x"), 0)


def test_unknown_resolution_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown resolution"):
        Mention("DISEASE", 0, 1, "x", resolution="gone")
