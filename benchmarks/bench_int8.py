"""Int8 variants of the tagger on the validation notes: accuracy against fp32, each variant in its own process.

The default checkpoint's 108 validation notes (the split `fhir-ner train` held out of spaccc-train and
cardioccc-train) are tagged through the production pipeline (TaggerPipeline, same windows and decoding) by
each variant, and scored with the checkpoint's calibrated span threshold. Accuracy does not depend on the
machine's load; the seconds printed beside it do (the load average is printed too).

Variants (``-keep=a+b`` keeps those layer groups of worker/nlp/quantize.py in fp32):

- ``fp32``, ``bf16``: PyTorch (bf16 by autocast);
- ``torch-pt``, ``torch-pc``: PyTorch dynamic int8 with per-tensor / per-channel weight scales;
- ``ort-fp32``: ONNX Runtime on the fused fp32 graph;
- ``ort-pt``, ``ort-pc``: ONNX Runtime dynamic int8 (per-tensor / per-channel weights) of the fused graph;
- ``ort-pts``, ``ort-pcs``: the same after smoothing the feed-forward inputs' outlier channels (SmoothQuant,
  scales from training notes; worker/nlp/quantize.py);
- ``ort-static``: ONNX Runtime static int8 (activation scales calibrated on training notes, QDQ, u8 activations);
  ``ort-static-qop``: the same written as QOperator ops (``QLinearMatMul``); ``-s8``: s8 symmetric activations;
  ``ort-hybrid``: static QDQ for the MatMuls, and the fused ``Attention`` ops (query/key/value) dynamic int8;
  ``ort-mixed``: static QDQ for the feed-forward output projections (``ffn_out``) only, dynamic int8 elsewhere.

``--batch-size 1`` tags each window alone (no padding rows share a dynamic activation scale).

    .venv/bin/python benchmarks/bench_int8.py fp32 torch-pt torch-pc ort-pc ort-pc-keep=embeddings
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tagger_split import load_split  # noqa: E402

# static variants: (format, signed symmetric activations)
STATIC = {
    "ort-static": ("QDQ", False),
    "ort-static-qop": ("QOperator", False),
    "ort-static-s8": ("QDQ", True),
    "ort-static-qop-s8": ("QOperator", True),
}


def parse(variant: str) -> tuple[str, list[str]]:
    base, _, keep = variant.partition("-keep=")
    return base, [g for g in keep.split("+") if g]


def onnx_model(variant: str, work: Path, tagger: Any, train: list[Any]) -> Path:
    """The variant's ONNX file, built once under ``work`` (the fp32 export and fusion are shared)."""
    from worker.nlp import quantize

    work.mkdir(parents=True, exist_ok=True)
    base, keep = parse(variant)
    smoothed = base in ("ort-pcs", "ort-pts")
    fused = work / ("tagger.smoothed.fp32.onnx" if smoothed else "tagger.fp32.onnx")
    config = tagger.encoder.config
    if smoothed:  # scales from training notes, the same recipe as benchmarks/calibrate_int8.py
        absmax = quantize.activation_absmax(tagger, calibration_windows(tagger, train))
        quantize.apply_smoothing(tagger, quantize.smoothing_scales(tagger, absmax))
    if not fused.exists():
        raw = work / "tagger.raw.onnx"
        quantize.export_onnx(tagger, raw)
        quantize.optimize_onnx(raw, fused, config.num_attention_heads, config.hidden_size)
        raw.unlink()
    if base == "ort-fp32":
        return fused
    out = work / f"tagger.{variant}.onnx"
    if out.exists():
        return out
    if base in ("ort-pt", "ort-pc", "ort-pts", "ort-pcs"):
        quantize.quantize_onnx_dynamic(
            fused, out, config.num_hidden_layers, per_channel=base in ("ort-pc", "ort-pcs"), keep_fp32=keep
        )
    elif base in STATIC or base == "ort-hybrid":
        fmt, signed = STATIC.get(base, ("QDQ", False))
        static_out = work / f"tagger.{variant}.static.onnx" if base == "ort-hybrid" else out
        quantize.quantize_onnx_static(
            fused,
            static_out,
            config.num_hidden_layers,
            calibration_windows(tagger, train),
            keep_fp32=keep,
            quant_format=fmt,
            activation_signed=signed,
            extra_options={"ActivationSymmetric": True, "MatMulConstBOnly": True} if signed else None,
        )
        if base == "ort-hybrid":  # the fused Attention ops (no static form) quantised dynamically on top
            quantize.quantize_onnx_dynamic(
                static_out, out, config.num_hidden_layers, keep_fp32=keep, op_types=["Attention"]
            )
    elif base == "ort-mixed":  # static QDQ for the feed-forward output projections only, dynamic elsewhere
        static_out = work / f"tagger.{variant}.static.onnx"
        others = [g for g in quantize.GROUPS if g not in ("ffn_out", "first", "last")]
        quantize.quantize_onnx_static(
            fused, static_out, config.num_hidden_layers, calibration_windows(tagger, train), keep_fp32=others
        )
        quantize.quantize_onnx_dynamic(static_out, out, config.num_hidden_layers, keep_fp32=[*keep, "ffn_out"])
    else:
        raise SystemExit(f"unknown variant {variant}")
    return out


