"""Tests for worker.nlp.corpus: BRAT / TSV reading, TSV round trip, name-based split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from worker.nlp.corpus import (
    SPAN_TSV_COLUMNS,
    Document,
    Span,
    load_documents,
    read_brat_folder,
    read_multiclinner_folder,
    read_span_tsv,
    split_by_name,
    write_span_tsv,
)

# Six annotated Spanish notes written for the tests (tests/fixtures/README.md).
NOTES = Path(__file__).resolve().parents[2] / "fixtures" / "notes" / "es"


def _write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write(content)


ACCENT_TEXT = "Varón de 54 años con diabetes.\r\nRefiere disnea y cefalea; se realizó ecografía."


def _offsets(text: str, needle: str) -> tuple[int, int]:
    start = text.index(needle)
    return start, start + len(needle)


def _make_brat(folder: Path) -> None:
    t = ACCENT_TEXT
    d0, d1 = _offsets(t, "diabetes")
    s0, s1 = _offsets(t, "disnea")
    c0, c1 = _offsets(t, "cefalea")
    e0, e1 = _offsets(t, "ecografía")
    ann = "\n".join(
        [
            f"T1\tDISEASE {d0} {d1}\tdiabetes",
            f"T2\tSYMPTOM {s0} {s1}\tdisnea",
            "#1\tAnnotatorNotes T1\tignored note",
            f"T3\tPROCEDURE {e0} {e1}\tecografía",
            f"T4\tMEDICATION {c0} {c1}\tcefalea",
            "R1\tRel Arg1:T1 Arg2:T2",
            "",
        ]
    )
    _write(folder / "caso-á.txt", t)
    _write(folder / "caso-á.ann", ann)
    _write(folder / "b-empty.txt", "Sin hallazgos.")  # no .ann: a document without spans


def test_read_brat_folder_accents_crlf_and_order(tmp_path: Path) -> None:
    _make_brat(tmp_path)
    docs = read_brat_folder(tmp_path)
    assert [d.doc_id for d in docs] == ["b-empty", "caso-á"]  # sorted by doc_id
    assert docs[0].spans == []
    doc = docs[1]
    assert "\r\n" in doc.text  # CRLF kept: offsets after it would shift otherwise
    assert [(s.label, s.text) for s in doc.spans] == [
        ("DISEASE", "diabetes"),
        ("SYMPTOM", "disnea"),
        ("MEDICATION", "cefalea"),
        ("PROCEDURE", "ecografía"),
    ]
    for s in doc.spans:
        assert doc.text[s.start : s.end] == s.text
        assert s.doc_id == "caso-á"


def test_read_brat_folder_label_filter(tmp_path: Path) -> None:
    _make_brat(tmp_path)
    docs = read_brat_folder(tmp_path, labels={"DISEASE", "SYMPTOM", "PROCEDURE"})
    assert Counter(s.label for d in docs for s in d.spans) == Counter(
        {"DISEASE": 1, "SYMPTOM": 1, "PROCEDURE": 1}
    )


def test_read_brat_folder_mismatch_names_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path / "doc.txt", "Fiebre alta.")
    _write(tmp_path / "doc.ann", "T1\tSYMPTOM 0 6\tFiebre\nT2\tSYMPTOM 0 6\tfiebre\n")
    with pytest.raises(ValueError, match=r"doc\.ann:2: covered text 'fiebre'"):
        read_brat_folder(tmp_path)


def test_read_brat_folder_offsets_outside_text(tmp_path: Path) -> None:
    _write(tmp_path / "doc.txt", "Fiebre")
    _write(tmp_path / "doc.ann", "T1\tSYMPTOM 0 60\tFiebre\n")
    with pytest.raises(ValueError, match=r"doc\.ann:1: offsets 0-60 outside"):
        read_brat_folder(tmp_path)


def test_read_brat_folder_orphan_ann(tmp_path: Path) -> None:
    _write(tmp_path / "lost.ann", "T1\tSYMPTOM 0 1\tx\n")
    with pytest.raises(ValueError, match="lost.ann"):
        read_brat_folder(tmp_path)


def test_read_brat_discontinuous_span_becomes_extent(tmp_path: Path) -> None:
    text = "dolor en el pecho y brazo"
    # fragments "dolor" [0,5) and "brazo" [20,25); BRAT joins them with a space.
    _write(tmp_path / "d.txt", text)
    _write(tmp_path / "d.ann", "T1\tSYMPTOM 0 5;20 25\tdolor brazo\n")
    (doc,) = read_brat_folder(tmp_path)
    (span,) = doc.spans
    assert (span.start, span.end, span.text) == (0, 25, text)


def test_span_tsv_round_trip_with_tabs_and_newlines(tmp_path: Path) -> None:
    spans = [
        Span("doc1", "SYMPTOM", 3, 14, 'tos\tseca\n"x"', score=0.93, assertion="negated", code="49727002"),
        Span("doc1", "DISEASE", 20, 25, "asma\r"),
        Span("doc2", "PROCEDURE", 0, 3, "TAC"),
    ]
    out = tmp_path / "sub" / "pred.tsv"
    write_span_tsv(out, spans)
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "\t".join(SPAN_TSV_COLUMNS)
    assert len(lines) == 5 and lines[-1] == ""  # header + 3 rows + final newline: nothing broke a row
    assert all(len(line.split("\t")) == 8 for line in lines[:-1])
    back = read_span_tsv(out)
    assert back == [
        # tab/newline/CR become one space each (length kept); quotes stay literal
        Span("doc1", "SYMPTOM", 3, 14, 'tos seca "x"', score=0.93, assertion="negated", code="49727002"),
        Span("doc1", "DISEASE", 20, 25, "asma "),
        Span("doc2", "PROCEDURE", 0, 3, "TAC"),
    ]


def test_read_span_tsv_multiclinner_columns_any_order(tmp_path: Path) -> None:
    tsv = tmp_path / "gold.tsv"
    _write(
        tsv,
        "ann_id\ttext\tend_span\tfilename\tlabel\tstart_span\tmark\n"
        "T1\tfiebre\t6\tcaso1\tSYMPTOM\t0\tx\n"
        "T2\tTAC\t10\tcaso2.txt\tPROCEDURE\t7\ty\n",
    )
    assert read_span_tsv(tsv) == [
        Span("caso1", "SYMPTOM", 0, 6, "fiebre"),
        Span("caso2", "PROCEDURE", 7, 10, "TAC"),
    ]


def test_read_span_tsv_missing_columns(tmp_path: Path) -> None:
    tsv = tmp_path / "bad.tsv"
    _write(tsv, "filename\tlabel\tstart\tend\n")
    with pytest.raises(ValueError, match="start_span"):
        read_span_tsv(tsv)


def test_read_multiclinner_folder_layout(tmp_path: Path) -> None:
    _write(tmp_path / "txt" / "caso1.txt", "Fiebre y tos.")
    _write(tmp_path / "txt" / "caso2.txt", "Sin hallazgos.")
    header = "filename\tann_id\tlabel\tstart_span\tend_span\ttext\n"
    _write(tmp_path / "tsv" / "symptom.tsv", header + "caso1\tT1\tSYMPTOM\t0\t6\tFiebre\n")
    # a combined TSV repeating a span, and an unrelated TSV that must be ignored
    _write(
        tmp_path / "tsv" / "all.tsv",
        header + "caso1\tT1\tSYMPTOM\t0\t6\tFiebre\ncaso1\tT2\tSYMPTOM\t9\t12\ttos\n",
    )
    _write(tmp_path / "stats.tsv", "label\tcount\nSYMPTOM\t2\n")
    docs = load_documents(tmp_path)  # no .ann -> TSV + txt layout
    assert [d.doc_id for d in docs] == ["caso1", "caso2"]
    assert [(s.start, s.end, s.text) for s in docs[0].spans] == [(0, 6, "Fiebre"), (9, 12, "tos")]
    assert docs[1].spans == []


def test_read_multiclinner_folder_text_mismatch(tmp_path: Path) -> None:
    _write(tmp_path / "txt" / "c.txt", "Fiebre")
    _write(tmp_path / "a.tsv", "filename\tlabel\tstart_span\tend_span\ttext\nc\tSYMPTOM\t0\t6\tfiebre\n")
    with pytest.raises(ValueError, match="does not match"):
        read_multiclinner_folder(tmp_path)


def test_read_multiclinner_folder_missing_text(tmp_path: Path) -> None:
    _write(tmp_path / "txt" / "c.txt", "Fiebre")
    _write(tmp_path / "a.tsv", "filename\tlabel\tstart_span\tend_span\ttext\nz\tSYMPTOM\t0\t6\tFiebre\n")
    with pytest.raises(ValueError, match="no z.txt"):
        read_multiclinner_folder(tmp_path)


def test_load_documents_dispatch_brat_and_empty(tmp_path: Path) -> None:
    _make_brat(tmp_path / "brat")
    assert len(load_documents(tmp_path / "brat")) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        load_documents(tmp_path / "empty")


def _docs(names: list[str]) -> list[Document]:
    return [Document(doc_id=n, text="") for n in names]


def test_split_by_name_deterministic_and_stable() -> None:
    names = [f"caso_{i:04d}" for i in range(1000)]
    train, val = split_by_name(_docs(names), 0.1)
    assert len(train) + len(val) == 1000
    assert 60 <= len(val) <= 140  # ~10% in expectation (hash-based, not exact)
    # same call, reversed input order -> same membership
    train_r, val_r = split_by_name(_docs(names[::-1]), 0.1)
    assert {d.doc_id for d in val_r} == {d.doc_id for d in val}
    # adding files never moves existing ones
    _, val_more = split_by_name(_docs(names + [f"nuevo_{i}" for i in range(500)]), 0.1)
    assert {d.doc_id for d in val_more} & set(names) == {d.doc_id for d in val}
    # another seed gives another split; the fractions' edge values behave
    _, val_seed = split_by_name(_docs(names), 0.1, seed=1)
    assert {d.doc_id for d in val_seed} != {d.doc_id for d in val}
    assert split_by_name(_docs(names), 0.0)[1] == []
    assert split_by_name(_docs(names), 1.0)[0] == []
    with pytest.raises(ValueError):
        split_by_name(_docs(names), 1.5)


def test_the_fixture_notes_read_cleanly() -> None:
    docs = load_documents(NOTES)
    assert [d.doc_id for d in docs] == [f"caso-0{n}" for n in range(1, 7)]
    counts = Counter(s.label for d in docs for s in d.spans)
    assert counts == Counter({"DISEASE": 23, "SYMPTOM": 34, "PROCEDURE": 31})  # tests/fixtures/README.md
    for d in docs:
        for s in d.spans:
            assert d.text[s.start : s.end] == s.text
    caso04 = next(d for d in docs if d.doc_id == "caso-04")  # a biopsy (PROCEDURE) of a lesion (DISEASE)
    assert any(a.label != b.label and a.start < b.end and b.start < a.end for a in caso04.spans for b in caso04.spans)
    train, val = split_by_name(docs, 0.5)
    assert sorted(d.doc_id for d in train + val) == [d.doc_id for d in docs] and train and val
