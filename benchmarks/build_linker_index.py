"""Rebuild ``worker/linker/index.npz`` from the shipped encoder, without retraining it.

    .venv/bin/python benchmarks/build_linker_index.py [--out worker/linker] [--work /tmp/fhir-ner-linker] [--threads 1]

Embeds every string the worker searches by nearest neighbour (:class:`worker.terminology.SourceIndex` groups of
ICD-10-CM with the shipped synonyms, all codes with a billable target, and of the shipped ICD-10-PCS codes) with
the worker's own encoder (:class:`worker.terminology.LinkerEncoder`, the shipped weights), and writes them int8.
About 46,000 strings: ~8 minutes on one busy CPU core. Vectors are cached by text in ``--work`` (float16), so a
rerun after a synonym change embeds only the new strings. ``--reuse-shipped`` takes every group whose strings are
unchanged from the index already in ``--out`` (int8 rows re-quantise to the same bytes) and embeds only the groups
that changed, e.g. after ``translations.tsv`` changed: seconds instead of minutes. ``--previous-table FILE``
(an ``icd10cm.json.gz`` the current index was built from) reuses that index's vector of every string it already
holds, group by group, when the ICD-10-CM table changed: only the new strings are embedded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "worker" / "linker")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fhir-ner-linker"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse-shipped", action="store_true", help="keep the unchanged groups of the current index")
    parser.add_argument(
        "--previous-table",
        type=Path,
        default=None,
        help="the icd10cm.json.gz the current index in --out was built from: reuse its strings' vectors",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from worker.linker import ShippedIndex, icd10cm_with, load_icd10pcs, save_index
    from worker.terminology import LinkerEncoder, SourceIndex, load_icd10cm

    encoder = LinkerEncoder(folder=args.out, runtime="torch")  # the index in PyTorch float32
    encoder.batch_size = 128
    revision = encoder.revision
    args.work.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in revision)
    cache_texts, cache_vectors = args.work / f"vectors-{safe}.json", args.work / f"vectors-{safe}.npy"
    known: dict[str, np.ndarray] = {}
    if cache_texts.is_file() and cache_vectors.is_file():
        texts = json.loads(cache_texts.read_text(encoding="utf-8"))
        known = dict(zip(texts, np.load(cache_vectors).astype(np.float32), strict=True))
    systems = [icd10cm_with(load_icd10cm(), args.out), load_icd10pcs(args.out)]
    # Every group's strings, named "<system>-<kind>" as in index.npz (one SourceIndex per system: they are slow).
    strings = {f"{data.name}-{kind}": texts for data in systems for kind, texts in SourceIndex(data).groups.items()}
    reused: dict[str, np.ndarray] = {}
    shipped = ShippedIndex(args.out / "index.npz")
    if args.reuse_shipped:
        for group, texts in strings.items():
            matrix = shipped.get(group, texts, revision)
            if matrix is not None:
                reused[group] = matrix
        print(f"reused from the shipped index: {sorted(reused)}", file=sys.stderr)
    if args.previous_table is not None:
        from worker.terminology import read_icd10cm_table

        before = icd10cm_with(read_icd10cm_table(args.previous_table), args.out)
        for kind, texts in SourceIndex(before).groups.items():
            matrix = shipped.get(f"{before.name}-{kind}", texts, revision)
            if matrix is not None:
                known.update(zip(texts, matrix, strict=True))
    wanted = {text for group, texts in strings.items() if group not in reused for text in texts}
    todo = sorted(wanted - set(known))
    print(f"{len(wanted)} strings, {len(todo)} to embed", file=sys.stderr)
    start = time.time()
    for i in range(0, len(todo), 4096):
        chunk = todo[i : i + 4096]
        known.update(zip(chunk, encoder.encode(chunk), strict=True))
        print(f"  {i + len(chunk)}/{len(todo)} {time.time() - start:.0f}s", file=sys.stderr)
    if todo:
        texts = sorted(known)
        np.save(cache_vectors, np.stack([known[t] for t in texts]).astype(np.float16))
        cache_texts.write_text(json.dumps(texts), encoding="utf-8")
    groups = {
        group: (texts, reused[group] if group in reused else np.stack([known[t] for t in texts]))
        for group, texts in strings.items()
    }
    save_index(args.out / "index.npz", groups, revision)
    size = (args.out / "index.npz").stat().st_size
    print(json.dumps({"groups": {g: len(t) for g, (t, _) in groups.items()}, "index_npz_bytes": size}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
