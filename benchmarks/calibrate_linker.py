"""Choose the linker's per-label thresholds on CodiEsp dev, through the production coding path.

    .venv/bin/python benchmarks/calibrate_linker.py [--data ../shared/data/es/codiesp] [--precision 0.9] \
        [--gold-out /tmp/codiesp-dev-gold.tsv] [--queries distilled|full] [--write]

Gold (CodiEsp dev, never test): DIAGNOSTICO mentions are DISEASE (ICD-10-CM), those of them coded in chapter R
are also SYMPTOM (the default profile codes symptoms in chapter R only), PROCEDIMIENTO mentions are PROCEDURE
(ICD-10-PCS). Every mention is coded as the worker codes a Spanish note's mention (``worker.coding.code_mentions``
with the default profile and the shipped linker). Per label, the threshold is the lowest top-1 score at which the
codes written (top-1 score >= threshold) are right at least ``--precision`` of the time. A two-fold check (chosen
on half of the documents, scored on the other half) shows how much that choice flatters the figures.

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


def main() -> int:
    from worker.linker import LINKER_DIR, QUERY_ENCODERS, threshold_keys, thresholds

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es" / "codiesp")
    parser.add_argument("--precision", type=float, default=0.9)
    parser.add_argument("--gold-out", type=Path, default=None)
    parser.add_argument("--queries", choices=QUERY_ENCODERS, default="distilled")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from mappings.profile import load_profile
    from worker.coding import code_mentions, same_code
    from worker.terminology import terminology_for

    rows = gold_rows(args.data)
    if args.gold_out:
        with args.gold_out.open("w", encoding="utf-8") as handle:
            handle.write("mention\tlabel\tcode\tlanguage\n")
            for row in rows:
                handle.write(f"{row['mention']}\t{row['label']}\t{row['code']}\t{row['language']}\n")
    profile = load_profile()
    service = terminology_for(profile, "auto", queries=args.queries)
    assert service is not None
    report: dict[str, dict[str, object]] = {}
    chosen: dict[str, dict[str, float]] = {}
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
        threshold = choose(points, args.precision)
        chosen.setdefault(system, {})[label] = threshold
        # Two-fold: documents split by a hash of their name.
        folds = [[p for p, d in zip(points, by_doc, strict=True) if hash_doc(d) == k] for k in (0, 1)]
        heldout = []
        for k in (0, 1):
            t = choose(folds[k], args.precision)
            heldout.append({"threshold": t, **measure(folds[1 - k], t, len(folds[1 - k]))})
        report[label] = {
            "n": len(items),
            "top1": round(top1 / len(items), 4),
            "top5": round(top5 / len(items), 4),
            "threshold": threshold,
            **measure(points, threshold, len(items)),
            "two_fold": heldout,
        }
        print(label, json.dumps(report[label]), file=sys.stderr)
    if args.write:
        path = LINKER_DIR / "thresholds.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        scores_key, report_key = threshold_keys(args.queries)
        data[scores_key] = chosen
        data["chosen_on"] = (
            "CodiEsp dev (benchmarks/calibrate_linker.py), written codes right >= "
            f"{args.precision:.0%} of the time; min_score for the distilled query encoder, min_score_full for the "
            "full one"
        )
        data[report_key] = report
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        thresholds.cache_clear()
    print(json.dumps(report, indent=2))
    return 0


def hash_doc(name: str) -> int:
    import hashlib

    return hashlib.sha256(name.encode()).digest()[0] % 2


if __name__ == "__main__":
    sys.exit(main())
