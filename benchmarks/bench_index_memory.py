"""The terminology indexes' resident memory in a worker that codes: at load, and after it has coded some notes.

    .venv/bin/python benchmarks/bench_index_memory.py [--notes 30] [--data ../shared/data/es/codiesp]

``bench_coding.py`` reports the indexes' memory right after they load. A worker then codes notes, and what it
builds on the way (subsets of rows, the re-ranker's strings, remembered answers) and the heap its searches leave
behind count too. This loads the query encoder (not counted), then both indexes, then codes the gold mentions of
the first ``--notes`` CodiEsp dev documents, one document at a time as the worker codes a note (DISEASE and
SYMPTOM mentions against ICD-10-CM, PROCEDURE against ICD-10-PCS), and reports the process's anonymous and
file-backed resident memory (``/proc/self/status``) at each step, and once more after ``malloc_trim(0)`` (the
part of the growth that is freed heap glibc had kept). File-backed growth is the query encoder's memory-mapped
word embeddings, paged in as new tokens are read: shared and reclaimable, not the index's.
``coding_cpu_s_per_note`` is the process's CPU time of the coding loop over the notes: an allocator setting that
keeps less memory can cost CPU (README, "Coding's CPU and memory on an AVX2-only CPU, again").
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)


def resident_mb() -> dict[str, float]:
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            found[line[3:7].lower()] = round(int(line.split()[1]) / 1024, 1)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es" / "codiesp")
    parser.add_argument("--notes", type=int, default=30)
    args = parser.parse_args()
    gold = args.data / "dev" / "devX.tsv"
    if not gold.is_file():
        print(f"CodiEsp dev not found at {gold}: pass --data DIR", file=sys.stderr)
        return 1
    documents: dict[str, list[tuple[str, str]]] = {}
    for line in gold.read_text(encoding="utf-8").splitlines():
        document, kind, _, mention = line.split("\t")[:4]
        label = "PROCEDURE" if kind == "PROCEDIMIENTO" else "DISEASE"
        documents.setdefault(document, []).append((label, " ".join(mention.split())))
    chosen = sorted(documents)[: args.notes]

    import torch

    torch.set_num_threads(2)
    from bench_coding import SYSTEMS, terminology_before_indexes

    from mappings.profile import load_profile
    from mappings.terminology import code_request

    profile = load_profile()
    service = terminology_before_indexes(profile)
    before = resident_mb()
    for name in SYSTEMS:
        service.index(name)
    loaded = resident_mb()
    started = time.process_time()
    for document in chosen:
        requests = []
        for label, mention in documents[document]:
            labels = [label] + (["SYMPTOM"] if label == "DISEASE" else [])  # the tagger's label is not known here
            for each in labels:
                options = profile.labels[each].codes
                if options is not None:
                    requests.append(code_request(mention, each, options, "es"))
        service.lookup(requests)
    coding_cpu_s = time.process_time() - started
    coded = resident_mb()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = resident_mb()

    def over(point: dict[str, float]) -> dict[str, float]:
        return {kind: round(point[kind] - before[kind], 1) for kind in point}

    print(
        json.dumps(
            {
                "notes": len(chosen),
                "coding_cpu_s_per_note": round(coding_cpu_s / max(1, len(chosen)), 4),
                "index_loaded_mb": over(loaded),
                "after_coding_mb": over(coded),
                "after_malloc_trim_mb": over(trimmed),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
