"""ICD-10-CM's "tumour of a site, behaviour not stated" rule (D49), alone and in the worker's lookup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mappings.profile import MappingProfile, load_profile
from mappings.terminology import normalise
from worker.coding import code_mentions
from worker.linker import shipped_linker_available
from worker.neoplasm import names_unspecified_tumour, site_code, unspecified_behaviour_code
from worker.terminology import TerminologyService, terminology_for


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("tumoración lengua", "es"),
        ("neoplasia de pene", "es"),
        ("TUMOR CEREBRAL", "es"),
        ("brain tumour", "en"),
        ("tumore della lingua", "it"),
        ("tumor van de blaas", "nl"),
        ("tumoră cerebrală", "ro"),
        ("tumör i tungan", "sv"),
        ("nádor mozku", "cs"),
        ("tumor vesical", None),  # no language: every language's words
        ("hersentumor", "nl"),  # the site and the tumour word in one word
        ("hjärntumör", "sv"),
    ],
)
def test_a_tumour_word_and_a_site_name_an_unspecified_behaviour(text: str, language: str | None) -> None:
    assert names_unspecified_tumour(normalise(text), language)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("tumor", "es"),  # no site
        ("carcinoma de lengua", "es"),  # a kind of tumour
        ("tumor maligno de mama", "es"),  # a behaviour
        ("tumor benigno de parótida", "es"),
        ("tumor de Wilms", "es"),
        ("antecedentes de neoplasia de mama", "es"),  # history: Z85
        ("masa tumoral renal", "es"),  # "tumoral" is an adjective; a mass is coded as a finding
        ("malignant tumour of the breast", "en"),
        ("meningioma tumor", "en"),
        ("zhoubný nádor prsu", "cs"),
        ("elakartad tumör i bröstet", "sv"),
        ("tumoración lengua", "de"),  # a language without a word list
        ("tumor", "nl"),  # no site
        ("maligne hersentumor", "nl"),
        ("tumoración", "es"),
    ],
)
def test_a_named_behaviour_or_kind_of_tumour_is_not_unspecified(text: str, language: str | None) -> None:
    assert not names_unspecified_tumour(normalise(text), language)


@pytest.mark.parametrize(
    ("code", "site"),
    [
        ("C02.9", "D49.0"),
        ("C18.9", "D49.0"),
        ("C34.90", "D49.1"),
        ("C44.90", "D49.2"),
        ("C50.912", "D49.3"),
        ("C67.9", "D49.4"),
        ("C64.1", "D49.511"),
        ("C64.2", "D49.512"),
        ("C64.9", "D49.519"),
        ("D30.02", "D49.512"),
        ("C60.9", "D49.59"),
        ("C71.9", "D49.6"),
        ("D33.2", "D49.6"),
        ("C70.9", "D49.7"),
        ("D32.9", "D49.7"),
        ("C69.20", "D49.81"),
        ("C69.50", "D49.89"),
        ("D49.0", "D49.0"),
        ("K14.9", None),
        ("D40.10", None),  # uncertain behaviour names no column of its own here
        ("D49", None),
    ],
)
def test_the_site_follows_the_neoplasm_tables_columns(code: str, site: str | None) -> None:
    assert site_code(code) == site


def test_the_first_neoplasm_candidate_gives_the_site() -> None:
    assert unspecified_behaviour_code(normalise("tumoración lengua"), "es", ["K14.9", "C02.9", "C01"]) == ("D49.0", 1)
    assert unspecified_behaviour_code(normalise("tumoración lengua"), "es", ["K14.9", "R22.0"]) is None
    assert unspecified_behaviour_code(normalise("carcinoma de lengua"), "es", ["C02.9"]) is None


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TerminologyService]:
    if not shipped_linker_available():
        pytest.skip("worker/linker/ has no trained linker")
    found = terminology_for(load_profile(), "auto", cache_root=tmp_path_factory.mktemp("empty-cache"))
    assert found is not None
    yield found


@pytest.mark.parametrize(
    ("text", "language", "code"),
    [
        ("tumoración lengua", "es", "D49.0"),  # CodiEsp dev gold; the search alone ranks C02.9 first
        ("neoplasia de pene", "es", "D49.59"),
        ("tumor cerebral", "es", "D49.6"),
        ("brain tumour", "en", "D49.6"),
        ("tumore della lingua", "it", "D49.0"),
    ],
)
def test_the_worker_codes_an_unspecified_tumour_with_its_sites_d49(
    service: TerminologyService, text: str, language: str, code: str
) -> None:
    (coded,) = code_mentions([text], "DISEASE", language, 5, load_profile(), service)
    assert coded.ranked_codes()[0] == code
    assert len(coded.ranked_codes()) == len(set(coded.ranked_codes())) == 5  # the site's code is not repeated


def test_the_rule_leaves_named_tumours_exact_matches_and_symptoms_alone(
    service: TerminologyService, chapter_r_profile: MappingProfile
) -> None:
    profile = load_profile()
    carcinoma, history = code_mentions(
        ["carcinoma de lengua", "antecedentes de neoplasia de mama"], "DISEASE", "es", 5, profile, service
    )
    assert carcinoma.ranked_codes()[0].startswith("C02") and history.ranked_codes()[0] == "Z85.3"
    # A shipped Spanish synonym that matches exactly keeps its CodiEsp code, whatever the rule would say.
    (testis,) = code_mentions(["tumoración testicular"], "DISEASE", "es", 5, profile, service)
    assert testis.candidates[0][3] == 1.0 and testis.ranked_codes()[0] == "N50.9"
    # A profile whose prefixes exclude D49 (SYMPTOM in chapter R only) is never offered it.
    (symptom,) = code_mentions(["tumoración lengua"], "SYMPTOM", "es", 5, chapter_r_profile, service)
    assert symptom.ranked_codes() and all(code.startswith("R") for code in symptom.ranked_codes())
