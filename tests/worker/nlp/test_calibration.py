"""Calibrating a checkpoint's span-score threshold on validation notes, through the production pipeline."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from tiny_models import SAMPLE_NOTES, char_spans

from worker.nlp.corpus import Document, Span
from worker.nlp.metrics import SCORE_THRESHOLDS
from worker.nlp.tagger import ClinicalTagger, TaggerConfig
from worker.nlp.training import calibrate_checkpoint, evaluate_checkpoint, predict_checkpoint, save_span_thresholds


def test_the_calibrated_threshold_is_saved_and_the_pipeline_then_scores_as_reported(
    tiny_tagger_path: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "tagger"
    shutil.copytree(tiny_tagger_path, checkpoint)
    docs = [
        Document(f"d{i}", text, [Span(f"d{i}", label, start, end) for label, start, end in char_spans(i)])
        for i, text in enumerate(SAMPLE_NOTES)
    ]
    # A noisier validation set: the notes twice more, with only half of their gold spans each time.
    docs += [
        Document(f"h{i}", text, [Span(f"h{i}", label, start, end) for label, start, end in char_spans(i)[::2]])
        for i, text in enumerate(SAMPLE_NOTES)
    ]
    unthresholded = evaluate_checkpoint(checkpoint, docs)
    threshold, report = calibrate_checkpoint(checkpoint, docs)
    assert threshold in (0.0, *SCORE_THRESHOLDS)
    assert json.loads((checkpoint / "tagger_config.json").read_text())["min_span_score"] == threshold
    gain = report.overall.overlap_f1 + report.overall.strict_f1
    assert gain >= unthresholded.overall.overlap_f1 + unthresholded.overall.strict_f1
    # Loaded again, the checkpoint applies its threshold: the production path scores exactly as reported.
    assert evaluate_checkpoint(checkpoint, docs) == report


def test_per_language_thresholds_are_saved_loaded_and_set_aside_when_one_is_forced(
    tiny_tagger_path: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "tagger"
    shutil.copytree(tiny_tagger_path, checkpoint)
    config = save_span_thresholds(checkpoint, 0.6, {"es": 0.675}, "-cal")
    assert config["model_revision"].endswith("-cal")
    loaded = ClinicalTagger.from_pretrained(checkpoint).config
    assert (loaded.span_threshold("es"), loaded.span_threshold("nl"), loaded.span_threshold(None)) == (0.675, 0.6, 0.6)
    docs = [Document(f"d{i}", text, []) for i, text in enumerate(SAMPLE_NOTES)]
    # Scoring paths tag once with no threshold at all: Spanish's own must not stay behind.
    _, scored, _ = predict_checkpoint(checkpoint, docs, min_span_score=0.0, language="es")
    _, spanish, _ = predict_checkpoint(checkpoint, docs, language="es")
    assert spanish == [s for s in scored if (s.score or 0.0) >= 0.675]
    # A threshold calibrated for all languages replaces the per-language ones.
    threshold, _ = calibrate_checkpoint(checkpoint, docs)
    assert ClinicalTagger.from_pretrained(checkpoint).config.span_threshold("es") == threshold


def test_spanish_gets_its_own_threshold_and_the_other_languages_share_one() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from eval_languages import calibrate_thresholds

    def tagged(gold_scores: list[float], wrong_scores: list[float]) -> tuple[list[Span], list[Span], list[str]]:
        """Gold mentions predicted with ``gold_scores``, and wrong predictions with ``wrong_scores``."""
        gold = [Span("d", "DISEASE", 10 * i, 10 * i + 5) for i in range(len(gold_scores))]
        right = [Span("d", "DISEASE", g.start, g.end, score=s) for g, s in zip(gold, gold_scores, strict=True)]
        wrong = [Span("d", "DISEASE", 1000 + 10 * i, 1005 + 10 * i, score=s) for i, s in enumerate(wrong_scores)]
        return gold, right + wrong, ["DISEASE"]

    # Spanish: right mentions score 0.9, wrong ones 0.75: the lowest threshold over 0.75 drops only the wrong ones.
    # The others: right mentions score 0.5-0.55 and wrong ones 0.3, so 0.5 keeps exactly the right ones.
    sets = {
        "es (108 notes)": tagged([0.9] * 6, [0.75] * 4),
        "sv": tagged([0.55] * 6, [0.3]),
        "sv genres": tagged([0.5] * 6, [0.3]),
    }
    default, by_language, table = calibrate_thresholds(sets)
    assert (default, by_language) == (0.5, {"es": 0.775})
    assert set(table) == {"es", "*"}
    # Without Spanish notes there is one threshold, and no per-language one.
    default, by_language, _ = calibrate_thresholds({k: v for k, v in sets.items() if not k.startswith("es")})
    assert (default, by_language) == (0.5, {})


def test_the_genre_scores_reuse_the_sets_calibration_tagged(monkeypatch: pytest.MonkeyPatch) -> None:
    """``eval_languages.py --calibrate`` tags the genre passages to choose the thresholds; scoring them afterwards
    reuses those spans instead of tagging the passages a second time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    import eval_languages

    import worker.nlp.training

    docs = [Document("case__stroke_1", "x" * 40, []), Document("health__gout_1", "x" * 40, [])]
    monkeypatch.setattr(eval_languages, "genre_sets", lambda: {"sv genres": docs})

    def no_tagging(*args: object, **kwargs: object) -> None:
        raise AssertionError("the genre passages were tagged again")

    monkeypatch.setattr(worker.nlp.training, "predict_checkpoint", no_tagging)
    gold = [Span("case__stroke_1", "DISEASE", 0, 5), Span("health__gout_1", "SYMPTOM", 10, 15)]
    scored = [Span("case__stroke_1", "DISEASE", 0, 5, score=0.9), Span("health__gout_1", "SYMPTOM", 10, 15, score=0.4)]
    thresholds = TaggerConfig(encoder="unused", min_span_score=0.5)
    out = eval_languages.genres(
        Path("unused"), thresholds, tagged={"sv genres": (gold, scored, ["DISEASE", "SYMPTOM"])}
    )
    assert out["sv genres"]["touched_by_genre"] == {"case": 1.0, "health": 0.0}
    assert out["sv genres"]["touched"] == 0.5 and out["sv genres"]["min_span_score"] == 0.5
    # Without them, the passages are tagged (here: the fake refuses).
    with pytest.raises(AssertionError, match="tagged again"):
        eval_languages.genres(Path("unused"), thresholds)