def calibration_windows(tagger: Any, train: list[Any], notes: int = 32) -> list[list[int]]:
    """Token windows of training notes (never the validation notes), as the pipeline would cut them."""
    from worker.nlp.tagger import TaggerPipeline

    pipeline = TaggerPipeline(tagger, device="cpu", precision="fp32")
    step = max(1, len(train) // notes)
    windows: list[list[int]] = []
    for doc in train[::step][:notes]:
        ids, _ = pipeline._tokenize(doc.text)
        for start in range(0, max(1, len(ids)), pipeline.window):
            windows.append(pipeline.prefix_ids + ids[start : start + pipeline.window] + pipeline.suffix_ids)
    return windows


def child(variant: str, work: Path, threads: int, every: int = 1, batch_size: int = 8) -> dict[str, Any]:
    import torch

    from worker.nlp.corpus import Span
    from worker.nlp.metrics import evaluate, report_to_json
    from worker.nlp.quantize import OnnxRunner, quantize_dynamic_torch
    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
    from worker.runtime import default_model_path

    torch.set_num_threads(threads)
    train, val, _ = load_split()
    val = val[::every]
    checkpoint = default_model_path()
    assert checkpoint is not None
    tagger = ClinicalTagger.from_pretrained(checkpoint)
    threshold = tagger.config.min_span_score
    tagger.config.min_span_score = 0.0
    base, keep = parse(variant)
    precision = "bf16" if base == "bf16" else "fp32"
    if base in ("torch-pt", "torch-pc"):
        quantize_dynamic_torch(tagger, per_channel=base == "torch-pc", keep_fp32=keep)
    pipeline = TaggerPipeline(tagger, device="cpu", precision=precision, batch_size=batch_size)
    if base.startswith("ort-"):
        pipeline.runner = OnnxRunner(onnx_model(variant, work, tagger, train), threads)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    predicted = pipeline.predict([d.text for d in val])
    seconds = time.perf_counter() - started
    pred = [
        Span(d.doc_id, s.label, s.start, s.end, d.text[s.start : s.end], s.score)
        for d, spans in zip(val, predicted, strict=True)
        for s in spans
        if s.score >= threshold
    ]
    for d, spans in zip(val, predicted, strict=True):  # decoding's guarantees, whatever the arithmetic
        assert all(0 <= s.start < s.end <= len(d.text) for s in spans), variant
    gold = [Span(d.doc_id, s.label, s.start, s.end) for d in val for s in d.spans]
    overall = report_to_json(evaluate(gold, pred, tagger.labels))["overall"]
    return {
        "variant": variant,
        "batch_size": batch_size,
        "strict_f1": overall["strict_f1"],
        "overlap_f1": overall["overlap_f1"],
        "spans": len(pred),
        "span_keys": sorted(f"{s.doc_id}|{s.label}|{s.start}|{s.end}" for s in pred),
        "tokens": pipeline.stats["tokens"],
        "seconds": seconds,
        "load": [load_before, os.getloadavg()[0]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fhir-ner-bench-int8"), help="ONNX files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=None, help="append each variant's JSON line here")
    parser.add_argument("--notes", type=int, default=1, help="every n-th validation note only (screening)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (padding rows)")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.variants[0], args.work, args.threads, args.notes, args.batch_size)))
        return
    rows = []
    for variant in args.variants:
        command = [
            sys.executable,
            __file__,
            variant,
            "--child",
            "--work",
            str(args.work),
            "--threads",
            str(args.threads),
            "--notes",
            str(args.notes),
            "--batch-size",
            str(args.batch_size),
        ]
        # Each child gets its own temporary folder: ONNX Runtime's quantiser writes its intermediate models
        # under TMPDIR, and a shared one raced (a screen of the first/last blocks failed on it).
        tmp = args.work / "tmp" / variant.replace("/", "_")
        tmp.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp)})
        if out.returncode:
            print(f"{variant}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        if args.results:
            with args.results.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        print(
            f"{variant:<40} strict {row['strict_f1']:.4f} overlap {row['overlap_f1']:.4f} spans {row['spans']:>5} "
            f"{row['tokens'] / row['seconds']:>6.0f} tok/s (load {row['load'][0]:.1f}-{row['load'][1]:.1f}) "
            f"peak {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
