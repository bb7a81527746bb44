"""The pure half of the terminology: normalisation, code-system parsers, text matching, code selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mappings.mentions import CandidateCode
from mappings.profile import ProfileError, load_profile
from mappings.terminology import (
    CodeSystemData,
    LexicalIndex,
    TermEntry,
    TerminologyError,
    code_request,
    coded_text,
    core_term,
    lexical_keys,
    mention_sides,
    named_side,
    normalise,
    parse_code_csv,
    parse_code_system,
    select_codes,
)

GOLDEN_PROFILES = Path(__file__).parent / "golden" / "profiles"


def test_normalise_ignores_case_accents_and_punctuation() -> None:
    assert normalise("  Neumonía,  NOS ") == "neumonia nos"
    assert normalise("Dolor torácico (opresivo)") == "dolor toracico opresivo"
    assert normalise("") == ""


@pytest.mark.parametrize(
    ("mention", "side"),
    [
        ("esguince de tobillo izquierdo", True),
        ("fractura de cadera dcha.", True),
        ("artrosis de ambas rodillas", True),
        ("esguince de tobillo", False),
        ("fracture of the right hip", True),
        ("ankle sprain", False),
        ("frattura del femore sinistro", True),
        ("distorsione della caviglia", False),
        ("verstuiking van de linkerenkel", True),  # a compound that starts with the side
        ("heupfractuur rechts", True),
        ("enkelverstuiking", False),
        ("fractură de șold stângă", True),  # accents and cedillas folded
        ("entorsă de gleznă", False),
        ("höger höftfraktur", True),
        ("vänstersidig pneumoni", True),
        ("stukad fotled", False),
        ("zlomenina levé kyčle", True),
        ("pravostranná pneumonie", True),
        ("podvrtnutý kotník", False),
        ("bloqueo de rama", False),
    ],
)
def test_a_mention_names_a_side_in_any_of_the_seven_languages(mention: str, side: bool) -> None:
    assert bool(mention_sides(mention)) is side


@pytest.mark.parametrize(
    ("mention", "language", "side"),
    [
        ("OI hemorragias subretinianas", "es", "left"),  # ojo izquierdo
        ("catarata OD", "es", "right"),
        ("trombosis venosa profunda en la pierna derecha", "es", "right"),
        ("fractura de cadera dcha.", "es", "right"),
        ("artrosis de ambas rodillas", "es", None),
        ("derrame pleural bilateral", "es", None),
        ("hemiparesia contralateral izquierda", "es", None),  # relative to another side: not a plain one
        ("dolor en fosa iliaca derecha e izquierda", "es", None),
        ("esguince leve de tobillo", "es", None),  # Czech "levé" is left; Spanish "leve" is mild
        ("hipertensión leve", None, "left"),  # no language: any of the seven's words
        ("fracture of the left hip", "en", "left"),
        ("frattura del femore dx", "it", "right"),
        ("verstuiking van de linkerenkel", "nl", "left"),
        ("heupfractuur rechts", "nl-BE", "right"),  # a regional tag counts as its language
        ("fractură de șold stângă", "ro", "left"),
        ("vänstersidig pneumoni", "sv", "left"),
        ("höger höftfraktur", "sv", "right"),
        ("zlomenina levého kotníku", "cs", "left"),  # an inflected form
        ("pravostranná pneumonie", "cs", "right"),
        ("pneumonie", "cs", None),
    ],
)
def test_the_side_a_mention_names_in_its_language(mention: str, language: str | None, side: str | None) -> None:
    assert named_side(mention_sides(mention, language)) == side
    assert mention_sides("dolor leve", "es") == set() and mention_sides("dolor leve", "cs") == {"left"}


@pytest.mark.parametrize(
    ("mention", "coded"),
    [
        ("dolor torácico, irradiado a espalda", "dolor torácico"),
        ("dolor lumbar que se le irradia a testículo", "dolor lumbar"),
        ("dolor abdominal con irradiación hacia fosa ilíaca", "dolor abdominal"),
        ("Chest pain radiating to the left arm", "Chest pain"),
        ("low back pain that radiates down the leg", "low back pain"),
        ("dolore toracico irradiato al braccio sinistro", "dolore toracico"),
        ("dolore lombare irradiato all'arto inferiore", "dolore lombare"),  # an elided article
        ("pijn op de borst uitstralend naar de linkerarm", "pijn op de borst"),
        ("durere toracică iradiată în brațul stâng", "durere toracică"),
        ("bröstsmärta som strålar ut i vänster arm", "bröstsmärta"),
        ("bolest na hrudi vystřelující do levé paže", "bolest na hrudi"),
        # No radiation, or nothing before it: the whole mention.
        ("dolor irradiado", "dolor irradiado"),
        ("irradiado a espalda", "irradiado a espalda"),
        ("dolor a la palpación en hipogastrio", "dolor a la palpación en hipogastrio"),
        ("radiation pneumonitis", "radiation pneumonitis"),
        ("irradiation to the chest", "irradiation to the chest"),
    ],
)
def test_a_pain_is_coded_without_where_it_radiates(mention: str, coded: str) -> None:
    assert coded_text(mention, "SYMPTOM") == coded
    assert coded_text(mention, "DISEASE") == coded


@pytest.mark.parametrize(
    ("mention", "coded"),
    [
        ("neumonía adquirida en la comunidad", "neumonía"),
        ("Neumonía extrahospitalaria", "Neumonía"),
        ("neumonía comunitaria bilateral", "neumonía bilateral"),
        ("community-acquired pneumonia", "pneumonia"),
        ("community acquired pneumonia", "pneumonia"),
        ("polmonite acquisita in comunità", "polmonite"),
        ("buiten het ziekenhuis opgelopen pneumonie", "pneumonie"),
        ("pneumonie dobândită în comunitate", "pneumonie"),
        ("samhällsförvärvad pneumoni", "pneumoni"),
        ("komunitní pneumonie", "pneumonie"),
        ("pneumonie získaná v komunitě", "pneumonie"),
        # Both rules: the pain's site, without its radiation or the qualifier.
        ("dolor torácico extrahospitalario irradiado a espalda", "dolor torácico"),
        # Nothing but the qualifier, or a word that merely starts like it: the whole mention.
        ("community-acquired", "community-acquired"),
        ("comunicación interauricular", "comunicación interauricular"),
        ("communityacquired pneumonia", "communityacquired pneumonia"),
        ("Múltiplex A:\nZFY,  SRY", "Múltiplex A:\nZFY,  SRY"),  # no qualifier: as it is, spaces and all
    ],
)
def test_a_condition_is_coded_without_community_acquired(mention: str, coded: str) -> None:
    """ICD-10-CM codes a community-acquired pneumonia as a pneumonia (J18.9): the qualifier is left out of what is
    coded, in the seven languages, and the request still carries the whole mention's label."""
    assert coded_text(mention, "DISEASE") == coded
    assert coded_text(mention, "SYMPTOM") == coded
    assert coded_text(mention, "PROCEDURE") == mention


