"""Calibrate and validate a checkpoint's int8 model; record in the checkpoint what was chosen and how it scored.

1. Smoothing scales for the feed-forward inputs (worker/nlp/quantize.py) from training notes of the
   checkpoint's split (never its validation notes), saved as ``int8_smoothing.safetensors`` in the checkpoint.
2. The validation notes `fhir-ner train` held out are tagged in fp32 and in int8 (ONNX Runtime, the graph
   `--precision int8` builds and caches), both with the checkpoint's span threshold.
3. ``tagger_config.json`` gets ``extra.int8``: the recipe, both scores, and ``meets_bar`` (strict and overlap
   F1 within 0.5 points of fp32). `--precision auto` runs int8 on a CPU only when ``meets_bar`` is true and the
   record's weights digest is this checkpoint's.

    .venv/bin/python benchmarks/calibrate_int8.py --checkpoint worker/models/default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tagger_split import add_split_arguments, load_split  # noqa: E402

from worker.nlp import quantize as quantize_defaults  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    add_split_arguments(parser)
    parser.add_argument(
        "--keep-fp32", default=",".join(quantize_defaults.DEFAULT_KEEP_FP32), help="layer groups kept in fp32"
    )
    parser.add_argument("--calibration-notes", type=int, default=32)
    parser.add_argument("--method", choices=["static", "dynamic"], default="dynamic")
    parser.add_argument(
        "--auto",
        choices=["yes", "no"],
        default="yes",
        help="may `--precision auto` pick int8 when it meets the bar (no: opt-in only, e.g. when it is not faster)",
    )
    parser.add_argument("--smoothing", action="store_true", help="smooth the feed-forward inputs (measured: no gain)")
    parser.add_argument(
        "--fp32",
        default=None,
        help="STRICT,OVERLAP: fp32 scores already measured on these notes (bench_int8.py fp32), not re-run",
    )
    args = parser.parse_args()

    import onnxruntime
    from safetensors.torch import save_file

    from worker.nlp import quantize
    from worker.nlp.metrics import evaluate, report_to_json
    from worker.nlp.tagger import CONFIG_FILE, ClinicalTagger, TaggerPipeline
    from worker.nlp.training import predict_checkpoint

    keep = quantize.check_groups([g for g in args.keep_fp32.split(",") if g])
    train, val, _ = load_split(args.data, args.val_fraction, args.seed)
    config_file = args.checkpoint / CONFIG_FILE

    def write_record(record: dict[str, object]) -> None:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config.setdefault("extra", {})[quantize.RECORD_KEY] = record
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    smoothing = args.checkpoint / quantize.SMOOTHING_FILE
    smoothing.unlink(missing_ok=True)
    (args.checkpoint / quantize.CALIBRATION_FILE).unlink(missing_ok=True)
    calibration = 0
    if args.smoothing or args.method == "static":
        tagger = ClinicalTagger.from_pretrained(args.checkpoint)
        pipeline = TaggerPipeline(tagger, device="cpu", precision="fp32")
        step = max(1, len(train) // args.calibration_notes)
        windows = []
        for doc in train[::step][: args.calibration_notes]:
            ids, _ = pipeline._tokenize(doc.text)
            for start in range(0, max(1, len(ids)), pipeline.window):
                windows.append(pipeline.prefix_ids + ids[start : start + pipeline.window] + pipeline.suffix_ids)
        calibration = min(args.calibration_notes, len(train[::step]))
        if args.method == "static":  # training notes' token windows: the activation ranges come from them
            quantize.save_calibration_windows(args.checkpoint, windows)
        if args.smoothing:
            scales = quantize.smoothing_scales(tagger, quantize.activation_absmax(tagger, windows))
            save_file({k: v.contiguous() for k, v in scales.items()}, str(smoothing), metadata={"format": "pt"})
            smoothing.chmod(0o644)
        del tagger, pipeline
    method = f"onnxruntime-{args.method}"
    write_record({"keep_fp32": keep, "method": method})  # the recipe the int8 graph is built with

    scores = {}
    if args.fp32:
        strict, overlap = (float(x) for x in args.fp32.split(","))
        scores["fp32"] = {"strict_f1": strict, "overlap_f1": overlap}
    for precision in ("int8",) if args.fp32 else ("fp32", "int8"):
        gold, pred, labels = predict_checkpoint(args.checkpoint, val, precision=precision)
        overall = report_to_json(evaluate(gold, pred, labels))["overall"]
        scores[precision] = {k: round(float(overall[k]), 4) for k in ("strict_f1", "overlap_f1")}
    delta = {k: round(scores["int8"][k] - scores["fp32"][k], 4) for k in ("strict_f1", "overlap_f1")}
    record = {
        **quantize.recipe(ClinicalTagger.from_pretrained(args.checkpoint)),
        "smoothing": list(quantize.SMOOTHED_GROUPS) if args.smoothing else [],
        "calibration_notes": calibration,
        "validation_notes": len(val),
        "fp32": scores["fp32"],
        "int8": scores["int8"],
        "delta": delta,
        "bar": quantize.ACCURACY_BAR,
        "meets_bar": all(d >= -quantize.ACCURACY_BAR for d in delta.values()),
        "auto": args.auto == "yes",
        "weights_sha256": quantize.weights_digest(args.checkpoint),
        "onnxruntime": onnxruntime.__version__,
    }
    write_record(record)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
