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
from tagger_split import add_split_arguments, load_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    add_split_arguments(parser)
    parser.add_argument("--revision-suffix", default=None, help="appended to model_revision (outputs change)")
    args = parser.parse_args()

    from worker.nlp.corpus import Span
    from worker.nlp.metrics import calibrate_min_score, evaluate, report_to_json
    from worker.nlp.training import predict_checkpoint, save_min_span_score

    _, val, _ = load_split(args.data, args.val_fraction, args.seed)
    all_gold, all_scored, labels = predict_checkpoint(args.checkpoint, val, min_span_score=0.0)

    def of(ids: list[str], spans: list[Span]) -> list[Span]:
        wanted = set(ids)
        return [span for span in spans if span.doc_id in wanted]

    ids = sorted(d.doc_id for d in val)
    halves = [ids[0::2], ids[1::2]]
    folds = []
    for chosen_on, scored_on in (halves, halves[::-1]):
        threshold, _ = calibrate_min_score(of(chosen_on, all_gold), of(chosen_on, all_scored), labels)
        kept = [s for s in of(scored_on, all_scored) if (s.score or 0.0) >= threshold]
        folds.append(
            {"threshold": threshold, **report_to_json(evaluate(of(scored_on, all_gold), kept, labels))["overall"]}
        )
    before = evaluate(all_gold, all_scored, labels)
    threshold, after = calibrate_min_score(all_gold, all_scored, labels)
    config = save_min_span_score(args.checkpoint, threshold, args.revision_suffix)
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