@pytest.mark.parametrize(
    ("mention", "coded"),
    [
        ("known COPD", "COPD"),
        ("well-controlled hypertension", "hypertension"),
        ("Known, well-controlled hypertension", "hypertension"),
        ("newly diagnosed heart failure", "heart failure"),
        ("HTA conocida", "HTA"),
        ("hipertensión arterial bien controlada", "hipertensión arterial"),
        ("cardiopatía isquémica de reciente diagnóstico", "cardiopatía isquémica"),
        ("diabete ben controllato", "diabete"),
        ("ipertensione di nuova diagnosi", "ipertensione"),
        ("bekende COPD", "COPD"),
        ("goed ingestelde diabetes", "diabetes"),
        ("HTA cunoscută", "HTA"),
        ("känd hypertoni", "hypertoni"),
        ("välkontrollerad diabetes", "diabetes"),
        ("známá hypertenze", "hypertenze"),
        # Where the words are not in their place, or say the opposite, or are all there is: the whole mention.
        ("fiebre de causa no conocida", "fiebre de causa no conocida"),
        ("delirium due to known physiological condition", "delirium due to known physiological condition"),
        ("long-standing persistent atrial fibrillation", "long-standing persistent atrial fibrillation"),
        ("poorly controlled diabetes", "poorly controlled diabetes"),
        ("known", "known"),
        ("conocida", "conocida"),
    ],
)
def test_a_condition_is_coded_without_words_that_change_no_code(mention: str, coded: str) -> None:
    """How well known or controlled a condition is, and since when, change no ICD-10-CM code: left out of what is
    coded, where each language puts them (before the noun in en, nl, sv, cs; after it in es, it, ro)."""
    assert coded_text(mention, "DISEASE") == coded
    assert coded_text(mention, "PROCEDURE") == mention


