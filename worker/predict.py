"""``fhir-ner predict``: every *.txt of a folder → one span TSV (the MultiClinNER columns plus ours)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker.nlp.corpus import Span, write_span_tsv
from worker.nlp.tagger import ClinicalTagger, TaggerPipeline


@dataclass
class PredictionRun:
    documents: int
    spans: int
    failed: list[tuple[str, str]]
    tokens: int
    seconds: float


def read_notes(folder: Path, report: Callable[[str], None]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(stem, text) of every readable UTF-8 *.txt; unreadable files are reported by name, not fatal."""
    notes: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*.txt")):
        try:
            notes.append((path.stem, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as error:
            reason = "not valid UTF-8" if isinstance(error, UnicodeDecodeError) else (error.strerror or str(error))
            failed.append((path.name, reason))
            report(f"skipped {path.name}: {reason}")
    return notes, failed


def predict_folder(
    input_dir: Path,
    output: Path,
    pipeline: TaggerPipeline,
    batch_size: int = 8,
    progress: bool = True,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    code_for: Callable[[str, str], str | None] | None = None,
) -> PredictionRun:
    from tqdm import tqdm

    from worker.nlp.assertion import default_detector

    detector = default_detector()
    notes, failed = read_notes(input_dir, report)
    # Length-sorted chunks keep padding low; results are written in file-name order.
    order = sorted(range(len(notes)), key=lambda i: len(notes[i][1]))
    found: dict[int, list[Span]] = {}
    bar = tqdm(total=sum(len(t) for _, t in notes), unit="char", unit_scale=True, disable=not progress, file=sys.stderr)
    for chunk_start in range(0, len(order), batch_size):
        chunk = order[chunk_start : chunk_start + batch_size]
        results = pipeline.predict([notes[i][1] for i in chunk])
        for index, spans in zip(chunk, results, strict=True):
            stem, text = notes[index]
            # The language is detected from each note's text: a folder of .txt files carries no metadata.
            assertions = detector.detect(text, [(s.start, s.end) for s in spans])
            found[index] = [
                Span(
                    stem,
                    s.label,
                    s.start,
                    s.end,
                    text[s.start : s.end],
                    s.score,
                    assertion,
                    (code_for(s.label, text[s.start : s.end]) if code_for else None),
                )
                for s, assertion in zip(spans, assertions, strict=True)
            ]
            bar.update(len(text))
    bar.close()
    all_spans = [span for index in range(len(notes)) for span in found.get(index, [])]
    output.parent.mkdir(parents=True, exist_ok=True)
    write_span_tsv(output, all_spans)
    tagger = pipeline.tagger
    name, revision = tagger.model_info()
    meta = {
        "model": name,
        "model_revision": revision,
        "encoder": tagger.config.encoder,
        "encoder_revision": tagger.config.encoder_revision,
        "labels": tagger.labels,
        "precision": pipeline.precision,
        "documents": len(notes),
        "failed": [{"file": f, "reason": r} for f, r in failed],
    }
    Path(f"{output}.meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return PredictionRun(len(notes), len(all_spans), failed, int(pipeline.stats["tokens"]), pipeline.stats["seconds"])


def load_pipeline(
    model: Path | None,
    batch_size: int,
    threads: int | None = None,
    precision: str = "auto",
    cache_dir: Path | None = None,
) -> TaggerPipeline:
    from worker.runtime import default_model_path

    checkpoint = model or default_model_path()
    if checkpoint is None:
        raise FileNotFoundError("no tagger checkpoint: pass --model PATH (the default model is not installed)")
    tagger = ClinicalTagger.from_pretrained(checkpoint, cache_dir=cache_dir)
    return TaggerPipeline(tagger, batch_size=batch_size, threads=threads, precision=precision, cache_dir=cache_dir)
