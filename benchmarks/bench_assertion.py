"""Cost of assertion detection per note, to compare with tagging (roughly 0.5-2 s per note on this CPU).

Short notes are SpaCCC case reports (~2,000 characters), long ones CardioCCC (~7,000 characters); the
mentions are the gold spans of their ``.ann`` files. Each note is classified with the language given
("es", as a DocumentReference would say) and without it (the detector guesses the language first).

    .venv/bin/python benchmarks/bench_assertion.py --notes 200 --repeat 3

Optionally, agreement with medspaCy's ConText (its default English rules) on the hand-written English
test sentences. medspaCy pulls in spaCy, so it lives in its own virtualenv, not the project's:

    python3.11 -m venv /tmp/medspacy-venv && /tmp/medspacy-venv/bin/pip install medspacy==1.3.1
    .venv/bin/python benchmarks/bench_assertion.py --medspacy /tmp/medspacy-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "es"
sys.path.insert(0, str(REPO))

from worker.nlp.assertion import PRIORITY, AssertionDetector  # noqa: E402
from worker.nlp.corpus import Document, read_brat_folder  # noqa: E402


def time_notes(detector: AssertionDetector, docs: list[Document], language: str | None, repeat: int
               ) -> tuple[list[float], Counter[str]]:
    """Best-of-``repeat`` milliseconds per note (the CPU is shared, so the minimum is the fairest)."""
    per_note: list[float] = []
    counts: Counter[str] = Counter()
    for doc in docs:
        spans = [(s.start, s.end) for s in doc.spans]
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            result = detector.detect(doc.text, spans, language)
            best = min(best, time.perf_counter() - started)
        per_note.append(best * 1000)
        counts.update(result)
    return per_note, counts


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean_ms": round(statistics.fmean(ordered), 3),
        "median_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
        "max_ms": round(ordered[-1], 3),
    }


MEDSPACY_SCRIPT = r"""
import json, sys
import medspacy
cases = json.load(sys.stdin)
out = {}
for config, enable in (("context", ["medspacy_pyrush", "medspacy_context"]),
                       ("context+sections", ["medspacy_pyrush", "medspacy_context", "medspacy_sectionizer"])):
    nlp = medspacy.load(medspacy_enable=enable)
    rows = []
    for text, spans in cases:
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(a, b, label="MENTION", alignment_mode="expand") for a, b in spans]
        for _, component in nlp.pipeline:
            doc = component(doc)
        rows.append([{"negated": e._.is_negated, "family": e._.is_family, "hypothetical": e._.is_hypothetical,
                      "possible": e._.is_uncertain, "historical": e._.is_historical} for e in doc.ents])
    out[config] = rows
json.dump(out, sys.stdout)
"""


def compare_medspacy(python: str, detector: AssertionDetector) -> dict[str, object]:
    """Run medspaCy in its own interpreter on the English test sentences; same priority to pick one value."""
    import yaml

    sys.path.insert(0, str(REPO / "tests" / "worker" / "nlp"))
    from test_assertion import parse_marked

    report: dict[str, object] = {}
    for name in ("en", "en_heldout"):
        path = REPO / "tests" / "worker" / "nlp" / "assertion_cases" / f"{name}.yaml"
        cases = [parse_marked(m) for m in yaml.safe_load(path.read_text(encoding="utf-8"))["cases"]]
        env = {**os.environ, "LOGURU_LEVEL": "WARNING"}
        run = subprocess.run([python, "-c", MEDSPACY_SCRIPT], input=json.dumps([[t, s] for t, s, _ in cases]),
                             capture_output=True, text=True, env=env, check=True)
        report[name] = _agreement(cases, json.loads(run.stdout), detector)
    return report


def _agreement(cases: list[tuple[str, list[tuple[int, int]], list[str]]],
               theirs: dict[str, list[list[dict[str, bool]]]],
               detector: AssertionDetector) -> dict[str, object]:
    report: dict[str, object] = {"mentions": sum(len(s) for _, s, _ in cases)}
    for config, rows in theirs.items():
        agree = gold_ours = gold_theirs = total = 0
        differences = []
        for (text, spans, gold), flags in zip(cases, rows, strict=True):
            ours = detector.detect(text, spans, "en")
            for (start, end), expected, mine, flag in zip(spans, gold, ours, flags, strict=True):
                other = next((c for c in PRIORITY if flag[c]), "present")
                total += 1
                agree += mine == other
                gold_ours += mine == expected
                gold_theirs += other == expected
                if mine != other:
                    differences.append(f"{text[start:end]!r}: expected {expected}, ours {mine}, medspaCy {other}")
        report[config] = {
            "agreement": round(agree / total, 3),
            "ours_correct": round(gold_ours / total, 3),
            "medspacy_correct": round(gold_theirs / total, 3),
            "differences": differences,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notes", type=int, default=200, help="notes per corpus (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="timings per note; the best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--medspacy", metavar="PYTHON", help="an interpreter with medspacy installed: compare")
    args = parser.parse_args()

    started = time.perf_counter()
    detector = AssertionDetector.from_rules_dir()
    load_ms = (time.perf_counter() - started) * 1000

    report: dict[str, object] = {"load_all_rules_ms": round(load_ms, 1), "corpora": {}}
    for name in ("spaccc-train", "cardioccc-train"):
        folder = DATA / name
        if not folder.is_dir():
            sys.exit(f"corpus not found: {folder}")
        docs = read_brat_folder(folder)[: args.notes]
        detector.detect(docs[0].text, [(s.start, s.end) for s in docs[0].spans], "es")  # warm-up
        given, counts = time_notes(detector, docs, "es", args.repeat)
        guessed, _ = time_notes(detector, docs, None, args.repeat)
        languages = Counter(detector.detect_language(d.text) for d in docs)
        chars = statistics.fmean(len(d.text) for d in docs)
        spans = statistics.fmean(len(d.spans) for d in docs)
        report["corpora"][name] = {  # type: ignore[index]
            "notes": len(docs),
            "mean_chars": round(chars),
            "mean_spans": round(spans, 1),
            "language_given": summary(given),
            "language_detected": summary(guessed),
            "detected_languages": dict(languages),
            "chars_per_ms": round(chars / statistics.fmean(given)),
            "assertions": dict(counts.most_common()),
        }
    if args.medspacy:
        report["medspacy"] = compare_medspacy(args.medspacy, detector)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    print(f"rules for {len(detector.languages)} languages loaded and compiled in {load_ms:.0f} ms")
    for name, row in report["corpora"].items():  # type: ignore[attr-defined]
        print(f"\n{name}: {row['notes']} notes, {row['mean_chars']} chars and {row['mean_spans']} spans on average")
        for key in ("language_given", "language_detected"):
            cells = "  ".join(f"{k}={v}" for k, v in row[key].items())
            print(f"  {key:<18} {cells}")
        print(f"  detected languages {row['detected_languages']}")
        print(f"  assertions         {row['assertions']}")
    if args.medspacy:
        for name, comparison in report["medspacy"].items():  # type: ignore[attr-defined]
            print(f"\nmedspaCy ConText vs ours, {name}.yaml: {comparison['mentions']} mentions")
            for config in ("context", "context+sections"):
                row = comparison[config]
                print(f"  {config}: agreement {row['agreement']}, ours correct {row['ours_correct']}, "
                      f"medspaCy correct {row['medspacy_correct']}")
                for line in row["differences"]:
                    print(f"    {line}")


if __name__ == "__main__":
    main()
