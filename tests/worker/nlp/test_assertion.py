"""Assertion detection: hand-written sentences per language, language detection, rule validation, bad input."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mappings.mentions import ASSERTIONS, Mention
from worker.nlp.assertion import (
    AssertionDetector,
    AssertionRulesError,
    default_detector,
    detect_assertions,
    detect_language,
)

CASES_DIR = Path(__file__).resolve().parent / "assertion_cases"
LANGUAGES = ("es", "en", "it", "nl", "ro", "sv", "cs")
MARK = re.compile(r"\[([^\[\]|]+)\|([a-z]+)\]")


def parse_marked(marked: str) -> tuple[str, list[tuple[int, int]], list[str]]:
    """'No [fever|negated].' -> ('No fever.', [(3, 8)], ['negated'])."""
    text_parts: list[str] = []
    spans: list[tuple[int, int]] = []
    expected: list[str] = []
    position = 0
    length = 0
    for match in MARK.finditer(marked):
        before = marked[position : match.start()]
        text_parts.append(before)
        length += len(before)
        mention = match.group(1)
        spans.append((length, length + len(mention)))
        expected.append(match.group(2))
        text_parts.append(mention)
        length += len(mention)
        position = match.end()
    text_parts.append(marked[position:])
    return "".join(text_parts), spans, expected


def load_cases(language: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CASES_DIR / f"{language}.yaml").read_text(encoding="utf-8"))
    assert data["language"] == language
    return data


def all_cases() -> list[Any]:
    params = []
    for language in LANGUAGES:
        for index, marked in enumerate(load_cases(language)["cases"]):
            params.append(pytest.param(language, marked, id=f"{language}-{index:02d}"))
    return params


@pytest.fixture(scope="module")
def detector() -> AssertionDetector:
    return AssertionDetector.from_rules_dir()


@pytest.mark.parametrize(("language", "marked"), all_cases())
def test_sentence(detector: AssertionDetector, language: str, marked: str) -> None:
    text, spans, expected = parse_marked(marked)
    assert spans, "a case must mark at least one mention"
    assert all(value in ASSERTIONS for value in expected)
    got = detector.detect(text, spans, language)
    assert list(zip([text[s:e] for s, e in spans], got, strict=True)) == list(
        zip([text[s:e] for s, e in spans], expected, strict=True)
    )


@pytest.mark.parametrize("language", LANGUAGES)
def test_case_coverage(language: str) -> None:
    """At least 20 sentences per language, and every assertion value exercised."""
    cases = load_cases(language)["cases"]
    assert len(cases) >= 20
    seen = {value for marked in cases for value in parse_marked(marked)[2]}
    assert seen == set(ASSERTIONS)


@pytest.mark.parametrize("language", LANGUAGES)
def test_detect_language_paragraph(detector: AssertionDetector, language: str) -> None:
    assert detector.detect_language(load_cases(language)["paragraph"]) == language


@pytest.mark.parametrize("language", LANGUAGES)
def test_cases_without_language_tag(detector: AssertionDetector, language: str) -> None:
    """The language argument is optional: a paragraph in front of each case makes detection reliable."""
    data = load_cases(language)
    for marked in data["cases"]:
        text, spans, expected = parse_marked(marked)
        prefix = data["paragraph"] + "\n\n"
        shifted = [(s + len(prefix), e + len(prefix)) for s, e in spans]
        assert detector.detect(prefix + text, shifted) == expected, marked


def test_language_tags(detector: AssertionDetector) -> None:
    text = "No fever."
    span = [(3, 8)]
    for tag in ("en", "EN", "en-GB", "en_US", "eng"):
        assert detector.resolve_language(tag, text) == "en"
        assert detector.detect(text, span, tag) == ["negated"]
    assert detector.resolve_language("es-ES", "No fever.") == "es"
    assert detector.resolve_language("ces", "") == "cs"


def test_unknown_language_tag_falls_back_to_detection(detector: AssertionDetector,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    text = "Il paziente non presenta febbre."
    start = text.index("febbre")
    with caplog.at_level(logging.DEBUG, logger="fhir_ner.assertion"):
        assert detector.detect(text, [(start, start + 6)], "de-DE") == ["negated"]
    assert "de-DE" in caplog.text
    assert "febbre" not in caplog.text


def test_accent_insensitive_and_exact(detector: AssertionDetector) -> None:
    # "tío"/"tio" both family; "sí" (yes) ends the negation, "si" (if) makes it hypothetical.
    assert detector.detect("Tio con asma.", [(8, 12)], "es") == ["family"]
    assert detector.detect("No fiebre, sí tos.", [(14, 17)], "es") == ["present"]
    assert detector.detect("Si tos, volver.", [(3, 6)], "es") == ["hypothetical"]
    # Romanian cedilla and comma-below letters, and no diacritics at all.
    for word in ("fără", "fãrã", "fara", "FĂRĂ"):
        text = f"Pacient {word} febră."
        start = text.index("febr")
        assert detector.detect(text, [(start, start + 5)], "ro") == ["negated"], word
    # Decomposed (NFD) accents: offsets are into the text as given.
    text = "Sin fie\u0301bre."
    assert detector.detect(text, [(4, 11)], "es") == ["negated"]


def test_swedish_does_not_fold_accents(detector: AssertionDetector) -> None:
    # "får" (gets) is not "far" (father).
    text = "Patienten får hosta."
    start = text.index("hosta")
    assert detector.detect(text, [(start, start + 5)], "sv") == ["present"]
    text = "Far har diabetes."
    start = text.index("diabetes")
    assert detector.detect(text, [(start, start + 8)], "sv") == ["family"]


def test_cues_list_every_category(detector: AssertionDetector) -> None:
    text = "No family history of colon cancer."
    start = text.index("colon")
    (result,) = detector.classify(text, [(start, start + 12)], "en")
    assert result.assertion == "negated"
    assert result.cues == frozenset({"negated", "family"})


def test_annotate_mentions(detector: AssertionDetector) -> None:
    text = "No fever. Mother with diabetes."
    mentions = [Mention("SYMPTOM", 3, 8, "fever"), Mention("DISEASE", 22, 30, "diabetes")]
    annotated = detector.annotate(text, mentions, "en")
    assert [m.assertion for m in annotated] == ["negated", "family"]
    assert [m.text for m in annotated] == ["fever", "diabetes"]


def test_module_shortcuts() -> None:
    assert default_detector() is default_detector()
    assert detect_assertions("Sin fiebre.", [(4, 10)], "es") == ["negated"]
    assert detect_language("Il paziente non presenta febbre e riferisce dolore alla gamba sinistra.") == "it"


def test_scope_is_capped_in_long_sentences(detector: AssertionDetector) -> None:
    filler = " ".join(["palabra"] * 5000)
    text = f"No fiebre {filler} neumonía"
    start = text.index("neumonía")
    assert detector.detect(text, [(3, 9), (start, start + 8)], "es") == ["negated", "present"]


# --------------------------------------------------------------------------------------------- bad input


BAD_TEXT = "Paciente sin fiebre con dolor secreto-XYZ en el tórax."


@pytest.mark.parametrize(
    "spans",
    [
        [(-1, 4)],
        [(10, 5)],
        [(0, 10_000)],
        [(3, 3)],
        [("a", "b")],
        [(1, 2, 3)],
        [None],
        [(True, 4)],
    ],
)
def test_bad_spans_are_present_and_logged_without_text(detector: AssertionDetector, spans: list[Any],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="fhir_ner.assertion"):
        good = (13, 19)  # "fiebre"
        result = detector.detect(BAD_TEXT, [*spans, good], "es")
    assert result == ["present"] * len(spans) + ["negated"]
    assert any("out of range" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert "secreto" not in record.getMessage()
        assert "fiebre" not in record.getMessage()


def test_bad_text(detector: AssertionDetector, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="fhir_ner.assertion"):
        assert detector.detect("", [(0, 1)], "es") == ["present"]
        assert detector.detect("", []) == []
        assert detector.detect(None, [(0, 1)]) == ["present"]  # type: ignore[arg-type]
        assert detector.detect("   \n\n  ", [(0, 2)]) == ["present"]
        assert detector.detect_language("") == detector.default_language
        assert detector.detect_language("1234 5678 !!!") == detector.default_language


@pytest.mark.parametrize(
    "text",
    [
        "No fever!!!???...;;;,,,No [[[cough]]] ((((no)))) no. no: no- -no ---",
        "no " * 3000 + "fever",
        "\n\n\n:::\n- - -\n" * 50 + "No fever",
        "No\u00a0fever\u200b, no\tcough\r\nno\x00pain",
        "Sin fiebre. No fever. Il paziente non ha febbre. Geen koorts. Fără febră. Ingen feber. Bez horečky.",
        "🙂 No fever 🙂 ¿no? ¡sin! «no» “no” 𝔫𝔬 ｆｅｖｅｒ",
        "History of present illness:\nFamily history:\n\n\nPMH:",
    ],
)
def test_odd_text_never_crashes(detector: AssertionDetector, text: str, caplog: pytest.LogCaptureFixture) -> None:
    spans = [(m.start(), m.end()) for m in re.finditer(r"\w+", text)][:200]
    with caplog.at_level(logging.DEBUG, logger="fhir_ner.assertion"):
        for language in (None, *LANGUAGES, "xx"):
            result = detector.detect(text, spans, language)
            assert len(result) == len(spans)
            assert set(result) <= set(ASSERTIONS)
    for record in caplog.records:
        assert "fever" not in record.getMessage()


def test_mixed_languages_use_one_rule_set(detector: AssertionDetector) -> None:
    text = "Paciente sin fiebre. The patient denies cough. El paciente presenta dolor y no tiene tos."
    start = text.index("fiebre")
    assert detector.detect(text, [(start, start + 6)]) == ["negated"]  # detected as Spanish (majority)


def test_internal_error_is_contained(detector: AssertionDetector, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Paciente sin fiebre")

    monkeypatch.setattr("worker.nlp.assertion._Note.__init__", boom)
    with caplog.at_level(logging.DEBUG, logger="fhir_ner.assertion"):
        assert detector.detect("Paciente sin fiebre.", [(13, 19)], "es") == ["present"]
    assert "RuntimeError" in caplog.text
    assert "fiebre" not in caplog.text


# --------------------------------------------------------------------------------------------- rule files


def test_shipped_rules_load(detector: AssertionDetector) -> None:
    assert set(detector.languages) == set(LANGUAGES)
    for language in LANGUAGES:
        assert detector.rules_for(language).rules


def write_rules(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(body, encoding="utf-8")
    return path


MINIMAL = """\
language: xx
rules:
  - {phrase: nope, category: negated, direction: forward}
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("language: xx\nrules: []\n", "rules"),
        ("language: xx\nrules:\n  - {phrase: nope, category: denied, direction: forward}\n", "rules[0].category"),
        ("language: xx\nrules:\n  - {phrase: nope, category: negated, direction: fwd}\n", "rules[0].direction"),
        ("language: xx\nrules:\n  - {phrase: nope, category: negated, direction: forward, max_scope: 0}\n",
         "rules[0].max_scope"),
        ("language: xx\nrules:\n  - {phrase: '', category: negated, direction: forward}\n", "rules[0].phrase"),
        ("language: xx\nrules:\n  - {phrase: nope, category: negated, direction: forward, scope: 3}\n",
         "unknown key"),
        ("language: yy\nrules:\n  - {phrase: nope, category: negated, direction: forward}\n", "file name"),
        (MINIMAL + "pseudo: [nope]\n", "listed twice"),
        (MINIMAL + "sections:\n  - {header: plan, category: maybe}\n", "sections[0].category"),
        ("language: xx\nfold_diacritics: true\nrules:\n  - {phrase: [año, ano], category: negated, direction: forward}"
         "\n  - {phrase: [sí, si], category: negated, direction: forward}\n", "listed twice"),
        ("language: [xx\n", "not valid YAML"),
        ("- just a list\n", "top level"),
    ],
)
def test_invalid_rules_name_file_and_field(tmp_path: Path, body: str, message: str) -> None:
    path = write_rules(tmp_path / "rules", "xx", body)
    with pytest.raises(AssertionRulesError) as error:
        AssertionDetector.from_rules_dir(path.parent)
    assert "xx.yaml" in str(error.value)
    assert message in str(error.value)


