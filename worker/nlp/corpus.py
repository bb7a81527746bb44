"""Read annotated clinical NER corpora (BRAT standoff, MultiClinNER-style TSV) and span TSV files.

Everything here works on *character* offsets into the raw UTF-8 text (end exclusive, Python
slicing), which is what BRAT and the MultiClinNER shared task use. Text files are read with
``newline=""`` so that ``\\r\\n`` line endings are kept and offsets are not shifted.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SPAN_TSV_COLUMNS",
    "Document",
    "Span",
    "load_documents",
    "read_brat_folder",
    "read_multiclinner_folder",
    "read_span_tsv",
    "split_by_name",
    "tsv_safe_text",
    "write_span_tsv",
]

#: Exact header of the project's span TSV; other tools rely on this column order.
SPAN_TSV_COLUMNS: tuple[str, ...] = (
    "filename",
    "label",
    "start_span",
    "end_span",
    "text",
    "score",
    "assertion",
    "code",
)
#: Columns a TSV must have (in any order) to be read as spans; the MultiClinNER minimum.
REQUIRED_TSV_COLUMNS: tuple[str, ...] = ("filename", "label", "start_span", "end_span", "text")

_TSV_UNSAFE = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


@dataclass(frozen=True)
class Span:
    """One labelled character span of a document; frozen so spans can live in sets/dict keys."""

    doc_id: str
    label: str
    start: int
    end: int
    text: str = ""
    score: float | None = None
    assertion: str | None = None
    code: str | None = None

    @property
    def key(self) -> tuple[str, str, int, int]:
        """Identity used for strict matching: text/score/assertion/code are not compared."""
        return (self.doc_id, self.label, self.start, self.end)


@dataclass
class Document:
    """A text with its gold (or predicted) spans."""

    doc_id: str
    text: str
    spans: list[Span] = field(default_factory=list)


def tsv_safe_text(text: str) -> str:
    """Replace tab, newline and carriage return with a space each.

    Length-preserving on purpose, so offsets and ``len(text)`` still agree with the document.
    """
    return text.translate(_TSV_UNSAFE)


def _read_text(path: Path) -> str:
    # newline="" keeps \r\n as two characters: annotation offsets count them.
    with path.open(encoding="utf-8", newline="") as handle:
        return handle.read()


def _doc_id_from_filename(name: str) -> str:
    """MultiClinNER TSVs use the stem; tolerate a trailing ``.txt``/``.ann`` anyway."""
    name = name.strip()
    for suffix in (".txt", ".ann"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _sort_spans(spans: Iterable[Span]) -> list[Span]:
    return sorted(spans, key=lambda s: (s.doc_id, s.start, s.end, s.label))


# --------------------------------------------------------------------------- BRAT


def _parse_ann_line(ann_path: Path, lineno: int, line: str, doc_id: str, text: str) -> Span:
    """Parse one ``T`` line; raises ValueError naming the file and line on any problem."""
    where = f"{ann_path}:{lineno}"
    parts = line.split("\t")
    if len(parts) < 3:
        raise ValueError(f"{where}: malformed text-bound annotation (expected 3 tab-separated fields)")
    covered = "\t".join(parts[2:])
    type_and_offsets = parts[1].split(" ", 1)
    if len(type_and_offsets) != 2:
        raise ValueError(f"{where}: missing offsets in {parts[1]!r}")
    label, offsets = type_and_offsets
    fragments: list[tuple[int, int]] = []
    try:
        for fragment in offsets.split(";"):
            start_s, end_s = fragment.split()
            fragments.append((int(start_s), int(end_s)))
    except ValueError as exc:
        raise ValueError(f"{where}: bad offsets {offsets!r}") from exc
    for start, end in fragments:
        if not 0 <= start <= end <= len(text):
            raise ValueError(f"{where}: offsets {start}-{end} outside the text (length {len(text)})")
    # BRAT writes the covered text of a discontinuous span as its fragments joined by a space.
    expected = " ".join(text[s:e] for s, e in fragments)
    # Some BRAT exports flatten newlines/tabs in the covered text: accept that too.
    if expected != covered and tsv_safe_text(expected) != tsv_safe_text(covered):
        raise ValueError(f"{where}: covered text {covered!r} does not match the document slice {expected!r}")
    start = min(s for s, _ in fragments)
    end = max(e for _, e in fragments)
    return Span(doc_id=doc_id, label=label, start=start, end=end, text=text[start:end])


def read_brat_folder(path: str | Path, labels: set[str] | None = None) -> list[Document]:
    """Read every ``*.txt`` of a folder (not recursive) with its ``.ann``.

    A missing ``.ann`` means a document without spans; an ``.ann`` without ``.txt`` is an
    error (a broken corpus should fail loudly). Only ``T`` (text-bound) lines are read.
    Discontinuous spans (``start end;start end``) are checked fragment by fragment and then
    kept as their overall extent (first start to last end), because the span TSV and the
    metrics only know contiguous spans; the corpora shipped in shared/data have none.
    ``labels``, when given, keeps only spans of those labels (e.g. to drop MEDICATION).
    Documents are sorted by ``doc_id`` and spans by offset, for determinism.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    txt_stems = {p.stem for p in folder.glob("*.txt")}
    orphans = sorted(p.name for p in folder.glob("*.ann") if p.stem not in txt_stems)
    if orphans:
        raise ValueError(f"{folder}: .ann files without a .txt: {', '.join(orphans[:5])}")
    documents: list[Document] = []
    for txt_path in sorted(folder.glob("*.txt"), key=lambda p: p.stem):
        doc_id = txt_path.stem
        text = _read_text(txt_path)
        spans: list[Span] = []
        ann_path = txt_path.with_suffix(".ann")
        if ann_path.exists():
            # split("\n"), not splitlines(): covered text may hold U+2028 and the like.
            for lineno, line in enumerate(_read_text(ann_path).split("\n"), start=1):
                raw = line.rstrip("\r")
                if not raw.startswith("T"):
                    continue
                span = _parse_ann_line(ann_path, lineno, raw, doc_id, text)
                if labels is None or span.label in labels:
                    spans.append(span)
        documents.append(Document(doc_id=doc_id, text=text, spans=_sort_spans(spans)))
    return documents


