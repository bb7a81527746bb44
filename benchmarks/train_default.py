"""Rebuild the shipped default tagger (worker/models/default) from the Spanish training corpora.

    make train-default          # the shipped recipe: layers 6-11 + head; ~2 min on a GPU, ~4 h on 2 CPU cores
    .venv/bin/python benchmarks/train_default.py --stage layers6 --frozen-layers 6 --encoder-lr 2e-4 \
        --head-lr 2e-3 --batch-tokens 4096 --patience 3 --epochs 12          # the same, by hand
    make train-default-cpu      # the earlier CPU-only two-stage recipe (layers 10-11, then 8-11)
    .venv/bin/python benchmarks/train_default.py --smoke    # a few windows, checks the plumbing

Training state and the layer cache live under --work (default /tmp/fhir-ner-train-default), so an
interrupted run resumes when the same command is run again; only tagger_config.json and
model.safetensors are copied into the repository (unless --no-export).

The corpora, spaccc-train/ and cardioccc-train/ (BRAT .txt + .ann), are read from ../shared/data/es beside the
checkout, or from --data DIR. Only the training recipes read them; the tests and the demo do not need them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.nlp.training import TrainConfig, export_checkpoint, train  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "es"
MISSING_DATA = (
    "the Spanish training corpora are not at {path}: put the folders spaccc-train/ and cardioccc-train/ "
    "(the MultiClinNER Spanish training data, BRAT .txt + .ann) there, or pass --data DIR"
)
CORPORA = ("spaccc-train", "cardioccc-train")
TRANSLATED = ROOT / "worker" / "nlp" / "data" / "translated"
GENRES = ROOT / "worker" / "nlp" / "data" / "genres"
LANGUAGES = ("en", "it", "nl", "ro", "sv", "cs")


def _mix(text: str) -> dict[str, float]:
    """``spaccc-train=0.15,cardioccc-train=0.15`` -> per-epoch share of each group's training windows."""
    pairs = (item.split("=") for item in text.split(",") if item.strip())
    return {name.strip(): float(value) for name, value in pairs}


def genre_subset(folder: Path, kinds: list[str], root: Path) -> Path:
    """``genres/<lang>/<split>`` holding only the passages of ``kinds`` (a passage's file name starts with its genre,
    ``brief__copd_1.txt``): links to them in ``root/genres/<lang>/<split>``, a folder of the same last three names,
    so its documents keep their ids and mix group (``<lang>-genres-<split>``)."""
    subset = root / "genres" / folder.parent.name / folder.name
    if subset.is_dir():
        for old in subset.iterdir():
            old.unlink()
    subset.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.glob("*")):
        if file.name.split("__", 1)[0] in kinds:
            (subset / file.name).symlink_to(file.resolve())
    return subset