def test_empty_or_missing_rules_dir(tmp_path: Path) -> None:
    with pytest.raises(AssertionRulesError, match="not a folder"):
        AssertionDetector.from_rules_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionRulesError, match="no"):
        AssertionDetector.from_rules_dir(tmp_path / "empty")


def test_custom_rules_extend(tmp_path: Path) -> None:
    path = write_rules(tmp_path / "rules", "xx", MINIMAL + "terminators: [yet]\n")
    detector = AssertionDetector.from_rules_dir(path.parent, default_language="xx")
    text = "nope pain yet cough"
    assert detector.detect(text, [(5, 9), (14, 19)]) == ["negated", "present"]


def test_alternatives_and_terminator_categories(tmp_path: Path) -> None:
    body = """\
language: xx
rules:
  - {phrase: "{nope|nah} {|really }", category: negated, direction: forward}
  - {phrase: kin, category: family, direction: forward}
terminators:
  - {phrase: with, categories: [negated]}
"""
    detector = AssertionDetector.from_rules_dir(write_rules(tmp_path / "rules", "xx", body).parent)
    text = "nah really pain with cough. kin with gout."
    spans = [(11, 15), (21, 26), (37, 41)]
    assert detector.detect(text, spans, "xx") == ["negated", "present", "family"]
    bad = body.replace("categories: [negated]", "categories: [denied]")
    with pytest.raises(AssertionRulesError, match=r"terminators\[0\]\.categories"):
        AssertionDetector.from_rules_dir(write_rules(tmp_path / "bad", "xx", bad).parent)


def test_cost_stays_small_on_a_long_note(detector: AssertionDetector) -> None:
    """~700,000 characters and 700 mentions: well under the cost of tagging even one short note."""
    import time

    paragraph = load_cases("es")["paragraph"] + " Sin fiebre ni tos. Madre con diabetes.\n"
    text = paragraph * (700_000 // len(paragraph))
    spans = [(i, i + 5) for i in range(0, len(text) - 10, 1000)]
    started = time.perf_counter()
    result = detector.detect(text, spans, "es")
    assert len(result) == len(spans)
    assert time.perf_counter() - started < 5.0  # about 0.4 s on a busy 2-core machine
