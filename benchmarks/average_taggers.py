"""Average two taggers' weights (a "model soup"): ``--weight`` of the second, the rest of the first.

Both must share an encoder and a head (one warm-started from the other, as the default's stages are). The result
has the second's layout and config (its threshold too; re-calibrate with ``eval_languages.py --calibrate``):

    mkdir -p /tmp/prev && for f in model.safetensors tagger_config.json; do
        git show f03ae03^:worker/models/default/$f > /tmp/prev/$f; done
    .venv/bin/python benchmarks/average_taggers.py --first /tmp/prev --second worker/models/default \\
        --weight 0.5 --output /tmp/soup
    .venv/bin/python benchmarks/eval_languages.py --checkpoint /tmp/soup --only val
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=Path, required=True)
    parser.add_argument("--second", type=Path, required=True)
    parser.add_argument("--weight", type=float, default=0.5, help="the second's share")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    from safetensors.torch import load_file, save_file

    from worker.nlp.tagger import CONFIG_FILE, WEIGHTS_FILE, ClinicalTagger

    # Full state dicts: a checkpoint that saved only its trained layers gets the base encoder's for the others.
    first = ClinicalTagger.from_pretrained(args.first).state_dict()
    second = ClinicalTagger.from_pretrained(args.second).state_dict()
    stored = load_file(str(args.second / WEIGHTS_FILE))
    averaged = {
        name: (args.weight * second[name].float() + (1 - args.weight) * first[name].float())
        .to(tensor.dtype)
        .contiguous()
        for name, tensor in stored.items()
    }
    args.output.mkdir(parents=True, exist_ok=True)
    save_file(averaged, str(args.output / WEIGHTS_FILE), metadata={"format": "pt"})
    config = json.loads((args.second / CONFIG_FILE).read_text(encoding="utf-8"))
    config["model_revision"] = f"{config.get('model_revision') or 'tagger'}-avg{args.weight:g}"
    (args.output / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {len(averaged)} tensors, {args.weight:g} of {args.second}")


if __name__ == "__main__":
    main()
