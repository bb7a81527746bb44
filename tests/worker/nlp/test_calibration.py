"""Calibrating a checkpoint's span-score threshold on validation notes, through the production pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tiny_models import SAMPLE_NOTES, char_spans

from worker.nlp.corpus import Document, Span
from worker.nlp.metrics import SCORE_THRESHOLDS
from worker.nlp.training import calibrate_checkpoint, evaluate_checkpoint


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
