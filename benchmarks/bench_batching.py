"""Inference batching: the inference worker's pass over N waiting notes against one note at a time.

Same model (the shipped default unless --model), same notes, same device. "One at a time" is what a worker
without batching does: one `tag_texts` call per note. "Batched" is what `worker.tasks.tag_notes` does with
`FHIR_NER_INFERENCE_MAX_NOTES` waiting notes: one call, its windows length-sorted into forward passes of
`--windows-per-pass`.

    .venv/bin/python benchmarks/bench_batching.py --notes 32 --max-notes 16 --threads 2
    .venv/bin/python benchmarks/bench_batching.py --device cuda --notes 256 --max-notes 64 --windows-per-pass 64
    python benchmarks/bench_batching.py --device cuda --bge-m3-random --chars 7000 --notes 64 --max-notes 32 \
        --windows-per-pass 32     # a BGE-M3-sized tagger (random weights) on ~2,000-token notes (issue 8)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.nlp.tagger import ClinicalTagger

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "es"


def short_notes(count: int, chars: int, data: Path = DATA) -> list[str]:
    """Notes of about ``chars`` characters (the issue's short notes: ~2,000), cut at a sentence end."""
    notes: list[str] = []
    for path in sorted((data / "spaccc-train").glob("*.txt")) + sorted((data / "cardioccc-train").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        if len(text) < chars:
            continue
        cut = text.rfind(". ", 0, chars)
        notes.append(text[: cut + 1 if cut > chars // 2 else chars])
        if len(notes) == count:
            return notes
    sys.exit(f"not enough notes of {chars} characters under {data}")


def bge_m3_random_tagger(folder: Path) -> ClinicalTagger:
    """A tagger on a BGE-M3-shaped encoder (XLM-RoBERTa, 24 layers, hidden 1024, 16 heads, 8192 positions)
    with random weights and e5-small's tokenizer (the same XLM-R SentencePiece family): its speed is
    BGE-M3's, its output is noise. Written to ``folder`` so it loads like any local encoder."""
    import shutil

    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from worker.nlp.e5_convert import default_encoder_dir
    from worker.nlp.tagger import ClinicalTagger

    e5 = default_encoder_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(e5 / name, folder / name)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["model_max_length"] = 8192
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    config = XLMRobertaConfig(
        vocab_size=250037,  # e5-small's tokenizer; BGE-M3 has 250002 (same cost per token)
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
    )
    torch.manual_seed(0)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    return ClinicalTagger.from_encoder(str(folder))


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
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding spaccc-train and cardioccc-train")
    parser.add_argument("--bge-m3-random", action="store_true", help="a BGE-M3-sized tagger, random weights")
    args = parser.parse_args()

    from worker.inference import tag_texts
    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
    from worker.runtime import default_model_path

    if args.bge_m3_random:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bge-m3-random-") as folder:  # loaded into memory, then gone
            tagger = bge_m3_random_tagger(Path(folder))
    else:
        tagger = ClinicalTagger.from_pretrained(args.model or default_model_path())
    pipeline = TaggerPipeline(
        tagger,
        device=args.device,
        batch_size=args.windows_per_pass,
        threads=args.threads,
    )
    notes = short_notes(args.notes, args.chars, args.data)
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
        "model": "bge-m3-shaped, random weights" if args.bge_m3_random else str(args.model or "default"),
        "device": str(pipeline.device),
        "mean_tokens": round(sum(len(pipeline.tagger.tokenizer(n)["input_ids"]) for n in notes) / len(notes)),
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
