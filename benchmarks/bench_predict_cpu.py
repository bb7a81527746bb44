"""CPU throughput: our TaggerPipeline against transformers' TokenClassificationPipeline.

Same encoder (the built-in multilingual-e5-small unless --encoder), same notes, same thread count.
Each method runs in its own subprocess so peak memory (max RSS) is measured cleanly; the methods alternate
for ``--rounds`` rounds, and each run's load average (1 minute, before and after) is printed beside it.
Methods: ``ours`` (precision auto), ``ours-fp32``, ``ours-int8``, ``ours-bf16``, ``hf`` (fp32).
Run ``--precision int8`` once beforehand (or benchmarks/calibrate_int8.py) so the int8 graph is cached.

    .venv/bin/python benchmarks/bench_predict_cpu.py --notes 24 --threads 2 --methods ours-fp32,ours-int8,hf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "es"


def load_notes(count: int) -> list[str]:
    """Short (SpaCCC, ~2,400 chars) and long (CardioCCC, ~7,000 chars) notes in a fixed 3:1 mix."""
    short = sorted((DATA / "spaccc-train").glob("*.txt"))
    long = sorted((DATA / "cardioccc-train").glob("*.txt"))
    if not short or not long:
        sys.exit(f"corpora not found under {DATA}")
    n_long = count // 4
    files = short[: count - n_long] + long[:n_long]
    return [f.read_text(encoding="utf-8") for f in files]


def run_ours(encoder: str, notes: list[str], batch_size: int, precision: str = "auto") -> dict[str, Any]:
    """The shipped default tagger (its encoder is the built-in e5-small) unless --encoder names another."""
    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
    from worker.runtime import default_model_path

    checkpoint = default_model_path()
    if encoder == "multilingual-e5-small" and checkpoint is not None:
        tagger = ClinicalTagger.from_pretrained(checkpoint)
    else:
        tagger = ClinicalTagger.from_encoder(encoder)
    pipeline = TaggerPipeline(tagger, batch_size=batch_size, precision=precision)
    pipeline.predict(notes[:2])  # warm-up
    pipeline.stats = {"tokens": 0, "windows": 0, "seconds": 0.0}
    started = time.perf_counter()
    results = pipeline.predict(notes)
    seconds = time.perf_counter() - started
    spans = [[s.label, i, s.start, s.end] for i, doc in enumerate(results) for s in doc]
    return {
        "seconds": seconds,
        "tokens": pipeline.stats["tokens"],
        "spans": len(spans),
        "span_list": spans,
        "precision": pipeline.precision,
    }


def run_hf(encoder: str, notes: list[str], batch_size: int) -> dict[str, Any]:
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    from worker.nlp.encoders import resolve_encoder

    resolved = resolve_encoder(encoder)
    labels = ["O"] + [f"{p}-{t}" for t in ("DISEASE", "SYMPTOM", "PROCEDURE") for p in ("B", "I")]
    model = AutoModelForTokenClassification.from_pretrained(
        resolved.path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={v: k for k, v in enumerate(labels)},
    )
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    tagger = pipeline(
        "token-classification",
        model=model,
        tokenizer=tokenizer,
        aggregation_strategy="simple",
        stride=128,
        device="cpu",
    )
    tagger(notes[:2], batch_size=batch_size)  # warm-up
    tokens = sum(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in notes)
    started = time.perf_counter()
    results = tagger(notes, batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "spans": sum(len(r) for r in results)}


def child(method: str, encoder: str, count: int, batch_size: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    notes = load_notes(count)
    if method == "hf":
        result = run_hf(encoder, notes, batch_size)
    else:
        result = run_ours(encoder, notes, batch_size, method.removeprefix("ours-") if "-" in method else "auto")
    result["notes"] = len(notes)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--notes", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["ours", "ours-fp32", "ours-int8", "ours-bf16", "hf"])
    parser.add_argument("--methods", default="ours,hf", help="comma-separated, run alternately")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the methods this many times; best kept")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.encoder, args.notes, args.batch_size, args.threads)
        return
    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    methods = [m for m in args.methods.split(",") if m]
    for method in methods * args.rounds:
        load_before = os.getloadavg()[0]
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                "--encoder",
                args.encoder,
                "--notes",
                str(args.notes),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["load"] = (load_before, os.getloadavg()[0])
        runs.setdefault(method, []).append(result)
        print(
            f"  {method:<10} {result['tokens'] / result['seconds']:>7.0f} tokens/s"
            f"  peak {result['peak_rss_mb']:>5.0f} MB  load {result['load'][0]:.2f} -> {result['load'][1]:.2f}",
            flush=True,
        )
        if method not in rows or result["seconds"] < rows[method]["seconds"]:
            rows[method] = result
    print(f"encoder {args.encoder}, {args.notes} notes, batch {args.batch_size}, {args.threads} threads")
    print(f"{'method (best of rounds)':<28}{'tokens/s':>10}{'median':>10}{'notes/s':>10}{'peak MB':>10}{'x HF':>7}")
    for method in methods:
        r = rows[method]
        name = "HF pipeline (simple, stride)" if method == "hf" else f"fhir-ner ({r['precision']})"
        median = statistics.median(x["tokens"] / x["seconds"] for x in runs[method])
        ratio = rows["hf"]["seconds"] / r["seconds"] if "hf" in rows else float("nan")
        print(
            f"{name:<28}{r['tokens'] / r['seconds']:>10.0f}{median:>10.0f}{r['notes'] / r['seconds']:>10.2f}"
            f"{r['peak_rss_mb']:>10.0f}{ratio:>6.2f}x"
        )


if __name__ == "__main__":
    main()
