"""Linking benchmark: ICD-10-CM inclusion terms (alternative names), held out from the index, coded back.

The index holds every ICD-10-CM category and subcategory by its description, the description without its
filing qualifiers and its "Includes" terms; the inclusion terms are removed from it and used as queries.
A query counts as linked when its own code is the top-1 (or among the top-5) candidates. Inclusion terms
listed under more than one code are left out. Matching is what the worker does: normalised text first,
then nearest neighbour with multilingual-e5-small.

    .venv/bin/python benchmarks/bench_linking.py                  # 2,000 sampled queries (seed 0)
    .venv/bin/python benchmarks/bench_linking.py --queries 0      # all of them
    .venv/bin/python benchmarks/bench_linking.py --json out.json  # also write the numbers

Embeddings come from (and go to) the same cache as the worker's (``python -m worker.terminology build``
fills it); on a busy CPU the first run embeds ~55,000 strings and takes tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mappings.terminology import CodeRequest, CodeSystemData  # noqa: E402
from worker.terminology import (  # noqa: E402
    EmbeddingStore,
    TerminologyService,
    TextEncoder,
    default_cache_root,
    group_texts,
    icd10cm_version,
    load_icd10cm,
)

THRESHOLDS = (0.85, 0.88, 0.9, 0.92, 0.95)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=2000, help="sampled queries (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: the worker's)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args()

    full = load_icd10cm()
    held_out = [e for e in full.entries if e.kind == "inclusion"]
    owners: dict[str, set[str]] = {}
    for entry in held_out:
        owners.setdefault(entry.term, set()).add(entry.code)
    pairs = sorted({(e.term, e.code) for e in held_out if len(owners[e.term]) == 1})
    if args.queries and args.queries < len(pairs):
        pairs = sorted(random.Random(args.seed).sample(pairs, args.queries))
    index_data = CodeSystemData(full.name, full.url, tuple(e for e in full.entries if e.kind != "inclusion"))

    encoder = TextEncoder(args.encoder, batch_size=args.batch_size, device=args.device, progress=True)
    store = EmbeddingStore(args.cache_dir or default_cache_root(), encoder)
    started = time.perf_counter()
    # Query vectors: from the worker's cache of all inclusion terms when it is there, else just the sample.
    all_inclusion = group_texts(full.entries)["inclusion"]
    cached = store.get(f"{full.name}-inclusion", all_inclusion, build=False)
    if cached is not None:
        rows = {text: row for row, text in enumerate(all_inclusion)}
        vectors = {text: cached[rows[text]] for text, _ in pairs}
    else:
        texts = sorted({text for text, _ in pairs})
        sample_vectors = store.get(f"bench-inclusion-{args.seed}-{len(texts)}", texts)
        assert sample_vectors is not None
        vectors = dict(zip(texts, sample_vectors, strict=True))

    def encode(texts: list[str]) -> np.ndarray:
        return np.stack([vectors[text] for text in texts])

    results = {}
    for mode in ("lexical", "embedding"):
        service = TerminologyService.from_sources([index_data], mode=mode, store=store if mode != "lexical" else None)
        service.index(full.name)
        requests = [CodeRequest(text, "DISEASE", (full.name,), "en") for text, _ in pairs]
        found = service.lookup(requests, encode=encode)
        results[mode] = score(pairs, found)
    seconds = time.perf_counter() - started

    report = {
        "terminology": icd10cm_version(),
        "encoder": f"{args.encoder} ({encoder.revision})",
        "index_terms": len(index_data.entries),
        "index_codes": len(index_data.codes()),
        "queries": len(pairs),
        "seed": args.seed,
        "seconds": round(seconds, 1),
        **results,
    }
    print(json.dumps(report, indent=2))
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def score(pairs: list[tuple[str, str]], found: list[list]) -> dict[str, object]:  # type: ignore[type-arg]
    top1 = top5 = same_category = answered = 0
    by_threshold: Counter[str] = Counter()
    covered: Counter[str] = Counter()
    for (_, code), candidates in zip(pairs, found, strict=True):
        codes = [c.code for c in candidates]
        if codes:
            answered += 1
            top1 += codes[0] == code
            same_category += codes[0][:3] == code[:3]
        top5 += code in codes[:5]
        for threshold in THRESHOLDS:
            if candidates and candidates[0].score >= threshold:
                covered[str(threshold)] += 1
                by_threshold[str(threshold)] += codes[0] == code
    n = len(pairs)
    return {
        "top1": round(top1 / n, 4),
        "top5": round(top5 / n, 4),
        "top1_same_category": round(same_category / n, 4),
        "answered": round(answered / n, 4),
        "at_threshold": {
            t: {
                "coded": round(covered[t] / n, 4),
                "top1_of_coded": round(by_threshold[t] / covered[t], 4) if covered[t] else None,
            }
            for t in map(str, THRESHOLDS)
        },
    }


def print_table(report: dict[str, object]) -> None:
    print(f"\n{report['queries']} held-out inclusion terms, {report['index_codes']} codes indexed", file=sys.stderr)
    print("| matching | top-1 | top-5 | top-1 same category |", file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for mode in ("lexical", "embedding"):
        r = report[mode]
        assert isinstance(r, dict)
        print(f"| {mode} | {r['top1']:.3f} | {r['top5']:.3f} | {r['top1_same_category']:.3f} |", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
