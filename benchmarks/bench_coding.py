"""What coding adds to a note: CPU time of coding a note's mentions next to tagging it, and the index's memory.

    .venv/bin/python benchmarks/bench_coding.py [--notes 30] [--threads 2] [--warm N] [--precision auto]
        [--data DIR_OF_TXT]

Per note (default: the CodiEsp dev texts in ../shared/data/es/codiesp/dev/text_files, in order) the worker's
in-process steps, each timed: the shipped tagger tags it (``TaggerPipeline.predict``), the assertion rules read
each mention (``default_detector().annotate``), and the mappings build the note's transaction
(``plan_transaction``) twice: without a terminology service (no codes) and with the shipped linker (the mappers'
one ``lookup`` per note). Coding's cost is the difference of the two. CPU time is the process's
(``time.process_time``), after one warm-up note (``--warm N``: after N, so the measured notes meet a worker whose
remembered answers are filled, as in a worker that has run a while; the measured notes are other notes).

Two ratios: ``coding_added_to_tagging`` (coding / tagging alone, the figure the README has reported since the
linker shipped) and ``coding_added_to_note`` (coding / the note's other in-process CPU: tagging, assertions and
mapping; the EHR round trips' CPU is not counted, so this is an upper bound). Memory: resident set size before
and after the two code systems' indexes are loaded (the encoder is loaded first, so it is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)


NAMESPACE = "urn:fhir-ner-adapter:derived"  # the setting's default
RECORDED = "2026-01-01T00:00:00+00:00"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


SYSTEMS = ("icd-10-cm", "icd-10-pcs")  # the built-in code systems whose indexes a worker loads


def terminology_before_indexes(profile: Any) -> Any:
    """The worker's terminology service for ``profile`` (the shipped linker; an empty cache folder, so only what
    ships is read) with its query encoder loaded and its indexes not yet: what the indexes' memory is measured
    against (``bench_index_memory.py`` too)."""
    from worker.terminology import terminology_for

    service = terminology_for(profile, "auto", cache_root=Path("/tmp/fhir-ner-bench-empty-cache"))
    assert service is not None and service.store is not None
    service.store.queries.encode(["warm-up"])
    return service


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/es/codiesp/dev/text_files")
    parser.add_argument("--notes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "int8", "bf16"),
        help="the tagger's (auto: as the worker runs it; bf16 on a CPU with AMX or AVX512-BF16, fp32 elsewhere)",
    )
    parser.add_argument(
        "--warm",
        type=int,
        default=0,
        help="first tag and code this many other notes, uncounted: a worker that has run a while (its remembered "
        "answers and query vectors filled), instead of a fresh one",
    )
    args = parser.parse_args()
    files = sorted(args.data.glob("*.txt"))[: args.warm + args.notes + 1]
    if not files:
        print(f"no notes in {args.data}: put CodiEsp there or pass --data DIR (any folder of *.txt)", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(args.threads)
    from mappings.bundle import ModelInfo, plan_transaction
    from mappings.context import DocumentContext
    from mappings.mentions import Mention
    from mappings.profile import load_profile
    from worker.nlp.assertion import default_detector
    from worker.predict import load_pipeline

    pipeline = load_pipeline(None, 8, args.threads, args.precision)
    detector = default_detector()
    model = ModelInfo(*pipeline.tagger.model_info())
    profile = load_profile()
    service = terminology_before_indexes(profile)
    before = rss_mb()
    for name in SYSTEMS:
        service.index(name)
    index_mb = rss_mb() - before
    matrices_mb = sum(service.index(n).matrix.nbytes for n in SYSTEMS) / 2**20

    tag_cpu = assert_cpu = map_cpu = code_cpu = 0.0
    mentions = notes = 0
    for position, file in enumerate(files):
        text = file.read_text(encoding="utf-8")
        context = DocumentContext(
            document_id=f"bench-{position}", version_id="1", subject="Patient/bench", language="es"
        )
        start = time.process_time()
        (spans,) = pipeline.predict([text])
        tagged = time.process_time()
        found = [Mention(s.label, s.start, s.end, text[s.start : s.end], s.score) for s in spans]
        found = detector.annotate(text, found, "es")
        asserted = time.process_time()
        plan_transaction(context, found, profile, model, NAMESPACE, RECORDED)
        mapped = time.process_time()
        plan_transaction(context, found, profile, model, NAMESPACE, RECORDED, terminology=service)
        coded = time.process_time()
        if position <= args.warm:
            continue  # warm-up
        notes += 1
        mentions += sum(1 for m in found if m.label in profile.labels and profile.labels[m.label].codes is not None)
        tag_cpu += tagged - start
        assert_cpu += asserted - tagged
        map_cpu += mapped - asserted
        code_cpu += (coded - mapped) - (mapped - asserted)  # the mapping with codes, less the mapping without
    note_cpu = tag_cpu + assert_cpu + map_cpu
    report = {
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes share the CPU: say how busy it was
        "notes": notes,
        "warm_notes": args.warm,
        "tagger_precision": pipeline.precision,
        "coded_mentions_per_note": round(mentions / notes, 1),
        "tagging_cpu_s_per_note": round(tag_cpu / notes, 3),
        "assertion_cpu_s_per_note": round(assert_cpu / notes, 3),
        "mapping_cpu_s_per_note": round(map_cpu / notes, 3),
        "coding_cpu_s_per_note": round(code_cpu / notes, 3),
        "coding_added_to_tagging": round(code_cpu / tag_cpu, 4),
        "coding_added_to_note": round(code_cpu / note_cpu, 4),
        "index_rss_mb": round(index_mb, 1),
        "index_matrices_mb": round(matrices_mb, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
