"""The tagger's own split of the Spanish corpora, as `fhir-ner train` makes it (val_fraction 0.1, seed 0).

Shared by the benchmarks that score or calibrate a checkpoint on the validation notes it held out (and take
calibration notes from its training side only). The corpora are read from ``../shared/data/es`` beside the
repository by default, or from ``--data``; no test reads them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "es"
CORPORA = ("spaccc-train", "cardioccc-train")


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--val-fraction`` and ``--seed``, defaulting to the split training used."""
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the two corpora")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)


def load_split(data: Path = DATA, val_fraction: float = 0.1, seed: int = 0) -> Any:
    """(train documents, validation documents, validation keys), exactly as training split them."""
    from worker.nlp.training import load_corpora

    return load_corpora([data / name for name in CORPORA], val_fraction=val_fraction, seed=seed)
