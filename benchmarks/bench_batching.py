"""Inference batching: the inference worker's pass over N waiting notes against one note at a time.

Same model (the shipped default unless --model), same notes, same device. "One at a time" is what a worker
without batching does: one `tag_texts` call per note. "Batched" is what `worker.tasks.tag_notes` does with
`FHIR_NER_INFERENCE_MAX_NOTES` waiting notes: one call, its windows length-sorted into forward passes of
`--windows-per-pass`.

    .venv/bin/python benchmarks/bench_batching.py --notes 32 --max-notes 16 --threads 2
    .venv/bin/python benchmarks/bench_batching.py --device cuda --notes 256 --max-notes 64 --windows-per-pass 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "es"


def short_notes(count: int, chars: int) -> list[str]:
    """Notes of about ``chars`` characters (the issue's short notes: ~2,000), cut at a sentence end."""
    notes: list[str] = []
    for path in sorted((DATA / "spaccc-train").glob("*.txt")) + sorted((DATA / "cardioccc-train").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        if len(text) < chars:
            continue
        cut = text.rfind(". ", 0, chars)
        notes.append(text[: cut + 1 if cut > chars // 2 else chars])
        if len(notes) == count:
            return notes
    sys.exit(f"not enough notes of {chars} characters under {DATA}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notes", type=int, default=32)
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--max-notes", type=int, default=16, help="notes per inference pass (N)")
    parser.add_argument("--windows-per-pass", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from worker.inference import tag_texts
    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
    from worker.runtime import default_model_path

    checkpoint = args.model or default_model_path()
    pipeline = TaggerPipeline(
        ClinicalTagger.from_pretrained(checkpoint),
        device=args.device,
        batch_size=args.windows_per_pass,
        threads=args.threads,
    )
    notes = short_notes(args.notes, args.chars)
    languages = ["es"] * len(notes)
    tag_texts(pipeline, notes[:2], languages[:2])  # warm-up

    def one_at_a_time() -> float:
        started = time.perf_counter()
        for note in notes:
            tag_texts(pipeline, [note], ["es"])
        return time.perf_counter() - started

    def batched() -> float:
        started = time.perf_counter()
        for start in range(0, len(notes), args.max_notes):
            tag_texts(pipeline, notes[start : start + args.max_notes], languages[start : start + args.max_notes])
        return time.perf_counter() - started

    single = min(one_at_a_time() for _ in range(args.repeat))
    together = min(batched() for _ in range(args.repeat))
    result = {
        "device": str(pipeline.device),
        "threads": args.threads,
        "notes": len(notes),
        "mean_chars": round(sum(map(len, notes)) / len(notes)),
        "max_notes": args.max_notes,
        "windows_per_pass": args.windows_per_pass,
        "one_at_a_time_notes_per_s": round(len(notes) / single, 2),
        "batched_notes_per_s": round(len(notes) / together, 2),
        "ratio": round(single / together, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
