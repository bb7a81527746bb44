"""Tests for worker.nlp.metrics; expected values are worked out by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.nlp.corpus import Span, load_documents, write_span_tsv
from worker.nlp.metrics import (
    char_overlap_f1,
    evaluate,
    evaluate_paths,
    format_report,
    report_to_json,
)

NOTES = Path(__file__).resolve().parents[2] / "fixtures" / "notes" / "es"  # six annotated notes


def S(start: int, end: int, label: str = "DISEASE", doc: str = "d1") -> Span:  # noqa: N802
    return Span(doc_id=doc, label=label, start=start, end=end)


def test_char_overlap_f1_hand_values() -> None:
    # gold [0,10), pred [5,10): overlap 5; p = 5/5 = 1, r = 5/10 = 0.5; f = 2*0.5/1.5 = 0.6667
    assert char_overlap_f1(S(0, 10), S(5, 10)) == pytest.approx(2 / 3)
    # gold [0,4), pred [2,8): overlap 2; p = 2/6, r = 2/4; f = 2*(1/3)(1/2)/(5/6) = 0.4
    assert char_overlap_f1(S(0, 4), S(2, 8)) == pytest.approx(0.4)
    assert char_overlap_f1(S(0, 5), S(5, 9)) == 0.0  # touching, no shared character
    assert char_overlap_f1(S(3, 3), S(3, 3)) == 1.0  # identical empty spans
    assert char_overlap_f1(S(3, 3), S(0, 9)) == 0.0


def test_partial_overlap_scores() -> None:
    r = evaluate([S(0, 10)], [S(5, 10)])
    # strict: no exact match -> tp 0, fp 1, fn 1, all strict scores 0
    assert (r.overall.tp, r.overall.fp, r.overall.fn) == (0, 1, 1)
    assert r.overall.strict_f1 == 0.0
    # overlap: gold's best = 2/3, pred's best = 2/3 -> P = R = F1 = 2/3
    assert r.overall.overlap_recall == pytest.approx(2 / 3)
    assert r.overall.overlap_precision == pytest.approx(2 / 3)
    assert r.overall.overlap_f1 == pytest.approx(2 / 3)


def test_strict_one_to_one_with_duplicates() -> None:
    gold = [S(0, 5), S(10, 15)]
    pred = [S(0, 5), S(0, 5), S(0, 5)]
    r = evaluate(gold, pred)
    # [0,5) matches once: tp 1; the 2 duplicates are fp; [10,15) is fn
    assert (r.overall.tp, r.overall.fp, r.overall.fn) == (1, 2, 1)
    assert r.overall.strict_precision == pytest.approx(1 / 3)
    assert r.overall.strict_recall == pytest.approx(1 / 2)
    # F1 = 2*(1/3)(1/2)/(5/6) = 0.4
    assert r.overall.strict_f1 == pytest.approx(0.4)
    # overlap: every pred's best is 1.0 -> P = 3/3; gold bests 1.0 and 0.0 -> R = 0.5
    assert r.overall.overlap_precision == pytest.approx(1.0)
    assert r.overall.overlap_recall == pytest.approx(0.5)
    assert r.overall.overlap_f1 == pytest.approx(2 / 3)  # 2*1*0.5/1.5


def test_different_labels_and_documents_never_match() -> None:
    gold = [S(0, 10, "DISEASE")]
    pred = [S(0, 10, "SYMPTOM"), S(0, 10, "DISEASE", doc="d2")]
    r = evaluate(gold, pred)
    assert r.overall.tp == 0
    assert r.overall.overlap_precision == 0.0 and r.overall.overlap_recall == 0.0
    assert r.per_label["SYMPTOM"].n_gold == 0 and r.per_label["SYMPTOM"].n_pred == 1
    assert r.per_label["DISEASE"].fp == 1 and r.per_label["DISEASE"].fn == 1


def test_overlapping_spans_of_different_types() -> None:
    # gold: DISEASE [0,20) and, nested in it, SYMPTOM [5,10)
    gold = [S(0, 20, "DISEASE"), S(5, 10, "SYMPTOM")]
    # pred: DISEASE [0,10) and SYMPTOM [5,10)
    pred = [S(0, 10, "DISEASE"), S(5, 10, "SYMPTOM")]
    r = evaluate(gold, pred)
    dis, sym = r.per_label["DISEASE"], r.per_label["SYMPTOM"]
    # SYMPTOM exact; the DISEASE pred is not credited against the SYMPTOM gold
    assert (sym.tp, sym.fp, sym.fn) == (1, 0, 0) and sym.overlap_f1 == 1.0
    # DISEASE: overlap 10; p = 10/10 = 1, r = 10/20 = 0.5; f = 2/3 for both sides
    assert (dis.tp, dis.fp, dis.fn) == (0, 1, 1)
    assert dis.overlap_precision == pytest.approx(2 / 3) and dis.overlap_recall == pytest.approx(2 / 3)
    # overall micro: strict tp 1 of 2 pred / 2 gold -> P = R = F1 = 0.5
    assert r.overall.strict_f1 == pytest.approx(0.5)
    # overall overlap: mean over 2 gold spans (2/3 + 1)/2 = 5/6; same for pred
    assert r.overall.overlap_recall == pytest.approx(5 / 6)
    assert r.overall.overlap_f1 == pytest.approx(5 / 6)


def test_best_match_is_taken_per_span() -> None:
    # gold [0,10) vs preds [0,4) (f = 2*1*0.4/1.4 = 0.5714) and [0,9) (f = 2*1*0.9/1.9 = 0.9474)
    r = evaluate([S(0, 10)], [S(0, 4), S(0, 9)])
    assert r.overall.overlap_recall == pytest.approx(18 / 19)
    # precision: mean of each pred's best = (0.5714 + 0.9474)/2
    assert r.overall.overlap_precision == pytest.approx((0.8 / 1.4 + 1.8 / 1.9) / 2)


def test_micro_overall_is_not_macro() -> None:
    # DISEASE: 3 gold, all found exactly; SYMPTOM: 1 gold, missed.
    gold = [S(0, 1), S(2, 3), S(4, 5), S(6, 7, "SYMPTOM")]
    pred = [S(0, 1), S(2, 3), S(4, 5)]
    r = evaluate(gold, pred)
    # micro recall = 3/4 (macro would be (1 + 0)/2 = 0.5)
    assert r.overall.strict_recall == pytest.approx(0.75)
    assert r.overall.overlap_recall == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("gold", "pred", "counts"),
    [
        ([], [], (0, 0, 0, 0, 0)),
        ([S(0, 5)], [], (0, 0, 1, 1, 0)),
        ([], [S(0, 5)], (0, 1, 0, 0, 1)),
    ],
)
def test_empty_sets_give_zero_without_error(
    gold: list[Span], pred: list[Span], counts: tuple[int, int, int, int, int]
) -> None:
    r = evaluate(gold, pred)
    o = r.overall
    assert (o.tp, o.fp, o.fn, o.n_gold, o.n_pred) == counts
    assert o.strict_precision == o.strict_recall == o.strict_f1 == 0.0
    assert o.overlap_precision == o.overlap_recall == o.overlap_f1 == 0.0


def test_labels_argument_filters_and_fixes_rows() -> None:
    gold = [S(0, 5, "DISEASE"), S(0, 5, "MEDICATION")]
    pred = [S(0, 5, "DISEASE")]
    r = evaluate(gold, pred, labels=["DISEASE", "PROCEDURE"])
    assert list(r.per_label) == ["DISEASE", "PROCEDURE"]
    assert r.overall.n_gold == 1 and r.overall.strict_f1 == 1.0  # MEDICATION ignored
    assert r.per_label["PROCEDURE"].n_gold == 0


def test_report_json_and_table() -> None:
    r = evaluate([S(0, 10), S(0, 3, "SYMPTOM")], [S(5, 10)])
    data = report_to_json(r)
    json.dumps(data)  # serialisable
    assert data["overall"]["n_gold"] == 2 and set(data["per_label"]) == {"DISEASE", "SYMPTOM"}
    table = format_report(r)
    assert "DISEASE" in table and "SYMPTOM" in table and "ALL" in table
    assert "0.6667" in table  # DISEASE overlap scores


def test_evaluate_paths_gold_folder_drops_unknown_docs(tmp_path: Path) -> None:
    gold_dir = tmp_path / "gold"
    gold_dir.mkdir()
    (gold_dir / "a.txt").write_text("fiebre alta", encoding="utf-8")
    (gold_dir / "a.ann").write_text("T1\tSYMPTOM 0 6\tfiebre\n", encoding="utf-8")
    (gold_dir / "b.txt").write_text("nada", encoding="utf-8")
    pred = tmp_path / "pred.tsv"
    write_span_tsv(
        pred,
        [
            Span("a", "SYMPTOM", 0, 6, "fiebre"),
            Span("b", "SYMPTOM", 0, 4, "nada"),  # known doc without gold: a false positive
            Span("zzz", "SYMPTOM", 0, 3, "otr"),  # unknown doc: not scored, reported
        ],
    )
    r = evaluate_paths(gold_dir, pred)
    assert (r.overall.tp, r.overall.fp, r.overall.fn) == (1, 1, 0)
    assert r.unknown_pred_docs == ["zzz"] and r.warnings

    # gold as TSV: no document list, so the unknown document's span is scored as a FP
    gold_tsv = tmp_path / "gold.tsv"
    write_span_tsv(gold_tsv, [Span("a", "SYMPTOM", 0, 6, "fiebre")])
    r2 = evaluate_paths(gold_tsv, pred)
    assert (r2.overall.tp, r2.overall.fp) == (1, 2)
    assert r2.unknown_pred_docs == ["b", "zzz"]


def test_gold_vs_gold_is_perfect_on_the_fixture_notes(tmp_path: Path) -> None:
    docs = load_documents(NOTES)
    assert len(docs) == 6
    spans = [s for d in docs for s in d.spans]
    assert all(d.text[s.start : s.end] == s.text for d in docs for s in d.spans)
    pred = tmp_path / "pred.tsv"
    write_span_tsv(pred, spans)
    r = evaluate_paths(NOTES, pred)
    assert r.unknown_pred_docs == []
    for row in [r.overall, *r.per_label.values()]:
        assert row.strict_f1 == 1.0 and row.overlap_f1 == 1.0
        assert row.fp == row.fn == 0
    assert r.overall.n_gold == len(spans) == 88


def test_calibration_picks_the_threshold_that_drops_the_false_positives() -> None:
    from worker.nlp.metrics import calibrate_min_score

    gold = [S(0, 5), S(10, 15)]
    scored = [
        Span("d1", "DISEASE", 0, 5, score=0.9),
        Span("d1", "DISEASE", 10, 15, score=0.8),
        Span("d1", "DISEASE", 20, 25, score=0.55),  # wrong
        Span("d1", "DISEASE", 30, 35, score=0.6),  # wrong
    ]
    threshold, report = calibrate_min_score(gold, scored, ["DISEASE"], candidates=(0.5, 0.58, 0.65, 0.85))
    # 0.5 keeps all four (strict P 0.5, R 1); 0.58 drops one (P 2/3); 0.65 drops both (P 1, R 1); 0.85 loses a hit.
    assert threshold == 0.65
    assert report.overall.strict_precision == 1.0 and report.overall.strict_recall == 1.0
    no_noise, _ = calibrate_min_score(gold, scored[:2], ["DISEASE"], candidates=(0.5, 0.85))
    assert no_noise == 0.0  # nothing to gain: no threshold (ties go to the lowest)