# --------------------------------------------------------------------------- span TSV


def _optional(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _read_tsv_rows(path: Path) -> tuple[list[str], list[list[str]]] | None:
    """Return (header, rows), or None when the header lacks the required span columns."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None)
        header = next(reader, None)
        if header is None:
            return None
        header = [h.strip().lstrip("\ufeff") for h in header]
        if not all(col in header for col in REQUIRED_TSV_COLUMNS):
            return None
        return header, [row for row in reader if any(cell.strip() for cell in row)]


def _cell(row: list[str], col: dict[str, int], name: str) -> str | None:
    idx = col.get(name)
    return row[idx] if idx is not None and idx < len(row) else None


def read_span_tsv(path: str | Path) -> list[Span]:
    """Read spans from a TSV with at least ``filename label start_span end_span text``.

    Columns may come in any order and extra columns are ignored, so both the project's own
    format and the MultiClinNER shared-task TSV (which adds e.g. ``ann_id``) are accepted.
    ``score``/``assertion``/``code`` are read when present; empty cells become ``None``.
    """
    tsv_path = Path(path)
    parsed = _read_tsv_rows(tsv_path)
    if parsed is None:
        raise ValueError(f"{tsv_path}: header must contain the columns {', '.join(REQUIRED_TSV_COLUMNS)}")
    header, rows = parsed
    col = {name: header.index(name) for name in header[::-1]}  # first occurrence wins
    spans: list[Span] = []
    for lineno, row in enumerate(rows, start=2):

        def cell(name: str, row: list[str] = row) -> str | None:
            return _cell(row, col, name)

        try:
            start = int(cell("start_span") or "")
            end = int(cell("end_span") or "")
            score_s = _optional(cell("score"))
            score = float(score_s) if score_s is not None else None
        except ValueError as exc:
            raise ValueError(f"{tsv_path}:{lineno}: bad number in row {row!r}") from exc
        if start < 0 or end < start:
            raise ValueError(f"{tsv_path}:{lineno}: invalid offsets {start}-{end}")
        doc_id = _doc_id_from_filename(cell("filename") or "")
        label = (cell("label") or "").strip()
        if not doc_id or not label:
            raise ValueError(f"{tsv_path}:{lineno}: empty filename or label in row {row!r}")
        spans.append(
            Span(
                doc_id=doc_id,
                label=label,
                start=start,
                end=end,
                text=cell("text") or "",
                score=score,
                assertion=_optional(cell("assertion")),
                code=_optional(cell("code")),
            )
        )
    return spans


def write_span_tsv(path: str | Path, spans: Iterable[Span]) -> None:
    """Write spans in the project's span TSV format (header ``SPAN_TSV_COLUMNS``).

    The file is written with ``csv.QUOTE_NONE`` (no quoting, so quotes in text stay literal
    for tools that split on tabs). To keep every span on one line, tabs, newlines and
    carriage returns inside ``text`` (and the other string columns) are replaced by a space
    each; this keeps the length, so ``len(text) == end - start`` still holds. ``None`` is
    written as an empty cell.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(
            handle, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n"
        )
        writer.writerow(SPAN_TSV_COLUMNS)
        for s in spans:
            writer.writerow(
                [
                    tsv_safe_text(s.doc_id),
                    tsv_safe_text(s.label),
                    s.start,
                    s.end,
                    tsv_safe_text(s.text),
                    "" if s.score is None else repr(float(s.score)),
                    "" if s.assertion is None else tsv_safe_text(s.assertion),
                    "" if s.code is None else tsv_safe_text(s.code),
                ]
            )


# --------------------------------------------------------------------------- MultiClinNER layout


def read_multiclinner_folder(path: str | Path, labels: set[str] | None = None) -> list[Document]:
    """Read a MultiClinNER/BSC-style release: span TSV file(s) plus ``.txt`` texts.

    BSC distributes ``tsv/*.tsv`` annotations and ``txt/*.txt`` texts (often also ``brat/``);
    here any ``.txt`` and ``.tsv`` below ``path`` (any depth) are used and joined by file
    stem. TSVs whose header lacks the span columns are skipped (they are not annotations);
    at least one span TSV is required. Identical spans repeated across TSVs (e.g. per-label
    files next to a combined one) are kept once. Every span must fall inside its text and
    its ``text`` must equal the document slice (after the TSV's tab/newline replacement).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    texts: dict[str, str] = {}
    for txt_path in sorted(folder.rglob("*.txt")):
        text = _read_text(txt_path)
        previous = texts.setdefault(txt_path.stem, text)
        if previous != text:
            raise ValueError(f"{txt_path}: another .txt with stem {txt_path.stem!r} has different text")
    span_files = [p for p in sorted(folder.rglob("*.tsv")) if _read_tsv_rows(p) is not None]
    if not span_files:
        raise ValueError(f"{folder}: no TSV with columns {', '.join(REQUIRED_TSV_COLUMNS)} found")
    by_doc: dict[str, dict[tuple[str, str, int, int], Span]] = {stem: {} for stem in texts}
    for tsv_path in span_files:
        for span in read_span_tsv(tsv_path):
            if span.doc_id not in texts:
                raise ValueError(f"{tsv_path}: span for {span.doc_id!r} but no {span.doc_id}.txt found")
            text = texts[span.doc_id]
            if span.end > len(text):
                raise ValueError(f"{tsv_path}: span {span.key} outside the text (length {len(text)})")
            expected = text[span.start : span.end]
            if tsv_safe_text(expected) != tsv_safe_text(span.text):
                raise ValueError(
                    f"{tsv_path}: span {span.key} text {span.text!r} does not match the document "
                    f"slice {expected!r}"
                )
            if labels is None or span.label in labels:
                # Keep the exact document slice, so Span.text always equals text[start:end].
                by_doc[span.doc_id].setdefault(
                    span.key,
                    Span(
                        doc_id=span.doc_id,
                        label=span.label,
                        start=span.start,
                        end=span.end,
                        text=expected,
                        score=span.score,
                        assertion=span.assertion,
                        code=span.code,
                    ),
                )
    return [
        Document(doc_id=doc_id, text=texts[doc_id], spans=_sort_spans(by_doc[doc_id].values()))
        for doc_id in sorted(texts)
    ]


def load_documents(path: str | Path, labels: set[str] | None = None) -> list[Document]:
    """Load a corpus folder whatever its layout.

    BRAT when ``.ann`` files sit directly in ``path``; otherwise the MultiClinNER layout
    (span TSV(s) + ``.txt`` at any depth). Raises ValueError when neither is found.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (a corpus is a folder of texts and annotations)")
    if any(folder.glob("*.ann")):
        return read_brat_folder(folder, labels=labels)
    if any(folder.rglob("*.tsv")):
        return read_multiclinner_folder(folder, labels=labels)
    raise ValueError(f"{folder}: found neither BRAT .ann files nor span .tsv files")


# --------------------------------------------------------------------------- splitting


def _name_fraction(doc_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_name(
    docs: Sequence[Document], val_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split into (train, val) by a hash of each ``doc_id``.

    Each document's side depends only on its name and ``seed`` (not on the other files or on
    their order), so adding files never moves existing ones, and the split is the same on
    every machine (sha256, not Python's salted ``hash``). The validation share is therefore
    ``val_fraction`` in expectation, not exactly. Input order is kept within each side.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be within [0, 1], got {val_fraction}")
    train: list[Document] = []
    val: list[Document] = []
    for doc in docs:
        (val if _name_fraction(doc.doc_id, seed) < val_fraction else train).append(doc)
    return train, val