def _revision(config: TrainConfig, prefix: str = "es") -> str:
    """<es|mul>-e5small-<date>-<hash of the recipe and the code revision>."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    digest = hashlib.sha256((config.fingerprint() + commit).encode()).hexdigest()[:7]
    return f"{prefix}-e5small-{time.strftime('%Y%m%d')}-{digest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the two corpora")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fhir-ner-train-default"))
    parser.add_argument("--output", type=Path, default=ROOT / "worker" / "models" / "default")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--frozen-layers", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-from", type=Path, default=None, help="warm start from this checkpoint")
    parser.add_argument("--encoder-lr", type=float, default=3e-4)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per optimiser step")
    parser.add_argument("--patience", type=int, default=2, help="epochs without gain before stopping")
    parser.add_argument("--stage", default="run", help="work sub-folder (one per stage of a staged recipe)")
    parser.add_argument("--no-export", action="store_true", help="keep the checkpoint in the work folder")
    parser.add_argument("--smoke", action="store_true", help="40 training windows, 1 epoch, no export")
    parser.add_argument("--curve", action="store_true", help="also the data-efficiency curve (4 more runs)")
    parser.add_argument(
        "--translated",
        action="store_true",
        help=f"also train on {TRANSLATED.relative_to(ROOT)}/<lang>/train and validate on <lang>/val as well",
    )
    parser.add_argument("--languages", default=",".join(LANGUAGES), help="translated languages to use")
    parser.add_argument(
        "--translated-splits",
        default="train",
        help="translated training folders per language: train, or train,train2 (the excerpts of `translated_corpus.py "
        "extend`)",
    )
    parser.add_argument(
        "--genres",
        action="store_true",
        help="also train on worker/nlp/data/genres/<lang>/train (leaflets, labels, textbooks, health pages, abstracts, "
        "clinical notes; mix group <lang>-genres-train) and validate on <lang>/val as well",
    )
    parser.add_argument(
        "--genre-kinds",
        default="",
        help="with --genres: only these genres (comma-separated: leaflet,label,textbook,health,abstract,case,brief; "
        "default all). The `genres` stage of the shipped recipe predates the one-line `brief` notes (session 23)",
    )
    parser.add_argument("--crops", type=int, default=0, help="sentence-start crops per training note")
    parser.add_argument(
        "--mix", default="", help="per-epoch share of each group's windows, e.g. spaccc-train=0.15,crops=0.5"
    )
    parser.add_argument("--cache", type=Path, default=None, help="layer-cache folder (default: the stage's)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the final threshold calibration")
    parser.add_argument(
        "--frozen-embeddings",
        action="store_true",
        help="with --frozen-layers 0: train the 12 layers and the head, not the embeddings",
    )
    args = parser.parse_args(argv)
    if not all((args.data / name).is_dir() for name in CORPORA):
        raise SystemExit(MISSING_DATA.format(path=args.data))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    config = TrainConfig(
        epochs=1 if args.smoke else args.epochs,
        frozen_layers=args.frozen_layers,
        seed=0,
        encoder_lr=args.encoder_lr,
        head_lr=args.head_lr,
        init_from=str(args.init_from or ""),
        batch_tokens=args.batch_tokens,
        patience=args.patience,
        crops_per_note=args.crops,
        group_fraction=_mix(args.mix),
        train_embeddings=not args.frozen_embeddings,
    )
    if args.frozen_embeddings and args.frozen_layers != 0:
        raise SystemExit("--frozen-embeddings is for full fine-tuning (--frozen-layers 0)")
    chosen = [lang for lang in args.languages.split(",") if lang]
    languages = chosen if args.translated else []
    # Spanish genre passages (the one-line `brief` notes, session 23) where they have been built.
    spanish = ["es"] if "es" not in chosen and (GENRES / "es" / "train").is_dir() else []
    genre_languages = [*chosen, *spanish] if args.genres else []
    kinds = [kind for kind in args.genre_kinds.split(",") if kind]

    def genre_folder(lang: str, split: str) -> Path:
        return genre_subset(GENRES / lang / split, kinds, args.work / "genre-kinds") if kinds else GENRES / lang / split

    genre_train = [f for f in (genre_folder(lang, "train") for lang in genre_languages) if any(f.glob("*.txt"))]
    genre_val = [f for f in (genre_folder(lang, "val") for lang in genre_languages) if any(f.glob("*.txt"))]
    config.model_revision = _revision(config, "mul" if languages or genre_languages else "es")
    work = args.work / ("smoke" if args.smoke else args.stage)
    result = train(
        [args.data / name for name in CORPORA],
        work / "best",
        config=config,
        work_dir=work,
        curve=args.curve,
        max_train_windows=40 if args.smoke else None,
        train_dirs=[TRANSLATED / lang / split for lang in languages for split in args.translated_splits.split(",")]
        + genre_train,
        val_dirs=[TRANSLATED / lang / "val" for lang in languages] + genre_val,
        cache_dir=args.cache,
        calibrate=not args.no_calibrate,
    )
    summary = {
        "model_revision": config.model_revision,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
        "n_train_docs": result.n_train_docs,
        "n_val_docs": result.n_val_docs,
        "recipe": result.recipe,
        "overall": result.scores["overall"],
        "history": [{k: v for k, v in h.items() if k != "val"} for h in result.history],
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (work / "scores.json").write_text(json.dumps(result.scores, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=1))
    if not (args.smoke or args.no_export):
        export_checkpoint(work / "best", args.output)
        print(f"exported to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
