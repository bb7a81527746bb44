"""The linker's query encoder: CPU time per mention and agreement with float32, per arithmetic.

    .venv/bin/python benchmarks/bench_linker_encoder.py [--gold TSV] [--mentions 600] [--batch 25] [--rounds 3]

Mentions come from a gold TSV's first column (default: the check set, seven languages; CodiEsp dev's gold from
``calibrate_linker.py --gold-out`` works too), encoded ``--batch`` at a time as a note's mentions are (25 of a
note's mentions reach the encoder on average): one thread, length-bucketed batches, the worker's
``LinkerEncoder.encode``. CPU time is the process's (``time.process_time``), the best of ``--rounds`` after a
warm-up; cosine is against the PyTorch float32 path (the one the shipped index was embedded with). Variants:
PyTorch float32 and int8, ONNX Runtime fused float32 (the default: a mention's vector does not depend on its
batch), int8 with the feed-forward output projections float32 (the default before that) and all-int8. The ONNX
graphs are built into the cache on first use.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gold", type=Path, default=ROOT / "benchmarks/code_check_set/conditions.tsv")
    parser.add_argument("--mentions", type=int, default=600)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from worker.terminology import LINKER_ONNX_KEEP_FP32, LinkerEncoder, _OnnxQueries

    with args.gold.open(encoding="utf-8") as handle:
        texts = list(dict.fromkeys(row["mention"] for row in csv.DictReader(handle, delimiter="\t")))[: args.mentions]
    variants = {
        "torch-fp32": LinkerEncoder(runtime="torch"),
        "torch-int8": LinkerEncoder(runtime="torch", keep_fp32=LINKER_ONNX_KEEP_FP32),
        "ort-fp32": LinkerEncoder(),
        "ort-int8": LinkerEncoder(keep_fp32=LINKER_ONNX_KEEP_FP32),
        "ort-all8": LinkerEncoder(keep_fp32=("embeddings",)),
    }
    reference = variants["torch-fp32"].encode(texts)
    report: dict[str, object] = {"mentions": len(texts), "batch": args.batch}
    for name, encoder in variants.items():
        vectors = encoder.encode(texts)
        if name.startswith("ort") and not isinstance(encoder._model, _OnnxQueries):
            print(f"warning: {name} fell back to PyTorch", file=sys.stderr)
        best = float("inf")
        for _ in range(args.rounds):
            started = time.process_time()
            for start in range(0, len(texts), args.batch):
                encoder.encode(texts[start : start + args.batch])
            best = min(best, time.process_time() - started)
        cosine = (vectors * reference).sum(axis=1)
        report[name] = {
            "cpu_ms_per_mention": round(1000 * best / len(texts), 2),
            "cosine_mean": round(float(cosine.mean()), 4),
            "cosine_min": round(float(cosine.min()), 4),
        }
        print(name, report[name], file=sys.stderr, flush=True)
    report["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