def test_a_procedure_is_coded_whole_and_the_request_carries_the_coded_text() -> None:
    # In a procedure "irradiado a" is a radiotherapy's dose, not a pain's radiation.
    assert coded_text("mediastino irradiado a 45 Gy", "PROCEDURE") == "mediastino irradiado a 45 Gy"
    options = load_profile().labels["SYMPTOM"].codes
    request = code_request("dolor torácico irradiado al brazo izquierdo", "SYMPTOM", options, "es")
    assert request.text == "dolor torácico"


def test_lexical_keys_drop_fillers_and_bracketed_modifiers() -> None:
    assert lexical_keys("Fever NOS") == ("fever nos", "fever")
    assert lexical_keys("Fever of unknown origin [FUO]") == ("fever of unknown origin fuo", "fever of unknown origin")
    assert lexical_keys("Cough") == ("cough",)


@pytest.mark.parametrize(
    ("title", "core"),
    [
        ("Pneumonia, unspecified organism", "Pneumonia"),
        ("Essential (primary) hypertension", "Essential hypertension"),
        ("Urinary tract infection, site not specified", "Urinary tract infection"),
        ("Tachypnea, not elsewhere classified", "Tachypnea"),
        ("Unspecified asthma, uncomplicated", "Asthma, uncomplicated"),
        ("Fever NOS", "Fever"),
        ("Cough", "Cough"),
    ],
)
def test_core_term_strips_filing_qualifiers(title: str, core: str) -> None:
    assert core_term(title) == core


CSV = """code,display,synonyms,language
HT-1,Hypertensive disorder,high blood pressure|HTN,en
HT-1,Hipertensión arterial,HTA|tensión alta,es
TOS-1,Tos,,es
"""


def test_csv_code_systems_carry_synonyms_and_languages() -> None:
    data = parse_code_csv(CSV, "local", "http://hospital.example/cs")
    assert data.url == "http://hospital.example/cs" and data.codes() == {"HT-1", "TOS-1"}
    terms = {(e.term, e.kind, e.language) for e in data.entries}
    assert ("HTA", "synonym", "es") in terms and ("Hypertensive disorder", "display", "en") in terms
    index = LexicalIndex(data)
    (match,) = index.match("hta", "es")
    assert (match.code, match.score, match.source) == ("HT-1", 1.0, "local")
    assert match.display == "Hipertensión arterial"
    # A term tagged with a language matches as text only in notes of that language (or of unknown language).
    assert index.match("tos", "en") == []
    assert [c.code for c in index.match("tos", "es-ES")] == ["TOS-1"]
    assert [c.code for c in index.match("tos", None)] == ["TOS-1"]


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("", "empty"),
        ("display\nx\n", "lacks code"),
        ("code,display,colour\nA,B,red\n", "unknown CSV column"),
        ("code,display\nA,B\n,C\n", "line 3 needs a code"),
        ("code,display\nA,B,C\n", "line 2 has 3 fields"),
        ("code,display\n", "no codes"),
    ],
)
def test_bad_csv_files_say_where(text: str, phrase: str) -> None:
    with pytest.raises(TerminologyError, match="mine") as error:
        parse_code_csv(text, "mine", "http://x")
    assert phrase in str(error.value)


def test_fhir_code_systems_are_read_with_nested_concepts_and_designations() -> None:
    resource = json.loads((GOLDEN_PROFILES / "local-snomed.json").read_text(encoding="utf-8"))
    resource["concept"][0]["concept"] = [{"code": "59621000", "display": "Essential hypertension (disorder)"}]
    data = parse_code_system(resource, "snomed")
    assert data.url == "http://snomed.info/sct" and data.version and "20260301" in data.version
    assert data.codes() == {"38341003", "233604007", "59621000"}
    index = LexicalIndex(data)
    assert [c.code for c in index.match("Hipertensión arterial", "es")] == ["38341003"]
    assert [c.code for c in index.match("essential hypertension")] == ["59621000"]
    with pytest.raises(TerminologyError, match="no url"):
        parse_code_system({**resource, "url": None}, "snomed")
    with pytest.raises(TerminologyError, match="expected a FHIR CodeSystem"):
        parse_code_system({"resourceType": "ValueSet"}, "snomed")
    with pytest.raises(TerminologyError, match=r"concept\[0\] has no code"):
        parse_code_system({**resource, "concept": [{"display": "x"}]}, "snomed")


