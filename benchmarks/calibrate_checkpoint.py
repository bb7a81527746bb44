"""Calibrate a checkpoint's span-score threshold on the validation notes `fhir-ner train` held out.

`fhir-ner train` (and so `make train-default`) does this at the end of training; this script does it for a
checkpoint trained before that existed, and also reports a two-fold estimate that is not scored on the notes
the threshold was chosen on: the threshold chosen on one half of the validation notes, scored on the other.

    .venv/bin/python benchmarks/calibrate_checkpoint.py --checkpoint worker/models/default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "es"
CORPORA = ("spaccc-train", "cardioccc-train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--revision-suffix", default=None, help="appended to model_revision (outputs change)")
    args = parser.parse_args()

    from worker.nlp.corpus import Span
    from worker.nlp.metrics import calibrate_min_score, evaluate, report_to_json
    from worker.nlp.tagger import CONFIG_FILE, ClinicalTagger, TaggerPipeline
    from worker.nlp.training import _to_spans, load_corpora

    _, val, _ = load_corpora([args.data / name for name in CORPORA], val_fraction=args.val_fraction, seed=args.seed)
    tagger = ClinicalTagger.from_pretrained(args.checkpoint)
    tagger.config.min_span_score = 0.0
    predicted = TaggerPipeline(tagger).predict([d.text for d in val])
    gold = {d.doc_id: [Span(d.doc_id, s.label, s.start, s.end) for s in d.spans] for d in val}
    scored = {d.doc_id: _to_spans(d.doc_id, spans) for d, spans in zip(val, predicted, strict=True)}
    labels = tagger.labels

    def pool(ids: list[str], table: dict[str, list[Span]]) -> list[Span]:
        return [span for doc_id in ids for span in table[doc_id]]

    ids = sorted(gold)
    halves = [ids[0::2], ids[1::2]]
    folds = []
    for chosen_on, scored_on in (halves, halves[::-1]):
        threshold, _ = calibrate_min_score(pool(chosen_on, gold), pool(chosen_on, scored), labels)
        kept = [s for s in pool(scored_on, scored) if (s.score or 0.0) >= threshold]
        report = evaluate(pool(scored_on, gold), kept, labels)
        folds.append({"threshold": threshold, **report_to_json(report)["overall"]})
    before = evaluate(pool(ids, gold), pool(ids, scored), labels)
    threshold, after = calibrate_min_score(pool(ids, gold), pool(ids, scored), labels)

    config_file = args.checkpoint / CONFIG_FILE
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["min_span_score"] = threshold
    if args.revision_suffix and not config["model_revision"].endswith(args.revision_suffix):
        config["model_revision"] += args.revision_suffix
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                "validation_notes": len(ids),
                "threshold": threshold,
                "model_revision": config["model_revision"],
                "without_threshold": report_to_json(before),
                "with_threshold": report_to_json(after),
                "two_fold_held_out": folds,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
