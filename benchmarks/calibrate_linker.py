"""Choose the linker's per-label thresholds on CodiEsp dev, through the production coding path.

    .venv/bin/python benchmarks/calibrate_linker.py [--data ../shared/data/es/codiesp] [--precision 0.9] \
        [--gold-out /tmp/codiesp-dev-gold.tsv] [--queries distilled|full] [--write]

Gold (CodiEsp dev, never test): DIAGNOSTICO mentions are DISEASE (ICD-10-CM), those of them coded in chapter R
are also SYMPTOM (the default profile codes symptoms in chapter R only), PROCEDIMIENTO mentions are PROCEDURE
(ICD-10-PCS). Every mention is coded as the worker codes a Spanish note's mention (``worker.coding.code_mentions``
with the default profile and the shipped linker). Per label, the threshold is the lowest top-1 score at which the
codes written (top-1 score >= threshold) are right at least ``--precision`` of the time. A two-fold check (chosen
on half of the documents, scored on the other half) shows how much that choice flatters the figures.

**The tagger's own mentions too** (``--tagged``, the default). CodiEsp's coded mentions are the mentions an expert
coded: every one of them has a right code. A worker codes what its tagger finds, and the tagger also finds
findings nobody would code ("crepitantes en base", "consolidación en el lóbulo inferior") and cuts spans short,
and those codes land in the record too. So the shipped tagger also reads the dev notes (float32, so that every CPU
gets the same mentions), each of its mentions is coded the same way, and its top-1 code counts as right when it is
the code of a coded mention its span overlaps, or, where it overlaps none, one of the document's codes (CodiEsp-D
and -P list every code of a document): a code an expert put on that note. That truth has its own errors: the codes
of exact text matches (score 1.0) count right only 80-88% of the time (CodiEsp coded with an older ICD-10-CM, whose
E87.2 and G35 are 2026's categories E87.20 and G35.x; coders differ on F17.200 and F17.210), so the second threshold
is the lowest at which the written codes are right at least ``--precision`` times as often as exact matches are.
Each label keeps the higher of the two thresholds.

``--write`` stores the thresholds in ``worker/linker/thresholds.json``, for the query encoder ``--queries`` (the
distilled one, the default: ``min_score`` and ``report``; the full one: ``min_score_full`` and ``report_full``);
``--gold-out`` writes the gold TSV that ``fhir-ner evaluate-codes --gold`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)

LABELS = {"DISEASE": "icd-10-cm", "SYMPTOM": "icd-10-cm", "PROCEDURE": "icd-10-pcs"}
# The kind of CodiEsp mention (and document code) that each label is judged by.
CODIESP_KIND = {"DISEASE": "DIAGNOSTICO", "SYMPTOM": "DIAGNOSTICO", "PROCEDURE": "PROCEDIMIENTO"}


def gold_rows(data: Path) -> list[dict[str, str]]:
    path = data / "dev" / "devX.tsv"
    if not path.is_file():
        sys.exit(f"CodiEsp dev not found at {path}: put the CodiEsp gold standard there or pass --data DIR")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        doc, kind, code, mention = line.split("\t")[:4]
        mention, code = " ".join(mention.split()), code.upper()
        if kind == "DIAGNOSTICO":
            rows.append({"document": doc, "mention": mention, "label": "DISEASE", "code": code, "language": "es"})
            if code.startswith("R"):
                rows.append({"document": doc, "mention": mention, "label": "SYMPTOM", "code": code, "language": "es"})
        else:
            rows.append({"document": doc, "mention": mention, "label": "PROCEDURE", "code": code, "language": "es"})
    return rows


def gold_spans(data: Path) -> dict[str, list[tuple[int, int, str, str]]]:
    """Per dev document, its coded mentions' character spans: (start, end, ``DIAGNOSTICO|PROCEDIMIENTO``, code)
    (a discontinuous mention gives one span per piece)."""
    found: dict[str, list[tuple[int, int, str, str]]] = {}
    for line in (data / "dev" / "devX.tsv").read_text(encoding="utf-8").splitlines():
        doc, kind, code, _, positions = line.split("\t")[:5]
        for piece in positions.split(";"):
            start, end = piece.split()
            found.setdefault(doc, []).append((int(start), int(end), kind, code.upper()))
    return found


def document_codes(data: Path) -> dict[tuple[str, str], set[str]]:
    """Every code of each dev document, by (document, ``DIAGNOSTICO|PROCEDIMIENTO``): CodiEsp-D and CodiEsp-P."""
    found: dict[tuple[str, str], set[str]] = {}
    for name, kind in (("devD.tsv", "DIAGNOSTICO"), ("devP.tsv", "PROCEDIMIENTO")):
        for line in (data / "dev" / name).read_text(encoding="utf-8").splitlines():
            doc, code = line.split("\t")[:2]
            found.setdefault((doc, kind), set()).add(code.strip().upper())
    return found


def tagged_truth(
    label: str,
    start: int,
    end: int,
    spans: list[tuple[int, int, str, str]],
    codes: set[str],
) -> tuple[set[str], bool]:
    """The codes a tagged mention's top-1 code may be to count as right, and whether they come from a coded mention
    its span overlaps (else: the document's codes of the label's kind)."""
    kind = CODIESP_KIND[label]
    overlapping = {code for s, e, k, code in spans if k == kind and s < end and start < e}
    return (overlapping, True) if overlapping else (codes, False)


def tagged_points(
    data: Path, profile: object, service: object, threads: int
) -> tuple[dict[str, list[tuple[float, bool]]], dict[str, list[str]], dict[str, dict[str, float]]]:
    """Per label, (top-1 score, right) of every mention the shipped tagger finds in the dev notes, their documents,
    and counts (mentions, share overlapping a coded mention, share with a candidate)."""
    from worker.coding import code_mentions, same_code
    from worker.predict import load_pipeline

    files = sorted((data / "dev" / "text_files").glob("*.txt"))
    pipeline = load_pipeline(None, 8, threads, "fp32")
    spans, codes = gold_spans(data), document_codes(data)
    found: list[tuple[str, str, int, int, str]] = []  # document, label, start, end, text
    for file in files:
        text = file.read_text(encoding="utf-8")
        (predicted,) = pipeline.predict([text])
        found += [(file.stem, p.label, p.start, p.end, " ".join(text[p.start : p.end].split())) for p in predicted]
    points: dict[str, list[tuple[float, bool]]] = {}
    documents: dict[str, list[str]] = {}
    counts: dict[str, dict[str, float]] = {}
    for label in LABELS:
        mine = [f for f in found if f[1] == label]
        coded = {r.mention: r for r in code_mentions(sorted({f[4] for f in mine}), label, "es", 1, profile, service)}
        overlapping = answered = 0
        for doc, _, start, end, text in mine:
            note_codes = codes.get((doc, CODIESP_KIND[label]), set())
            truth, overlaps = tagged_truth(label, start, end, spans.get(doc, []), note_codes)
            overlapping += overlaps
            ranked = coded[text].candidates
            answered += bool(ranked)
            ok = bool(ranked) and any(same_code(gold, ranked[0][1]) for gold in truth)
            points.setdefault(label, []).append((ranked[0][3] if ranked else 0.0, ok))
            documents.setdefault(label, []).append(doc)
        counts[label] = {
            "mentions": len(mine),
            "overlapping_a_coded_mention": round(overlapping / len(mine), 4) if mine else 0.0,
            "with_a_candidate": round(answered / len(mine), 4) if mine else 0.0,
        }
    return points, documents, counts


def exact_match_precision(points: list[tuple[float, bool]]) -> float:
    """The share right among the codes of exact text matches (score 1.0): the document truth's own ceiling (1.0
    when there are none)."""
    exact = [ok for score, ok in points if score >= 1.0]
    return sum(exact) / len(exact) if exact else 1.0


def two_fold(
    points: list[tuple[float, bool]], by_doc: list[str], precision: float, relative: bool = False
) -> list[dict[str, float]]:
    """Chosen on half of the documents (split by a hash of their name), scored on the other half; ``relative``: the
    target is ``precision`` times that half's :func:`exact_match_precision`."""
    folds = [[p for p, d in zip(points, by_doc, strict=True) if hash_doc(d) == k] for k in (0, 1)]
    heldout = []
    for k in (0, 1):
        t = choose(folds[k], precision * (exact_match_precision(folds[k]) if relative else 1.0))
        heldout.append({"threshold": t, **measure(folds[1 - k], t, len(folds[1 - k]))})
    return heldout