def test_text_matches_prefer_exact_terms_then_leaf_codes_and_respect_prefixes() -> None:
    data = CodeSystemData(
        "icd-10-cm",
        "http://hl7.org/fhir/sid/icd-10-cm",
        (
            TermEntry("J18", "Pneumonia, unspecified organism", "Pneumonia, unspecified organism", preferred=False),
            TermEntry("J18.9", "Pneumonia, unspecified organism", "Pneumonia, unspecified organism"),
            TermEntry("J18.9", "Pneumonia, unspecified organism", "Pneumonia", "core"),
            TermEntry("R50.9", "Fever, unspecified", "Fever, unspecified"),
            TermEntry("R50.9", "Fever, unspecified", "Pyrexia NOS", "inclusion"),
        ),
    )
    index = LexicalIndex(data)
    assert [(c.code, c.score) for c in index.match("pneumonia, unspecified organism")] == [
        ("J18.9", 1.0),
        ("J18", 1.0),
    ]
    assert [(c.code, c.score) for c in index.match("Pneumonia")] == [("J18.9", 0.97)]  # a derived form
    assert [(c.code, c.score) for c in index.match("pyrexia")] == [("R50.9", 0.97)]
    assert index.match("Pneumonia", prefixes=("R",)) == []


def candidate(source: str, code: str, score: float) -> CandidateCode:
    return CandidateCode(f"http://{source}", code, None, score, source)


def test_select_codes_applies_the_threshold_and_lets_added_systems_win() -> None:
    found = [candidate("icd-10-cm", "I10", 0.99), candidate("snomed", "38341003", 0.92)]
    (chosen,) = select_codes(found, ["icd-10-cm", "snomed"], 0.9, custom={"snomed"})
    assert chosen.code == "38341003"
    (chosen,) = select_codes(found, ["icd-10-cm", "snomed"], 0.95, custom={"snomed"})
    assert chosen.code == "I10"  # the added system has nothing above the threshold: the built-in one answers
    assert select_codes(found, ["icd-10-cm", "snomed"], 0.995, custom={"snomed"}) == ()
    both = select_codes(found, ["icd-10-cm", "snomed"], 0.9, custom={"snomed"}, all_systems=True)
    assert [c.code for c in both] == ["38341003", "I10"]
    assert select_codes(found, ["icd-10-cm"], 0.9)[0].code == "I10"  # only the label's systems count


def test_select_codes_writes_a_systems_first_candidate_in_the_given_order() -> None:
    # A re-ranker may put a lower cosine first: that candidate is the answer when it reaches the threshold.
    reranked = [candidate("icd-10-cm", "C18.7", 0.84), candidate("icd-10-cm", "C18.9", 0.86)]
    assert [c.code for c in select_codes(reranked, ["icd-10-cm"], 0.8)] == ["C18.7"]
    assert select_codes(reranked, ["icd-10-cm"], 0.85) == ()  # not the second one, though it scores higher


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("labels:\n  DISEASE: {mapper: condition, codes: {systems: [snomed]}}\n", "unknown code system 'snomed'"),
        ("code_systems: [{name: icd-10-cm, file: x.json}]\nlabels: {}\n", "is built in"),
        ("code_systems: [{name: a, file: x.csv}]\nlabels: {}\n", "a CSV needs `system`"),
        ("code_systems: [{name: a, file: x.json}, {name: a, file: y.json}]\nlabels: {}\n", "declared twice"),
        ("labels:\n  DISEASE: {mapper: condition, codes: {systems: []}}\n", "systems"),
        ("labels:\n  DISEASE: {mapper: condition, codes: {systems: [icd-10-cm], min_score: 1.5}}\n", "min_score"),
        ("labels:\n  DISEASE: {mapper: condition, drop_assertions: [maybe]}\n", "drop_assertions"),
        ("base_dir: /etc\nlabels: {}\n", "base_dir"),
    ],
)
def test_profiles_with_bad_code_settings_fail_with_a_clear_message(tmp_path: Path, text: str, phrase: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\n" + text)
    with pytest.raises(ProfileError, match="bad.yaml") as error:
        load_profile(path)
    assert phrase in str(error.value)


def test_profile_code_system_files_resolve_beside_the_profile() -> None:
    profile = load_profile(GOLDEN_PROFILES / "custom.yaml")
    (source,) = profile.code_systems
    assert profile.code_system_path(source) == GOLDEN_PROFILES / "local-snomed.json"
    assert source.file_format == "codesystem"
    assert profile.family_action("PROCEDURE") == "drop" and profile.family_action("DISEASE") == "family-member-history"
