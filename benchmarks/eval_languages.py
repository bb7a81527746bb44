"""Score a tagger checkpoint per language: the one-sentence check set and the validation notes.

    .venv/bin/python benchmarks/eval_languages.py --checkpoint worker/models/default
    .venv/bin/python benchmarks/eval_languages.py --checkpoint CKPT --only short   # the 56 sentences only
    .venv/bin/python benchmarks/eval_languages.py --checkpoint CKPT --record-bf16 yes  # bf16 against fp32, recorded

* **short**: ``benchmarks/short_notes/sentences.tsv`` (56 one-sentence notes, 8 per language, each with the
  mention that matters). A sentence counts as found when a predicted span overlaps its target mention
  (any label; ``label`` also needs the target's label, ``exact`` its exact edges). Each sentence is
  tagged alone and after a one-sentence lead ("A 67-year-old man."), to show whether a mention at the start
  of a note is missed.
* **val**: the translated validation excerpts (``worker/nlp/data/translated/<lang>/val``) per language and
  the 108 Spanish validation notes the tagger's split holds out (``../shared/data/es``, skipped when absent):
  strict and character-overlap F1, and the share of gold mentions touched by any prediction (labels
  ignored).
* **genres**: the genre validation passages (``worker/nlp/data/genres/<lang>/val``: patient leaflets, drug labels,
  textbook prose, patient health pages, journal abstracts and clinical notes written natively for this project)
  per language, scored like **val**, plus ``touched`` per genre. ``--calibrate`` chooses the other languages'
  threshold on them too.

The checkpoint's own span-score threshold applies unless ``--min-span-score`` is given. Spans go through the
span-edge rules of each set's language (``worker/nlp/span_edges.py``) unless ``--no-edge-rules`` is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHORT = REPO / "benchmarks" / "short_notes" / "sentences.tsv"
# One-line notes whose mention is a clinical abbreviation or sits beside a word of time or certainty ("Antecedentes
# de EPOC.", "Cunoscut cu HTA.", "Tidigare stroke."): 70, 10 per language (session 23).
ABBREVIATIONS = REPO / "benchmarks" / "short_notes" / "abbreviations.tsv"
TRANSLATED = REPO / "worker" / "nlp" / "data" / "translated"
GENRES = REPO / "worker" / "nlp" / "data" / "genres"
SPANISH = REPO.parent / "shared" / "data" / "es"
LANGUAGES = ("es", "en", "it", "nl", "ro", "sv", "cs")
LEADS = {
    "es": "Varón de 67 años.",
    "en": "A 67-year-old man.",
    "it": "Uomo di 67 anni.",
    "nl": "Man van 67 jaar.",
    "ro": "Bărbat de 67 de ani.",
    "sv": "Man, 67 år.",
    "cs": "Muž, 67 let.",
}


def short_notes(pipeline: Any, sentences: Path = SHORT) -> dict[str, Any]:
    """Per language, how many of ``sentences``' targets are found alone and after a lead sentence (any label), with
    their label, and with their exact edges; the sentences whose target is missed alone, and those found with another
    label or other edges."""
    rows = list(csv.DictReader(sentences.open(encoding="utf-8"), delimiter="\t"))
    texts = [r["sentence"] for r in rows] + [f"{LEADS[r['lang']]} {r['sentence']}" for r in rows]
    predicted = pipeline.predict(texts, [r["lang"] for r in rows] * 2)
    out: dict[str, Any] = {"per_language": {}, "missed_alone": [], "inexact_alone": []}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for i, row in enumerate(rows):
        for setting, offset in (("alone", 0), ("after_lead", len(LEADS[row["lang"]]) + 1)):
            spans = predicted[i if offset == 0 else i + len(rows)]
            start = offset + row["sentence"].index(row["target"])
            end = start + len(row["target"])
            touching = [s for s in spans if s.start < end and start < s.end]
            found = bool(touching)
            counts[row["lang"]][setting] += found
            if setting == "alone":
                exact = any((s.label, s.start, s.end) == (row["label"], start, end) for s in touching)
                counts[row["lang"]]["label"] += any(s.label == row["label"] for s in touching)
                counts[row["lang"]]["exact"] += exact
                if not found:
                    out["missed_alone"].append(row["sentence"])
                elif not exact:
                    out["inexact_alone"].append(
                        [row["sentence"], [[s.label, row["sentence"][s.start : s.end]] for s in touching]]
                    )
    for lang in LANGUAGES:
        out["per_language"][lang] = dict(counts[lang])
    out["total"] = {k: sum(c[k] for c in counts.values()) for k in ("alone", "after_lead", "label", "exact")}
    out["sentences"] = len(rows)
    return out


def _touched(gold: list[Any], pred: list[Any]) -> float:
    by_doc: dict[str, list[Any]] = defaultdict(list)
    for p in pred:
        by_doc[p.doc_id].append(p)
    hit = sum(any(p.start < g.end and g.start < p.end for p in by_doc[g.doc_id]) for g in gold)
    return hit / max(1, len(gold))


def _set_scores(gold: list[Any], scored: list[Any], labels: list[str], threshold: float) -> dict[str, float]:
    """Strict and overlap F1 and the share of gold mentions touched, of the spans scoring at least ``threshold``."""
    from worker.nlp.metrics import evaluate

    pred = [s for s in scored if (s.score or 0.0) >= threshold]
    overall = evaluate(gold, pred, labels).overall
    return {
        "strict_f1": round(overall.strict_f1, 4),
        "overlap_f1": round(overall.overlap_f1, 4),
        "touched": round(_touched(gold, pred), 4),
    }


def validation_sets() -> dict[str, list[Any]]:
    """The translated validation excerpts per language, then the 108 Spanish validation notes (when the Spanish
    corpora are beside the checkout) as ``"es (108 notes)"``; a set's language is its name's first two letters."""
    from worker.nlp.corpus import load_documents
    from worker.nlp.training import load_corpora

    sets: dict[str, list[Any]] = {lang: load_documents(TRANSLATED / lang / "val") for lang in LANGUAGES[1:]}
    if SPANISH.is_dir():
        _, sets["es (108 notes)"], _ = load_corpora([SPANISH / "spaccc-train", SPANISH / "cardioccc-train"])
    return sets


def genre_sets() -> dict[str, list[Any]]:
    """The genre validation passages per language (``"<lang> genres"``), where they have been built."""
    from worker.nlp.corpus import load_documents

    return {
        f"{lang} genres": load_documents(GENRES / lang / "val")
        for lang in LANGUAGES
        if (GENRES / lang / "val").is_dir()
    }


def genres(
    checkpoint: Path,
    thresholds: Any,
    edge_rules: bool = True,
    precision: str | None = None,
    tagged: dict[str, Any] | None = None,
) -> dict:
    """Per language: strict and overlap F1 and the share touched on the genre passages at the language's threshold
    (``thresholds``: the checkpoint's ``TaggerConfig``); and touched per genre (a passage's genre is its file
    name's first part, ``leaflet__metformin_1``). ``tagged``: sets :func:`validation` already tagged (calibration
    tags the genre sets), reused instead of tagging them again."""
    from worker.nlp.training import predict_checkpoint

    out: dict[str, Any] = {}
    for name, docs in genre_sets().items():
        if tagged is not None and name in tagged:
            gold, scored, labels = tagged[name]
        else:
            gold, scored, labels = predict_checkpoint(
                checkpoint, docs, min_span_score=0.0, language=name[:2], edge_rules=edge_rules, precision=precision
            )
        threshold = thresholds.span_threshold(name[:2])
        pred = [s for s in scored if (s.score or 0.0) >= threshold]
        by_genre: dict[str, Any] = {}
        for genre in sorted({g.doc_id.split("__", 1)[0] for g in gold}):
            mine = [g for g in gold if g.doc_id.split("__", 1)[0] == genre]
            by_genre[genre] = round(_touched(mine, pred), 4)
        out[name] = {
            "notes": len(docs),
            "gold": len(gold),
            "min_span_score": threshold,
            **_set_scores(gold, scored, labels, threshold),
            "touched_by_genre": by_genre,
        }
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def calibrate_thresholds(tagged: dict[str, Any]) -> tuple[float, dict[str, float], dict[str, Any]]:
    """The span-score thresholds that maximise the mean over sets of overlap F1 + strict F1 (each set weighs the
    same), among ``SCORE_THRESHOLDS`` and 0: Spanish's on the Spanish notes, and one for every other language
    on the other sets (translated and genre validation; Spanish's one-line genre notes in neither). Spanish, most
    of the training data, scores its spans higher; one threshold for all either dropped the other languages'
    mentions or let Spanish over-predict.
    Returns (the default, ``{"es": Spanish's}`` when Spanish notes were tagged, the mean score by threshold)."""
    from worker.nlp.metrics import SCORE_THRESHOLDS, evaluate

    def mean_score(names: list[str], threshold: float) -> float:
        total = 0.0
        for name in names:
            gold, scored, labels = tagged[name]
            overall = evaluate(gold, [s for s in scored if (s.score or 0.0) >= threshold], labels).overall
            total += overall.overlap_f1 + overall.strict_f1
        return total / len(names)

    candidates = sorted({0.0, *SCORE_THRESHOLDS})
    # Spanish's on its 108 notes alone: its one-line genre notes (24, session 23) would weigh as much as those.
    groups = {
        "es": [n for n in tagged if n.startswith("es") and not n.endswith("genres")],
        "*": [n for n in tagged if not n.startswith("es")],
    }
    table: dict[str, Any] = {}
    chosen: dict[str, float] = {}
    for group, names in groups.items():
        if not names:
            continue
        by_threshold = {t: mean_score(names, t) for t in candidates}
        chosen[group] = max(by_threshold, key=lambda t: (by_threshold[t], -t))
        table[group] = {str(t): round(v, 4) for t, v in by_threshold.items()}
    default = chosen.get("*", chosen.get("es", 0.0))
    return default, ({"es": chosen["es"]} if "es" in chosen and "*" in chosen else {}), table


def validation(
    checkpoint: Path,
    thresholds: Any,
    calibrate: bool = False,
    edge_rules: bool = True,
    precision: str | None = None,
    tagged_out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per set: scores at its language's threshold (``thresholds``: the checkpoint's ``TaggerConfig``) and with
    none (the notes are tagged once).

    ``calibrate``: first choose the thresholds (:func:`calibrate_thresholds`, also on the genre validation
    passages) and save them in the checkpoint's config, and in ``thresholds``; the scores are then with them.
    ``tagged_out`` receives every set tagged here (gold, scored spans, labels), for :func:`genres` to reuse.
    """
    from worker.nlp.training import predict_checkpoint, save_span_thresholds

    sets = validation_sets()
    chosen_on = {**sets, **genre_sets()} if calibrate else sets
    out: dict[str, Any] = {}
    tagged = {
        name: predict_checkpoint(
            checkpoint, docs, min_span_score=0.0, language=name[:2], edge_rules=edge_rules, precision=precision
        )
        for name, docs in chosen_on.items()
    }
    if tagged_out is not None:
        tagged_out.update(tagged)
    if calibrate:
        default, by_language, table = calibrate_thresholds(tagged)
        save_span_thresholds(checkpoint, default, by_language, "-cal")
        thresholds.set_span_threshold(default, by_language)
        out["calibrated_min_span_score"] = default
        out["calibrated_min_span_score_by_language"] = by_language
        out["mean_f1_sum_by_threshold"] = table
    for name, docs in sets.items():
        gold, scored, labels = tagged[name]
        out[name] = {"notes": len(docs), "gold": len(gold), "min_span_score": thresholds.span_threshold(name[:2])}
        for setting, threshold in (("threshold", thresholds.span_threshold(name[:2])), ("no_threshold", 0.0)):
            out[name][setting] = _set_scores(gold, scored, labels, threshold)
        print(name, out[name], file=sys.stderr, flush=True)
    return out


def bf16_record(fp32: dict[str, Any], bf16: dict[str, Any], checkpoint: Path, auto: bool) -> dict[str, Any]:
    """``extra.bf16``: per validation set, fp32's and bf16's strict and overlap F1 at the checkpoint's threshold;
    ``meets_bar`` when bf16 is within :data:`worker.nlp.quantize.ACCURACY_BAR` of fp32 on both, in every set."""
    import platform

    import torch

    from worker.nlp import quantize

    by_language: dict[str, Any] = {}
    for name, scores in fp32.items():
        if not isinstance(scores, dict) or "threshold" not in scores:
            continue
        mine = {k: scores["threshold"][k] for k in ("strict_f1", "overlap_f1")}
        theirs = {k: bf16[name]["threshold"][k] for k in ("strict_f1", "overlap_f1")}
        delta = {k: round(theirs[k] - mine[k], 4) for k in mine}
        by_language[name[:2]] = {"fp32": mine, "bf16": theirs, "delta": delta}
    meets = bool(by_language) and all(
        min(entry["delta"].values()) >= -quantize.ACCURACY_BAR for entry in by_language.values()
    )
    return {
        "method": "torch-autocast-bf16",
        "validation": "benchmarks/eval_languages.py --only val: the translated validation excerpts of six languages "
        "and, where the Spanish corpora are beside the checkout, the 108 Spanish validation notes",
        "by_language": by_language,
        "bar": quantize.ACCURACY_BAR,
        "meets_bar": meets,
        "auto": auto,
        "weights_sha256": quantize.weights_digest(checkpoint),
        "torch": torch.__version__,
        "measured_on": {"machine": platform.machine(), "bf16_isa": quantize.cpu_bf16_isa()},
    }


def _isa(record: dict[str, Any]) -> str:
    measured = record.get("measured_on", {})
    return str(measured.get("bf16_isa") or ("amx" if measured.get("amx") else "unknown"))


def merge_bf16_records(previous: dict[str, Any] | None, fresh: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``extra.bf16`` after a measurement on this CPU: bf16's rounding differs a little between
    AMX and AVX512-BF16 kernels, so a record measured on one keeps the other's as ``other_cpus`` (one entry per
    ``bf16_isa``) and ``meets_bar`` holds only when every measurement met the bar. A record of other weights is
    replaced."""
    if previous is None or previous.get("weights_sha256") != fresh["weights_sha256"]:
        return fresh
    entries = [previous, *previous.get("other_cpus", [])]
    kept = [
        {k: v for k, v in entry.items() if k in ("by_language", "meets_bar", "measured_on", "torch")}
        for entry in entries
        if _isa(entry) != _isa(fresh)
    ]
    merged = {**fresh, "other_cpus": kept} if kept else dict(fresh)
    merged["meets_bar"] = fresh["meets_bar"] and all(entry["meets_bar"] for entry in kept)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--min-span-score", type=float, default=None, help="override the checkpoint's threshold")
    parser.add_argument("--only", choices=("short", "val", "genres"), default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--calibrate", action="store_true", help="choose the threshold on the validation sets pooled and save it"
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "int8", "bf16", "auto"),
        default=None,
        help="the tagger's arithmetic (default: fp32 on a CPU, the reference; int8 scores the recorded recipe)",
    )
    parser.add_argument(
        "--no-edge-rules", action="store_true", help="the model's raw spans, without the span-edge rules (issue 15)"
    )
    parser.add_argument(
        "--record-bf16",
        choices=("yes", "no"),
        default=None,
        help="score the validation sets in fp32 and in bf16 and record the comparison in the checkpoint "
        "(extra.bf16); yes: `--precision auto` may then run bf16 on CPUs with AMX or AVX512-BF16 when it met the bar",
    )
    parser.add_argument(
        "--window-lead",
        default=None,
        help="save this window lead (every language) in the checkpoint first; '' removes it (issue 15: "
        "benchmarks/window_leads.py chooses it)",
    )
    args = parser.parse_args()

    import torch

    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    if args.window_lead is not None:
        from worker.nlp.training import save_window_leads

        save_window_leads(args.checkpoint, {"*": args.window_lead} if args.window_lead else {}, "-lead")
    tagger = ClinicalTagger.from_pretrained(args.checkpoint)
    if args.min_span_score is not None:
        tagger.config.set_span_threshold(args.min_span_score)
    result["model_revision"] = tagger.config.model_revision
    result["min_span_score"] = tagger.config.min_span_score
    result["min_span_score_by_language"] = tagger.config.min_span_score_by_language
    if args.record_bf16 is not None:
        from worker.nlp.quantize import BF16_RECORD_KEY
        from worker.nlp.tagger import CONFIG_FILE

        scored = {
            precision: validation(args.checkpoint, tagger.config, precision=precision) for precision in ("fp32", "bf16")
        }
        record = bf16_record(scored["fp32"], scored["bf16"], args.checkpoint, args.record_bf16 == "yes")
        config_file = args.checkpoint / CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8"))
        extra = config.setdefault("extra", {})
        record = merge_bf16_records(extra.get(BF16_RECORD_KEY), record)
        extra[BF16_RECORD_KEY] = record
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(record, indent=1))
        return
    tagged: dict[str, Any] = {}
    if args.only in (None, "val"):
        result["validation"] = validation(
            args.checkpoint,
            tagger.config,
            args.calibrate,
            edge_rules=not args.no_edge_rules,
            precision=args.precision,
            tagged_out=tagged,
        )
        result["min_span_score"] = tagger.config.min_span_score
        result["min_span_score_by_language"] = tagger.config.min_span_score_by_language
    if args.only in (None, "genres"):
        result["genres"] = genres(
            args.checkpoint, tagger.config, edge_rules=not args.no_edge_rules, precision=args.precision, tagged=tagged
        )
    if args.only in (None, "short"):
        pipeline = TaggerPipeline(tagger, edge_rules=not args.no_edge_rules, precision=args.precision or "fp32")
        result["short_notes"] = short_notes(pipeline)
        result["short_abbreviations"] = short_notes(pipeline, ABBREVIATIONS)
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
