"""Score NER predictions against gold spans: strict match and MultiClinNER character overlap.

Two families of scores, overall and per label:

* **strict** - a prediction is a true positive only if (doc, label, start, end) equals a gold
  span; matching is one-to-one, so a duplicated prediction counts once as TP and then as FP.
  Overall strict scores are micro-averaged (TP/FP/FN summed over labels).
* **overlap** (MultiClinNER) - spans are compared by characters. For gold ``a`` and predicted
  ``b`` of the same document and label: ``overlap = |a ∩ b|``, ``p = overlap / len(b)``,
  ``r = overlap / len(a)``, ``f = 2pr / (p + r)`` (0 when they do not overlap). Recall is the
  mean, over gold spans, of each one's best ``f`` against any prediction; precision is the
  mean, over predictions, of each one's best ``f`` against any gold span; F1 is their
  harmonic mean. Overall overlap scores are micro: means over *all* gold / predicted spans
  of every label. Spans of different labels never match, even when they overlap.

Empty cases never raise: a mean over no spans is 0.0 and F1 is 0.0 when P + R == 0, so
"no gold and no predictions" reads as all zeros with ``n_gold == n_pred == 0``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.nlp.corpus import Span, load_documents, read_span_tsv

__all__ = [
    "EvaluationReport",
    "LabelScores",
    "char_overlap_f1",
    "evaluate",
    "evaluate_paths",
    "format_report",
    "report_to_json",
]

OVERALL = "ALL"


@dataclass
class LabelScores:
    """Scores and counts for one label (or ``ALL`` for the overall micro scores)."""

    label: str
    strict_precision: float
    strict_recall: float
    strict_f1: float
    overlap_precision: float
    overlap_recall: float
    overlap_f1: float
    tp: int
    fp: int
    fn: int
    n_gold: int
    n_pred: int


@dataclass
class EvaluationReport:
    """Result of :func:`evaluate`; ``warnings`` carries notes such as unknown pred documents."""

    overall: LabelScores
    per_label: dict[str, LabelScores]
    unknown_pred_docs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def _f1(p: float, r: float) -> float:
    return _safe_div(2 * p * r, p + r)


def char_overlap_f1(gold: Span, pred: Span) -> float:
    """Character-overlap F1 of two spans (document and label are *not* checked here).

    Zero-length spans have no characters: they score 1.0 only against an identical
    zero-length span, otherwise 0.0 (avoids dividing by a zero length).
    """
    overlap = min(gold.end, pred.end) - max(gold.start, pred.start)
    if overlap <= 0:
        return 1.0 if (gold.start, gold.end) == (pred.start, pred.end) else 0.0
    p = overlap / (pred.end - pred.start)
    r = overlap / (gold.end - gold.start)
    return _f1(p, r)


def _best_overlaps(spans: Sequence[Span], others: Sequence[Span]) -> list[float]:
    """For each span, its best overlap F1 against ``others`` (same doc and label group)."""
    # Sort by start so each span only scans the others that can still overlap it.
    ordered = sorted(others, key=lambda s: s.start)
    best_scores: list[float] = []
    for span in spans:
        best = 0.0
        for other in ordered:
            if other.start > span.end:
                break
            if other.end < span.start:
                continue
            best = max(best, char_overlap_f1(span, other))
            if best == 1.0:
                break
        best_scores.append(best)
    return best_scores


@dataclass
class _Tally:
    tp: int = 0
    n_gold: int = 0
    n_pred: int = 0
    gold_overlap_sum: float = 0.0
    pred_overlap_sum: float = 0.0

    def add(self, other: _Tally) -> None:
        self.tp += other.tp
        self.n_gold += other.n_gold
        self.n_pred += other.n_pred
        self.gold_overlap_sum += other.gold_overlap_sum
        self.pred_overlap_sum += other.pred_overlap_sum

    def scores(self, label: str) -> LabelScores:
        sp = _safe_div(self.tp, self.n_pred)
        sr = _safe_div(self.tp, self.n_gold)
        op = _safe_div(self.pred_overlap_sum, self.n_pred)
        orec = _safe_div(self.gold_overlap_sum, self.n_gold)
        return LabelScores(
            label=label,
            strict_precision=sp,
            strict_recall=sr,
            strict_f1=_f1(sp, sr),
            overlap_precision=op,
            overlap_recall=orec,
            overlap_f1=_f1(op, orec),
            tp=self.tp,
            fp=self.n_pred - self.tp,
            fn=self.n_gold - self.tp,
            n_gold=self.n_gold,
            n_pred=self.n_pred,
        )


def _group(spans: Iterable[Span]) -> dict[tuple[str, str], list[Span]]:
    groups: dict[tuple[str, str], list[Span]] = defaultdict(list)
    for span in spans:
        groups[(span.doc_id, span.label)].append(span)
    return groups


def evaluate(
    gold: Sequence[Span], pred: Sequence[Span], labels: Sequence[str] | None = None
) -> EvaluationReport:
    """Score ``pred`` against ``gold`` (see the module docstring for the definitions).

    ``labels`` restricts scoring to those labels (spans of other labels are ignored) and
    fixes the rows of ``per_label`` (a label with no spans gets a row of zeros); by default
    the sorted union of gold and predicted labels is used.
    """
    label_list = sorted({s.label for s in gold} | {s.label for s in pred}) if labels is None else list(labels)
    wanted = set(label_list)
    gold_groups = _group(s for s in gold if s.label in wanted)
    pred_groups = _group(s for s in pred if s.label in wanted)

    tallies: dict[str, _Tally] = {label: _Tally() for label in label_list}
    for key in gold_groups.keys() | pred_groups.keys():
        g = gold_groups.get(key, [])
        p = pred_groups.get(key, [])
        tally = tallies[key[1]]
        gold_counts = Counter(s.key for s in g)
        pred_counts = Counter(s.key for s in p)
        tally.tp += sum(min(n, pred_counts[k]) for k, n in gold_counts.items())
        tally.n_gold += len(g)
        tally.n_pred += len(p)
        tally.gold_overlap_sum += sum(_best_overlaps(g, p))
        tally.pred_overlap_sum += sum(_best_overlaps(p, g))

    total = _Tally()
    for tally in tallies.values():
        total.add(tally)
    return EvaluationReport(
        overall=total.scores(OVERALL),
        per_label={label: tallies[label].scores(label) for label in label_list},
    )


SCORE_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.025 * i, 3) for i in range(17))  # 0.5 ... 0.9


def calibrate_min_score(
    gold: Sequence[Span],
    scored: Sequence[Span],
    labels: Sequence[str] | None = None,
    candidates: Sequence[float] = SCORE_THRESHOLDS,
) -> tuple[float, EvaluationReport]:
    """The span-score threshold that maximises overlap F1 + strict F1 (ties: the lowest), and its report.

    ``scored`` are predictions made without a threshold (every span with its score); 0 is always a candidate,
    so calibration never makes the scores worse on these notes.
    """
    best: tuple[float, float, EvaluationReport] | None = None
    for threshold in sorted({0.0, *candidates}):
        report = evaluate(gold, [s for s in scored if (s.score or 0.0) >= threshold], labels)
        value = report.overall.overlap_f1 + report.overall.strict_f1
        if best is None or value > best[1] + 1e-12:
            best = (threshold, value, report)
    assert best is not None
    return best[0], best[2]


def report_to_json(report: EvaluationReport) -> dict[str, Any]:
    """Plain-dict form of a report (JSON-serialisable), for logs and result files."""
    return {
        "overall": asdict(report.overall),
        "per_label": {label: asdict(s) for label, s in report.per_label.items()},
        "unknown_pred_docs": list(report.unknown_pred_docs),
        "warnings": list(report.warnings),
    }


def format_report(report: EvaluationReport) -> str:
    """Fixed-width table (one row per label plus ``ALL``) and any warnings, for humans."""
    rows = [*report.per_label.values(), report.overall]
    width = max([len("label"), *(len(r.label) for r in rows)])
    header = (
        f"{'label':<{width}}  {'strict P':>8} {'strict R':>8} {'strict F1':>9}  "
        f"{'ovl P':>6} {'ovl R':>6} {'ovl F1':>6}  {'n_gold':>7} {'n_pred':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r is report.overall and report.per_label:
            lines.append("-" * len(header))
        lines.append(
            f"{r.label:<{width}}  {r.strict_precision:>8.4f} {r.strict_recall:>8.4f} {r.strict_f1:>9.4f}  "
            f"{r.overlap_precision:>6.4f} {r.overlap_recall:>6.4f} {r.overlap_f1:>6.4f}  "
            f"{r.n_gold:>7} {r.n_pred:>7}"
        )
    lines.extend(f"warning: {w}" for w in report.warnings)
    return "\n".join(lines)


def _load_spans(path: Path) -> tuple[list[Span], set[str] | None]:
    """Spans of a corpus folder or span TSV, plus the folder's document ids (None for a TSV)."""
    if path.is_dir():
        docs = load_documents(path)
        return [s for d in docs for s in d.spans], {d.doc_id for d in docs}
    return read_span_tsv(path), None