def choose(points: list[tuple[float, bool]], precision: float) -> float:
    """Lowest score threshold whose written codes (score >= threshold) reach ``precision``; 1.01 if none."""
    ranked = sorted(points, key=lambda p: -p[0])
    best, right = 1.01, 0
    for count, (score, ok) in enumerate(ranked, start=1):
        right += ok
        is_last_of_score = count == len(ranked) or ranked[count][0] < score
        if is_last_of_score and right / count >= precision:
            best = score
    return best


def measure(points: list[tuple[float, bool]], threshold: float, n: int) -> dict[str, float]:
    written = [ok for score, ok in points if score >= threshold]
    return {
        "coverage": round(len(written) / n, 4) if n else 0.0,
        "precision": round(sum(written) / len(written), 4) if written else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    from worker.linker import LINKER_DIR, QUERY_ENCODERS, threshold_keys, thresholds

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es" / "codiesp")
    parser.add_argument("--precision", type=float, default=0.9)
    parser.add_argument("--gold-out", type=Path, default=None)
    parser.add_argument("--queries", choices=QUERY_ENCODERS, default="distilled")
    parser.add_argument("--write", action="store_true")
    parser.add_argument(
        "--tagged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also calibrate on the shipped tagger's mentions of the dev notes and keep the higher threshold",
    )
    parser.add_argument("--threads", type=int, default=2, help="the tagger's CPU threads (--tagged)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="a mapping profile YAML instead of the built-in default (its codes); not with --write",
    )
    args = parser.parse_args(argv)
    if args.profile is not None and args.write:
        # thresholds.json is what every profile without min_score uses: only the default profile may choose it.
        parser.error("--write stores the built-in profile's thresholds; with --profile, put min_score in the profile")

    from mappings.profile import load_profile
    from worker.coding import code_mentions, same_code
    from worker.terminology import terminology_for

    rows = gold_rows(args.data)
    if args.gold_out:
        with args.gold_out.open("w", encoding="utf-8") as handle:
            handle.write("mention\tlabel\tcode\tlanguage\n")
            for row in rows:
                handle.write(f"{row['mention']}\t{row['label']}\t{row['code']}\t{row['language']}\n")
    profile = load_profile(args.profile)
    service = terminology_for(profile, "auto", queries=args.queries)
    assert service is not None
    report: dict[str, dict[str, object]] = {}
    chosen: dict[str, dict[str, float]] = {}
    gold_points: dict[str, list[tuple[float, bool]]] = {}
    for label, system in LABELS.items():
        items = [row for row in rows if row["label"] == label]
        mentions = sorted({row["mention"] for row in items})
        coded = {r.mention: r for r in code_mentions(mentions, label, "es", 5, profile, service)}
        points, by_doc = [], []
        top1 = top5 = 0
        for row in items:
            ranked = coded[row["mention"]].candidates
            ok = bool(ranked) and same_code(row["code"], ranked[0][1])
            top1 += ok
            top5 += any(same_code(row["code"], c[1]) for c in ranked[:5])
            score = ranked[0][3] if ranked else 0.0
            points.append((score, ok))
            by_doc.append(row["document"])
        gold_points[label] = points
        threshold = choose(points, args.precision)
        chosen.setdefault(system, {})[label] = threshold
        heldout = two_fold(points, by_doc, args.precision)
        report[label] = {
            "n": len(items),
            "top1": round(top1 / len(items), 4),
            "top5": round(top5 / len(items), 4),
            "threshold": threshold,
            **measure(points, threshold, len(items)),
            "two_fold": heldout,
        }
        print(label, json.dumps(report[label]), file=sys.stderr)
    tagged_report: dict[str, dict[str, object]] = {}
    if args.tagged:
        points_by_label, docs_by_label, counts = tagged_points(args.data, profile, service, args.threads)
        for label, system in LABELS.items():
            points = points_by_label.get(label, [])
            ceiling = exact_match_precision(points)
            own = choose(points, args.precision * ceiling)
            kept = max(chosen[system][label], own)
            chosen[system][label] = kept
            tagged_report[label] = {
                **counts[label],
                "top1_right": round(sum(ok for _, ok in points) / len(points), 4) if points else 0.0,
                "exact_match_precision": round(ceiling, 4),
                "target_precision": round(args.precision * ceiling, 4),
                "threshold": own,
                **measure(points, own, len(points)),
                "two_fold": two_fold(points, docs_by_label.get(label, []), args.precision, relative=True),
                "at_kept_threshold": {"threshold": kept, **measure(points, kept, len(points))},
            }
            report[label]["threshold_coded_mentions"] = report[label]["threshold"]
            report[label]["threshold"] = kept
            report[label].update(measure(gold_points[label], kept, int(report[label]["n"])))  # type: ignore[arg-type]
            print(label, "tagged", json.dumps(tagged_report[label]), file=sys.stderr)
    if args.write:
        path = LINKER_DIR / "thresholds.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        scores_key, report_key = threshold_keys(args.queries)
        data[scores_key] = chosen
        data["chosen_on"] = (
            "CodiEsp dev (benchmarks/calibrate_linker.py), written codes right >= "
            f"{args.precision:.0%} of the time, on its coded mentions and (report_tagged) on the shipped tagger's "
            "mentions of its notes, the higher of the two thresholds kept; min_score for the distilled query "
            "encoder, min_score_full for the full one"
        )
        data[report_key] = report
        if args.tagged:
            data[f"{report_key}_tagged"] = tagged_report
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        thresholds.cache_clear()
    print(json.dumps({"coded_mentions": report, "tagged_mentions": tagged_report}, indent=2))
    return 0


def hash_doc(name: str) -> int:
    import hashlib

    return hashlib.sha256(name.encode()).digest()[0] % 2


if __name__ == "__main__":
    sys.exit(main())
