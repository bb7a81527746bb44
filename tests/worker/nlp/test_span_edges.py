"""Span-edge rules (issue 15): exact offsets, Unicode, spans at the text's edges, never empty or outside."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from tiny_models import SAMPLE_NOTES

from worker.nlp.assertion import default_detector
from worker.nlp.decoding import TaggedSpan, refine_span
from worker.nlp.span_edges import (
    RULES_DIR,
    STEPS,
    SpanEdgeRulesError,
    apply_edge_rules,
    default_edge_rules,
    join_adjacent,
    load_edge_rules_file,
    parse_edge_rules,
    trim_function_words,
)
from worker.nlp.tagger import ClinicalTagger, TaggerPipeline

ES = default_edge_rules()["es"].with_steps(STEPS)
CS = default_edge_rules()["cs"].with_steps(STEPS)
EN = default_edge_rules()["en"].with_steps(STEPS)


def span_of(text: str, surface: str, label: str = "DISEASE", score: float = 0.9) -> TaggedSpan:
    start = text.index(surface)
    return TaggedSpan(label, start, start + len(surface), score)


def surfaces(text: str, spans: list[TaggedSpan]) -> list[str]:
    return [text[s.start : s.end] for s in spans]


def test_trailing_and_leading_function_words_are_trimmed_with_exact_offsets() -> None:
    text = "Refiere dolor de la rodilla con y la fiebre alta."
    spans = [span_of(text, "dolor de la rodilla con"), span_of(text, "y la fiebre alta", "SYMPTOM")]
    trimmed = trim_function_words(text, spans, ES)
    assert [(s.start, s.end) for s in trimmed] == [
        (text.index("dolor"), text.index("rodilla") + len("rodilla")),
        (text.index("fiebre"), text.index("alta") + len("alta")),
    ]
    assert surfaces(text, trimmed) == ["dolor de la rodilla", "fiebre alta"]
    assert [s.score for s in trimmed] == [0.9, 0.9]  # labels and scores are kept


def test_unicode_words_and_capitalised_function_words() -> None:
    text = "Při kontrole bolest v pravém boku a\nZánět močových cest"
    spans = [span_of(text, "bolest v pravém boku a"), span_of(text, "Při kontrole bolest")]
    assert surfaces(text, trim_function_words(text, spans, CS)) == ["bolest v pravém boku", "kontrole bolest"]


def test_a_lone_capital_is_a_name_not_a_function_word() -> None:
    text = "Hepatitis A y vitamina E; hepatitis B o C"
    spans = [span_of(text, "Hepatitis A"), span_of(text, "vitamina E"), span_of(text, "hepatitis B o C")]
    assert surfaces(text, trim_function_words(text, spans, ES)) == ["Hepatitis A", "vitamina E", "hepatitis B o C"]


def test_spans_at_the_very_start_and_end_of_the_text() -> None:
    text = "La disnea de"
    spans = [TaggedSpan("SYMPTOM", 0, len(text), 0.8)]
    (trimmed,) = trim_function_words(text, spans, ES)
    assert (trimmed.start, trimmed.end) == (3, 9)
    assert text[trimmed.start : trimmed.end] == "disnea"
    joined = join_adjacent(
        "orotracheal intubation", [TaggedSpan("PROCEDURE", 0, 11, 0.8), TaggedSpan("PROCEDURE", 12, 22, 0.6)], EN
    )
    assert [(s.start, s.end) for s in joined] == [(0, 22)]


def test_a_span_of_function_words_only_is_dropped_not_emptied() -> None:
    text = "dolor y de la"
    assert trim_function_words(text, [span_of(text, "y de la")], ES) == []
    assert surfaces(text, trim_function_words(text, [span_of(text, "dolor y")], ES)) == ["dolor"]


def test_join_adjacent_joins_across_a_space_or_hyphen_only() -> None:
    text = "Orotracheal intubation, LHRH-analogues and fever\nchills; pain pain"
    spans = [
        span_of(text, "Orotracheal", "PROCEDURE", 0.8),
        span_of(text, "intubation", "PROCEDURE", 0.6),
        span_of(text, "LHRH", "PROCEDURE", 0.9),
        span_of(text, "analogues", "PROCEDURE", 0.9),
        span_of(text, "fever", "SYMPTOM"),
        span_of(text, "chills", "SYMPTOM"),  # a newline between: not joined
        TaggedSpan("SYMPTOM", text.rindex("pain pain"), text.rindex("pain pain") + 4, 0.9),
        TaggedSpan("DISEASE", text.rindex("pain"), len(text), 0.9),  # other label: not joined
    ]
    joined = apply_edge_rules(text, join_adjacent(text, spans, EN), None)
    assert surfaces(text, joined) == ["Orotracheal intubation", "LHRH-analogues", "fever", "chills", "pain", "pain"]
    first = joined[0]
    assert (first.start, first.end) == (0, len("Orotracheal intubation"))
    # length-weighted score: 11 characters at 0.8, 10 at 0.6
    assert first.score == round((0.8 * 11 + 0.6 * 10) / 21, 4)
    # "and" is a connector: "fever" is not joined to "analogues"
    assert "analogues and fever" not in surfaces(text, joined)


def test_steps_run_only_when_listed_and_in_a_fixed_order() -> None:
    text = "dolor de rodilla de"
    spans = [span_of(text, "dolor"), TaggedSpan("DISEASE", 6, len(text), 0.9)]
    assert apply_edge_rules(text, spans, ES.with_steps([])) == sorted(spans, key=lambda s: (s.start, s.end))
    only_trim = apply_edge_rules(text, spans, ES.with_steps(["trim_function_words"]))
    assert surfaces(text, only_trim) == ["dolor", "rodilla"]
    # join first ("dolor" + "de rodilla de"), then trim the joined span's end
    both = apply_edge_rules(text, spans, ES.with_steps(["trim_function_words", "join_adjacent"]))
    assert surfaces(text, both) == ["dolor de rodilla"]
    with pytest.raises(SpanEdgeRulesError):
        ES.with_steps(["snap_to_moon"])


@pytest.mark.parametrize("language", sorted(default_edge_rules()))
def test_random_spans_stay_inside_the_text_and_never_empty(language: str) -> None:
    rng = random.Random(15)
    words = [
        "de",
        "la",
        "y",
        "a",
        "i",
        "the",
        "of",
        "ß",
        "Žena",
        "bolest",
        "dolor",
        "naïve",
        "-",
        ",",
        "東京",
        "e\u0301",
    ]
    rules = default_edge_rules()[language].with_steps(STEPS)
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        spans = []
        for _ in range(rng.randint(0, 5)):
            start = rng.randint(0, len(text) - 1)
            refined = refine_span(text, start, rng.randint(start + 1, len(text)))  # as decoding hands them over
            if refined is not None:
                spans.append(TaggedSpan(rng.choice(["DISEASE", "SYMPTOM"]), *refined, 0.7))
        for span in apply_edge_rules(text, spans, rules):
            assert 0 <= span.start < span.end <= len(text)
            assert text[span.start : span.end].strip() == text[span.start : span.end]


def test_shipped_rule_files_cover_the_assertion_languages_and_parse() -> None:
    assert set(default_edge_rules()) == set(default_detector()._rules)
    for path in sorted(RULES_DIR.glob("*.yaml")):
        rules = load_edge_rules_file(path)
        assert rules.language == path.stem
        assert set(rules.steps) <= set(STEPS)
        assert rules.leading and rules.trailing


@pytest.mark.parametrize(
    "data",
    [
        {"language": "xx", "steps": ["join_adjacent"]},  # not the file's language
        {"language": "es", "steps": ["unknown_step"]},
        {"language": "es", "steps": [], "leading": "de"},  # not a list
        {"language": "es", "steps": [], "extra_field": []},
    ],
)
def test_invalid_rule_data_is_refused_with_the_file_named(data: dict[str, object], tmp_path: Path) -> None:
    path = tmp_path / "es.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(SpanEdgeRulesError, match="es.yaml"):
        load_edge_rules_file(path)
    with pytest.raises(SpanEdgeRulesError):
        parse_edge_rules(data, "inline", expected_language="es")


def test_the_pipeline_applies_the_rules_of_the_given_language_before_its_threshold(tiny_tagger_path: Path) -> None:
    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    tagger.config.min_span_score = 0.0
    raw = TaggerPipeline(tagger, edge_rules=False).predict(SAMPLE_NOTES)
    scores = sorted(s.score for spans in raw for s in spans)
    assert scores
    tagger.config.min_span_score = scores[len(scores) // 2]
    found = TaggerPipeline(tagger).predict(SAMPLE_NOTES, ["es"] * len(SAMPLE_NOTES))
    rules = default_edge_rules()["es"]
    expected = [
        [s for s in apply_edge_rules(text, spans, rules) if s.score >= tagger.config.min_span_score]
        for text, spans in zip(SAMPLE_NOTES, raw, strict=True)
    ]
    assert found == expected
    with pytest.raises(ValueError, match="one language"):
        TaggerPipeline(tagger).predict(SAMPLE_NOTES, ["es"])


def test_a_languages_own_threshold_replaces_the_default_for_its_notes_only(tiny_tagger_path: Path) -> None:
    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    tagger.config.set_span_threshold(0.0)
    raw = TaggerPipeline(tagger).predict(SAMPLE_NOTES, ["es"] * len(SAMPLE_NOTES))
    scores = sorted(s.score for spans in raw for s in spans)
    assert scores[0] < scores[-1]
    high = scores[len(scores) // 2]
    tagger.config.min_span_score, tagger.config.min_span_score_by_language = 0.0, {"es": high}
    assert tagger.config.span_threshold("es") == high and tagger.config.span_threshold("sv") == 0.0
    spanish = TaggerPipeline(tagger).predict(SAMPLE_NOTES, ["es"] * len(SAMPLE_NOTES))
    assert spanish == [[s for s in spans if s.score >= high] for spans in raw]
    assert sum(map(len, spanish)) < sum(map(len, raw))
    # The same notes read as Swedish keep the default threshold (their edge rules are Swedish's).
    swedish_raw = TaggerPipeline(tagger).predict(SAMPLE_NOTES, ["sv"] * len(SAMPLE_NOTES))
    tagger.config.set_span_threshold(0.0)
    assert tagger.config.min_span_score_by_language == {}
    assert TaggerPipeline(tagger).predict(SAMPLE_NOTES, ["sv"] * len(SAMPLE_NOTES)) == swedish_raw
