"""Choose a window lead (issue 15): validation sentences tagged alone, with each candidate lead, and in context.

    .venv/bin/python benchmarks/window_leads.py [--checkpoint worker/models/default] \
        [--candidates benchmarks/window_leads/candidates.json] [--per-language 150] [--out results.json]

A one-sentence note is a window whose first tokens are the mention; the model is unsure there (README, "The
shipped default model"). A lead is text read before a note's first token and dropped from the output
(``TaggerConfig.window_leads``). The selection set: sentences of the validation notes (the translated
validation excerpts per language and the 108 Spanish validation notes; never the short-note check set) that
hold at least one whole gold mention and no gold mention crossing their edges, at most ``--per-language`` per
language (shuffled with a fixed seed). Each is tagged alone with each candidate lead (plus no lead), with the
checkpoint's threshold and edge rules, and scored against its gold mentions: strict F1, character-overlap F1 and
the share of gold mentions touched, per language and on two halves of the notes (by a hash of the note name).
The whole notes are also tagged once without a lead ("context"): the sentence inside its note. Choose on half A,
check on half B.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÁÉÍÓÚÑÄÖÅČŠŽŘ0-9])|\n+")


def sentences(doc: Any) -> list[tuple[int, int, list[Any]]]:
    """(start, end, gold spans) of each sentence with a whole gold mention and none across its edges."""
    out, pos = [], 0
    for match in [*SENTENCE_END.finditer(doc.text), None]:
        start, end = pos, match.start() if match else len(doc.text)
        while start < end and doc.text[start].isspace():
            start += 1
        inside = [g for g in doc.spans if g.start >= start and g.end <= end]
        crossing = [g for g in doc.spans if g.start < end and g.end > start and g not in inside]
        if inside and not crossing and len(doc.text[start:end].split()) >= 3:
            out.append((start, end, inside))
        pos = match.end() if match else len(doc.text)
    return out


def scores(gold: list[Any], pred: list[Any], labels: Sequence[str]) -> dict[str, float]:
    """Strict and character-overlap F1 (``worker.nlp.metrics``, as every other figure) and the share touched."""
    from eval_languages import _touched

    from worker.nlp.metrics import evaluate

    overall = evaluate(gold, pred, labels).overall
    return {
        "strict": round(overall.strict_f1, 4),
        "overlap": round(overall.overlap_f1, 4),
        "touched": round(_touched(gold, pred), 4),
        "gold": len(gold),
    }


def half(doc_id: str) -> str:
    return "AB"[int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "worker" / "models" / "default")
    parser.add_argument("--candidates", type=Path, default=REPO / "benchmarks" / "window_leads" / "candidates.json")
    parser.add_argument("--per-language", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch
    from eval_languages import validation_sets

    from worker.nlp.corpus import Span
    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline

    torch.set_num_threads(args.threads)
    sets = {name[:2]: docs for name, docs in validation_sets().items()}
    tagger = ClinicalTagger.from_pretrained(args.checkpoint)
    tagger.config.window_leads = {}
    pipeline = TaggerPipeline(tagger, precision="fp32")
    threshold = tagger.config.min_span_score  # the pipeline drops spans under each language's own threshold
    candidates: dict[str, dict[str, str]] = {"none": {}, **json.loads(args.candidates.read_text(encoding="utf-8"))}
    items = {}
    for lang, docs in sets.items():
        found = [(doc, start, end, gold) for doc in docs for start, end, gold in sentences(doc)]
        random.Random(0).shuffle(found)
        items[lang] = found[: args.per_language]
    results: dict[str, Any] = {}
    labels = tagger.labels

    def score_halves(rows: dict[str, tuple[list[Any], list[Any]]]) -> dict[str, dict[str, float]]:
        out = {h: scores(gold, pred, labels) for h, (gold, pred) in rows.items()}
        return out | {"all": scores(rows["A"][0] + rows["B"][0], rows["A"][1] + rows["B"][1], labels)}

    def sentence_rows(lang: str, spans_of: Any) -> dict[str, dict[str, float]]:
        """Each sentence is its own document (``doc#start``); ``spans_of(i, doc, start, end)`` gives its predicted
        (label, start, end) in the note's offsets."""
        rows: dict[str, tuple[list[Any], list[Any]]] = {"A": ([], []), "B": ([], [])}
        for index, (doc, start, end, gold) in enumerate(items[lang]):
            sentence = f"{doc.doc_id}#{start}"
            gold_rows, pred_rows = rows[half(doc.doc_id)]
            gold_rows.extend(Span(sentence, g.label, g.start, g.end) for g in gold)
            pred_rows.extend(Span(sentence, *span) for span in spans_of(index, doc, start, end))
        return score_halves(rows)

    for name, leads in candidates.items():
        pipeline.leads = {k: list(tagger.tokenizer(v, add_special_tokens=False)["input_ids"]) for k, v in leads.items()}
        per_language = {}
        for lang, found in items.items():
            predicted = pipeline.predict([doc.text[start:end] for doc, start, end, _ in found], [lang] * len(found))
            per_language[lang] = sentence_rows(
                lang,
                lambda i, doc, start, end, predicted=predicted: [
                    (s.label, s.start + start, s.end + start) for s in predicted[i]
                ],
            )
        results[name] = per_language
        print(name, {lang: r["all"] for lang, r in per_language.items()}, file=sys.stderr, flush=True)
    pipeline.leads = {}
    context = {}
    for lang, docs in sets.items():
        tagged = pipeline.predict([d.text for d in docs], [lang] * len(docs))
        by_doc = {doc.doc_id: spans for doc, spans in zip(docs, tagged, strict=True)}
        context[lang] = sentence_rows(
            lang,
            lambda i, doc, start, end, by_doc=by_doc: [
                (s.label, s.start, s.end) for s in by_doc[doc.doc_id] if s.start >= start and s.end <= end
            ],
        )
    results["context"] = context
    summary = {}
    for name, per_language in results.items():
        summary[name] = {}
        for h in ("A", "B"):
            n = len(per_language)
            summary[name][h] = {
                k: round(sum(per_language[lang][h][k] for lang in per_language) / n, 4)
                for k in ("strict", "overlap", "touched")
            }
    out = {"checkpoint": str(args.checkpoint), "threshold": threshold, "summary": summary, "results": results}
    text = json.dumps(out, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