def evaluate_paths(
    gold_path: str | Path, pred_path: str | Path, labels: Sequence[str] | None = None
) -> EvaluationReport:
    """Evaluate a prediction TSV (or corpus folder) against a gold corpus folder or span TSV.

    Gold folder: its texts define the scored documents; predicted spans for documents not
    in it are dropped and listed in ``unknown_pred_docs`` with a warning. Gold TSV: it only
    lists documents that have spans, so every prediction is scored and predictions for
    documents absent from the gold TSV count as false positives (also listed, with a warning).
    """
    gold, gold_docs = _load_spans(Path(gold_path))
    pred, _ = _load_spans(Path(pred_path))
    known = gold_docs if gold_docs is not None else {s.doc_id for s in gold}
    unknown = sorted({s.doc_id for s in pred} - known)
    warnings: list[str] = []
    if unknown and gold_docs is not None:
        pred = [s for s in pred if s.doc_id in gold_docs]
        warnings.append(f"{len(unknown)} predicted document(s) not in the gold folder were not scored")
    elif unknown:
        warnings.append(
            f"{len(unknown)} predicted document(s) have no gold spans in the gold TSV; "
            "their spans count as false positives"
        )
    report = evaluate(gold, pred, labels=labels)
    report.unknown_pred_docs = unknown
    report.warnings = warnings
    return report
