"""ICD-10-CM as loaded for coding: billable leaves, the categories that share their block's code, any language."""

from __future__ import annotations

import pytest

from mappings.terminology import CodeRequest, CodeSystemData
from worker.terminology import TerminologyService, load_icd10cm


@pytest.fixture(scope="module")
def service() -> TerminologyService:
    return TerminologyService.from_sources([load_icd10cm()], mode="lexical")


def codes(service: TerminologyService, text: str, language: str | None = None, categories: bool = False) -> list[str]:
    (found,) = service.lookup([CodeRequest(text, "DISEASE", ("icd-10-cm",), language, {}, categories)])
    return [c.code for c in found]


def test_categories_that_share_their_blocks_code_are_loaded() -> None:
    data: CodeSystemData = load_icd10cm()
    assert {"B20", "F99", "P84", "R99", "Z66"} <= data.codes()
    assert "R99" not in data.unbillable  # a billable three-character code


@pytest.mark.parametrize(
    ("text", "code"),
    [("hematuria", "R31.9"), ("Type 2 diabetes mellitus", "E11.9"), ("Pneumonia", "J18.9"), ("Anemia", "D64.9")],
)
def test_a_category_match_is_answered_with_its_unspecified_billable_leaf(
    service: TerminologyService, text: str, code: str
) -> None:
    found = codes(service, text)
    assert found[0] == code, found
    assert all(c not in load_icd10cm().unbillable for c in found)


def test_a_profile_may_allow_categories(service: TerminologyService) -> None:
    assert codes(service, "hematuria", categories=True)[0] == "R31"
    assert load_icd10cm().billable("R31", categories=True) == "R31"


def test_icd10cm_terms_match_notes_in_any_language(service: TerminologyService) -> None:
    # ICD-10-CM's English words are also Spanish/Italian ones; the language filter must not hide them.
    assert codes(service, "anemia", "es")[0] == "D64.9"
    assert codes(service, "hematuria", "es-ES")[0] == "R31.9"
    assert codes(service, "ill-defined and unknown cause of mortality", "it")[0] == "R99"


def test_default_leaves_follow_unspecified_then_without() -> None:
    data = load_icd10cm()
    assert data.billable("E11") == "E11.9"  # "without complications", not E11.8 "unspecified complications"
    assert data.billable("I48") == "I48.91"
    assert data.billable("C50") == "C50.919"
