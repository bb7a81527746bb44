"""Where the tagger's memory goes: RSS after each step and, after tagging, the resident set by mapping.

One precision per process (peak RSS is per process): load the shipped default, build the pipeline, tag the
same notes as ``bench_predict_cpu.py``, then print the process's peak (VmHWM), RSS at each step, and
``/proc/self/smaps`` summed by mapping (anonymous, heap, each file), so a change aimed at issue #17's peak
(int8 no higher than fp32) can be checked where it acts. ``--spans FILE`` writes the spans found, to check
that a memory change did not change the output.

    .venv/bin/python benchmarks/probe_tagger_memory.py --precision int8 --notes 24 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def status_mb(field: str) -> float:
    """A VmRSS/VmHWM-style field of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smaps_by_mapping(top: int = 8) -> list[tuple[str, float, float]]:
    """(mapping, Rss MB, Anonymous MB) summed over /proc/self/smaps, largest first."""
    rss: dict[str, float] = defaultdict(float)
    anon: dict[str, float] = defaultdict(float)
    name = "?"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            name = head[5] if len(head) > 5 else "[anonymous]"
        elif line.startswith("Rss:"):
            rss[name] += int(head[1]) / 1024
        elif line.startswith("Anonymous:"):
            anon[name] += int(head[1]) / 1024
    ranked = sorted(rss, key=lambda k: -rss[k])
    return [(k, rss[k], anon[k]) for k in ranked[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--notes", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--spans", type=Path, help="write the spans found here (JSON)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from bench_predict_cpu import load_notes

    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
    from worker.runtime import default_model_path

    notes = load_notes(args.notes)
    steps = {"start": status_mb("VmRSS")}
    tagger = ClinicalTagger.from_pretrained(default_model_path())
    steps["tagger loaded"] = status_mb("VmRSS")
    pipeline = TaggerPipeline(tagger, batch_size=args.batch_size, precision=args.precision, threads=args.threads)
    steps["pipeline built"] = status_mb("VmRSS")
    steps["peak before tagging"] = status_mb("VmHWM")
    results = pipeline.predict(notes)
    steps["after tagging"] = status_mb("VmRSS")
    steps["peak"] = status_mb("VmHWM")
    for step, mb in steps.items():
        print(f"{step:<22}{mb:>8.0f} MB")
    print(f"tokens {pipeline.stats['tokens']:.0f}, {pipeline.stats['tokens'] / pipeline.stats['seconds']:.0f} tokens/s")
    print("resident after tagging, by mapping (Rss / of it anonymous, MB):")
    for name, rss, anon in smaps_by_mapping():
        print(f"  {rss:>7.0f} {anon:>7.0f}  {name}")
    spans = [[i, s.label, s.start, s.end] for i, doc in enumerate(results) for s in doc]
    print(f"spans {len(spans)}")
    if args.spans:
        args.spans.write_text(json.dumps(spans) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
