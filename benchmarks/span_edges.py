"""Span-edge rules (worker/nlp/span_edges.py, issue 15): which steps help which language, on validation only.

    .venv/bin/python benchmarks/span_edges.py --checkpoint worker/models/default --cache /tmp/span_edges.pkl

Tags the validation sets once (the translated ``worker/nlp/data/translated/<lang>/val`` excerpts and the
108 Spanish validation notes of the tagger's own split, as ``benchmarks/eval_languages.py`` does; fp32,
the production decoding) and caches each note's token offsets and probabilities in ``--cache``; later runs
decode from the cache (seconds). Then, per language, every combination of steps is scored (strict /
character-overlap F1, the checkpoint's threshold for the language) on two halves of the notes, split by a hash of the
note's name: choose a language's steps on half A (``--choose-on``), check them on half B. ``--diagnose``
prints the edge errors (gold spans a same-label prediction overlaps without matching) by kind.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import pickle
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRANSLATED = REPO / "worker" / "nlp" / "data" / "translated"
SPANISH = REPO.parent / "shared" / "data" / "es"
LANGUAGES = ("es", "en", "it", "nl", "ro", "sv", "cs")
Cached = tuple[str, str, list[tuple[str, int, int]], Any, Any]  # doc id, text, gold, offsets, probabilities


def build_cache(checkpoint: Path, path: Path) -> dict[str, Any]:
    """Tag every validation set once through TaggerPipeline (fp32) and keep what decoding needs."""
    import torch

    import worker.nlp.tagger as tagger_module
    from worker.nlp.corpus import load_documents
    from worker.nlp.training import load_corpora

    torch.set_num_threads(2)
    captured: list[tuple[Any, Any]] = []
    original = getattr(tagger_module, "decode_spans")  # noqa: B009

    def record(text: str, offsets: Any, probs: Any, labels: Any, min_score: float = 0.0) -> Any:
        captured.append((offsets.copy(), probs.copy()))
        return original(text, offsets, probs, labels, min_score=min_score)

    setattr(tagger_module, "decode_spans", record)  # noqa: B010 (patched to capture what decoding sees)
    try:
        tagger = tagger_module.ClinicalTagger.from_pretrained(checkpoint)
        pipeline = tagger_module.TaggerPipeline(tagger, batch_size=8, precision="fp32", edge_rules=False)
        sets = {lang: load_documents(TRANSLATED / lang / "val") for lang in LANGUAGES[1:]}
        if SPANISH.is_dir():
            sets["es"] = load_corpora([SPANISH / "spaccc-train", SPANISH / "cardioccc-train"])[1]
        out: dict[str, list[Cached]] = {}
        for name, docs in sets.items():
            captured.clear()
            pipeline.predict([d.text for d in docs], [name] * len(docs))  # each set's language: its lead
            out[name] = [
                (d.doc_id, d.text, [(s.label, s.start, s.end) for s in d.spans], off, probs)
                for d, (off, probs) in zip(docs, captured, strict=True)
            ]
            print(f"tagged {name}: {len(docs)} notes", file=sys.stderr, flush=True)
    finally:
        setattr(tagger_module, "decode_spans", original)  # noqa: B010
    thresholds = {lang: tagger.config.span_threshold(lang) for lang in LANGUAGES}
    data = {"labels": tagger.labels, "thresholds": thresholds, "sets": out}
    path.write_bytes(pickle.dumps(data))
    return data


def half(doc_id: str) -> str:
    return "A" if hashlib.sha256(f"15\x01{doc_id}".encode()).digest()[0] < 128 else "B"


def score(docs: list[Cached], labels: list[str], threshold: float, steps: tuple[str, ...], lang: str) -> dict[str, Any]:
    from worker.nlp.corpus import Span
    from worker.nlp.decoding import decode_spans
    from worker.nlp.metrics import evaluate
    from worker.nlp.span_edges import apply_edge_rules, default_edge_rules

    rules = default_edge_rules()[lang].with_steps(steps)
    out: dict[str, Any] = {}
    for part in ("A", "B", "all"):
        chosen = [d for d in docs if part == "all" or half(d[0]) == part]
        gold = [Span(doc_id, *g) for doc_id, _, spans, _, _ in chosen for g in spans]
        pred = []
        for doc_id, text, _, offsets, probs in chosen:
            spans = apply_edge_rules(text, decode_spans(text, offsets, probs, labels), rules)  # as TaggerPipeline
            pred += [Span(doc_id, s.label, s.start, s.end) for s in spans if s.score >= threshold]
        overall = evaluate(gold, pred, labels).overall
        out[part] = (round(overall.strict_f1, 4), round(overall.overlap_f1, 4))
    return out


def diagnose(docs: list[Cached], labels: list[str], threshold: float, steps: tuple[str, ...], lang: str) -> None:
    """Gold spans that a same-label prediction overlaps without matching, by kind, with the differing words."""
    from worker.nlp.decoding import decode_spans
    from worker.nlp.span_edges import apply_edge_rules, default_edge_rules

    rules = default_edge_rules()[lang].with_steps(steps)
    kinds: Counter[str] = Counter()
    words: dict[str, Counter[str]] = {}
    n_gold = exact = 0
    for _, text, gold, offsets, probs in docs:
        pred = [
            s for s in apply_edge_rules(text, decode_spans(text, offsets, probs, labels), rules) if s.score >= threshold
        ]
        keys = {(s.label, s.start, s.end) for s in pred}
        n_gold += len(gold)
        for label, start, end in gold:
            if (label, start, end) in keys:
                exact += 1
                continue
            touching = [s for s in pred if s.label == label and s.start < end and start < s.end]
            if not touching:
                kinds["no same-label overlap"] += 1
                continue
            if len(touching) > 1:
                kinds["split into several predictions"] += 1
                continue
            p = touching[0]
            if any(g != (label, start, end) and g[0] == label and p.start < g[2] and g[1] < p.end for g in gold):
                kinds["one prediction over several gold"] += 1
                continue
            for side, a, b in (("start", p.start, start), ("end", p.end, end)):
                if a == b:
                    continue
                extra = (a < b) if side == "start" else (a > b)
                kind = f"{side} {'early' if a < b else 'late'} ({'extra' if extra else 'missing'} words)"
                kinds[kind] += 1
                segment = text[min(a, b) : max(a, b)].strip().lower()
                n_words = len(re.findall(r"\w+", segment))
                kinds[f"{kind}: {min(n_words, 4)}{'+' if n_words > 3 else ''} word(s)"] += 1
                words.setdefault(kind, Counter())[segment[:30]] += 1
    print(f"== {lang} ({'+'.join(steps) or 'no steps'}): {n_gold} gold, {exact} exact")
    for kind, count in sorted(kinds.items()):
        print(f"  {kind}: {count}")
    for kind, counter in words.items():
        print(f"  {kind}, most common: {counter.most_common(12)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "worker" / "models" / "default")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/span_edges.pkl"))
    parser.add_argument("--choose-on", choices=("A", "B"), default="A")
    parser.add_argument("--diagnose", action="store_true", help="print the edge errors without and with the steps")
    args = parser.parse_args()
    from worker.nlp.span_edges import STEPS, default_edge_rules

    data = pickle.loads(args.cache.read_bytes()) if args.cache.is_file() else None
    if data is None or "thresholds" not in data:  # none yet, or an older cache with one threshold for all languages
        data = build_cache(args.checkpoint, args.cache)
    labels, thresholds = data["labels"], data["thresholds"]
    # every subset of the steps (they always run in the order of STEPS); ties go to the fewer steps
    combos = [c for n in range(len(STEPS) + 1) for c in itertools.combinations(STEPS, n)]
    result: dict[str, Any] = {"min_span_score": thresholds, "choose_on": args.choose_on, "languages": {}}
    for lang in LANGUAGES:
        docs = data["sets"].get(lang)
        if not docs:
            continue
        threshold = thresholds[lang]
        scores = {"+".join(c) or "none": score(docs, labels, threshold, c, lang) for c in combos}
        best = max(scores, key=lambda k: sum(scores[k][args.choose_on]))  # the first best: fewest steps
        shipped = "+".join(default_edge_rules()[lang].steps) or "none"
        result["languages"][lang] = {"scores": scores, "best_on_" + args.choose_on: best, "shipped": shipped}
        print(f"{lang}: " + "  ".join(f"{k} A{v['A']} B{v['B']} all{v['all']}" for k, v in scores.items()))
        print(f"{lang}: best on {args.choose_on}: {best}; shipped: {shipped}", flush=True)
        if args.diagnose:
            diagnose(docs, labels, threshold, (), lang)
            diagnose(docs, labels, threshold, default_edge_rules()[lang].steps, lang)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
