"""The linker's threshold recipe (benchmarks/calibrate_linker.py): the tagger's mentions judged by the note's codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.calibrate_linker import (
    choose,
    document_codes,
    exact_match_precision,
    gold_spans,
    main,
    measure,
    tagged_truth,
    two_fold,
)


def write_dev(root: Path) -> Path:
    dev = root / "dev"
    dev.mkdir()
    (dev / "devX.tsv").write_text(
        "doc1\tDIAGNOSTICO\tr51\tcefalea\t10 17\n"
        "doc1\tPROCEDIMIENTO\tbw03zzz\tradiografía de tórax\t30 41;50 55\n"
        "doc1\tDIAGNOSTICO\tj18.9\tneumonía\t60 68\n",
        encoding="utf-8",
    )
    (dev / "devD.tsv").write_text("doc1\tr51\ndoc1\tj18.9\ndoc1\ti10\n", encoding="utf-8")
    (dev / "devP.tsv").write_text("doc1\tbw03zzz\n", encoding="utf-8")
    return root


def test_a_tagged_mention_is_judged_by_the_coded_mention_it_overlaps_else_by_the_notes_codes(tmp_path: Path) -> None:
    data = write_dev(tmp_path)
    spans = gold_spans(data)["doc1"]
    assert (30, 41, "PROCEDIMIENTO", "BW03ZZZ") in spans and (50, 55, "PROCEDIMIENTO", "BW03ZZZ") in spans
    codes = document_codes(data)
    assert codes[("doc1", "DIAGNOSTICO")] == {"R51", "J18.9", "I10"}
    # Overlapping "cefalea": only its code counts, not the note's other codes.
    assert tagged_truth("SYMPTOM", 12, 20, spans, codes[("doc1", "DIAGNOSTICO")]) == ({"R51"}, True)
    # A second "neumonía" elsewhere in the note (CodiEsp marks one mention per code): any of the note's codes.
    assert tagged_truth("DISEASE", 100, 108, spans, codes[("doc1", "DIAGNOSTICO")]) == ({"R51", "J18.9", "I10"}, False)
    # A procedure overlapping a diagnosis's span is judged by the procedures of the note, not by the diagnosis.
    assert tagged_truth("PROCEDURE", 60, 68, spans, codes[("doc1", "PROCEDIMIENTO")]) == ({"BW03ZZZ"}, False)
    assert tagged_truth("PROCEDURE", 52, 54, spans, set()) == ({"BW03ZZZ"}, True)  # the second piece


def test_the_tagged_threshold_is_relative_to_how_often_exact_matches_are_right() -> None:
    # Exact matches right 8 times in 10 (the truth's own ceiling); lower scores right less and less often.
    points = [(1.0, k < 8) for k in range(10)] + [(0.9, True), (0.9, False), (0.8, True), (0.8, False), (0.8, False)]
    points += [(0.5, False)] * 10
    assert exact_match_precision(points) == 0.8
    assert exact_match_precision([(0.7, True)]) == 1.0  # no exact match: no discount
    # 0.9 x 0.8 = 0.72: at 0.9 the written codes are 9 right of 12 (0.75); at 0.8, 10 of 15 (0.67).
    threshold = choose(points, 0.9 * exact_match_precision(points))
    assert threshold == 0.9
    assert measure(points, threshold, len(points)) == {"coverage": round(12 / 25, 4), "precision": 0.75}
    # Against an absolute 0.9 nothing reaches it: no code would be written.
    assert choose(points, 0.9) == 1.01
    folds = two_fold(points, [f"doc{k}" for k in range(len(points))], 0.9, relative=True)
    assert len(folds) == 2 and all({"threshold", "coverage", "precision"} <= set(fold) for fold in folds)


def test_another_profile_cannot_overwrite_the_shipped_thresholds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.linker import LINKER_DIR

    shipped = (LINKER_DIR / "thresholds.json").read_bytes()
    profile = tmp_path / "chapter-r.yaml"
    profile.write_text("name: mine\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--profile", str(profile), "--write", "--data", str(tmp_path / "no-codiesp")])
    assert exit_info.value.code == 2
    assert "--write stores the built-in profile's thresholds" in capsys.readouterr().err
    assert (LINKER_DIR / "thresholds.json").read_bytes() == shipped
