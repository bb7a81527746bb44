"""Screen int8 keep sets (layer groups left in fp32) per language, for issue 17.

Each candidate recipe is scored on the translated validation excerpts (six languages, 240 gold mentions
each) and, with ``--spanish``, on the 108 Spanish validation notes, through the production path
(``predict_checkpoint``, the checkpoint's threshold, the span-edge rules). The checkpoint is never modified:
each recipe runs from a temporary copy of it whose ``tagger_config.json`` names that keep set (the weights
are symlinked, so the cached int8 graph is keyed by the same weights digest plus the recipe).

    .venv/bin/python benchmarks/screen_int8_keep.py --checkpoint worker/models/default \
        --keep embeddings,head,ffn_out --keep embeddings,head,ffn_out,attn_out

Prints one JSON object: per recipe, per language strict/overlap F1 and their deltas to fp32, the six
translated languages pooled (their spans scored together), the spans int8 changed against fp32's, and
whether every delta is within the 0.5 bar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.eval_languages import LANGUAGES, SPANISH, TRANSLATED  # noqa: E402


@contextlib.contextmanager
def with_keep_fp32(checkpoint: Path, keep: list[str]) -> Iterator[Path]:
    """A temporary view of the checkpoint whose int8 record names ``keep`` (dynamic, per-channel)."""
    from worker.nlp import quantize
    from worker.nlp.tagger import CONFIG_FILE

    tmp = Path(tempfile.mkdtemp(prefix="int8-keep-"))
    try:
        for entry in checkpoint.iterdir():
            if entry.name != CONFIG_FILE:
                os.symlink(entry.resolve(), tmp / entry.name)
        config = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        record = {"method": "onnxruntime-dynamic", "per_channel": True, "keep_fp32": quantize.check_groups(keep)}
        config.setdefault("extra", {})[quantize.RECORD_KEY] = record
        (tmp / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def score(
    checkpoint: Path, sets: dict[str, list[Any]], precision: str, reference: dict[str, set[Any]] | None = None
) -> tuple[dict[str, Any], dict[str, set[Any]]]:
    """Per set and pooled: strict/overlap F1; with ``reference`` (fp32's spans per set), the spans int8 changed.

    Changed spans (predicted by one arithmetic and not the other, label and edges exact) measure what
    quantisation did more steadily than F1 deltas on 240 mentions, where a flip can move F1 either way."""
    from worker.nlp.metrics import evaluate
    from worker.nlp.training import Span, predict_checkpoint

    out: dict[str, Any] = {}
    spans: dict[str, set[Any]] = {}
    pooled_gold: list[Any] = []
    pooled_pred: list[Any] = []
    labels: list[str] = []
    for name, docs in sets.items():
        gold, pred, labels = predict_checkpoint(checkpoint, docs, language=name, precision=precision)
        overall = evaluate(gold, pred, labels).overall
        out[name] = {"strict_f1": round(overall.strict_f1, 4), "overlap_f1": round(overall.overlap_f1, 4)}
        spans[name] = {(s.doc_id, s.label, s.start, s.end) for s in pred}
        if reference is not None:
            out[name]["changed"] = len(spans[name] ^ reference[name])
            out[name]["fp32_spans"] = len(reference[name])
        if name != "es":  # doc ids may repeat across languages: prefix them before pooling
            pooled_gold += [Span(f"{name}/{s.doc_id}", s.label, s.start, s.end) for s in gold]
            pooled_pred += [Span(f"{name}/{s.doc_id}", s.label, s.start, s.end) for s in pred]
    overall = evaluate(pooled_gold, pooled_pred, labels).overall
    out["pooled6"] = {"strict_f1": round(overall.strict_f1, 4), "overlap_f1": round(overall.overlap_f1, 4)}
    if reference is not None:
        out["pooled6"]["changed"] = sum(out[n]["changed"] for n in sets if n != "es")
        out["pooled6"]["fp32_spans"] = sum(out[n]["fp32_spans"] for n in sets if n != "es")
    return out, spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--keep", action="append", required=True, help="comma-separated groups; repeat per recipe")
    parser.add_argument("--spanish", action="store_true", help="also the 108 Spanish validation notes (slow)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from worker.nlp.corpus import load_documents
    from worker.nlp.quantize import ACCURACY_BAR
    from worker.nlp.training import load_corpora

    torch.set_num_threads(args.threads)
    sets: dict[str, list[Any]] = {lang: load_documents(TRANSLATED / lang / "val") for lang in LANGUAGES[1:]}
    if args.spanish:
        _, sets["es"], _ = load_corpora([SPANISH / "spaccc-train", SPANISH / "cardioccc-train"])
    result: dict[str, Any] = {"load_1min_start": os.getloadavg()[0]}
    result["fp32"], reference = score(args.checkpoint, sets, "fp32")
    print("fp32", result["fp32"], file=sys.stderr, flush=True)
    result["recipes"] = {}
    for keep_arg in args.keep:
        keep = [g for g in keep_arg.split(",") if g]
        started = time.perf_counter()
        with with_keep_fp32(args.checkpoint, keep) as view:
            scores, _ = score(view, sets, "int8", reference)
        delta = {
            name: {k: round(v - result["fp32"][name][k], 4) for k, v in s.items() if k.endswith("_f1")}
            for name, s in scores.items()
            if name in result["fp32"]
        }
        within = all(d >= -ACCURACY_BAR for name, s in delta.items() if name != "pooled6" for d in s.values())
        result["recipes"][",".join(keep)] = {
            "scores": scores,
            "delta": delta,
            "within_bar_every_language": within,
            "seconds": round(time.perf_counter() - started, 1),
            "load_1min_end": os.getloadavg()[0],
        }
        changed = {name: s.get("changed") for name, s in scores.items()}
        print(",".join(keep), json.dumps(delta), within, "changed", changed, file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
