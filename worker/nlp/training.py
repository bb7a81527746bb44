"""Train the clinical NER tagger from annotated notes: the library behind ``fhir-ner train``.

Two recipes, picked by ``frozen_layers``:

* **cached** (``frozen_layers > 0``, the CPU default): the lower encoder layers stay frozen, so their
  outputs are computed once per training window and kept (float16, on disk under the work folder);
  each epoch then runs only the top layers + CNN head. On a 2-core CPU this is what makes training
  the default model take minutes per epoch instead of hours. The checkpoint stores only the trained
  layers (``config.encoder_weights`` lists them) in float16; the base encoder comes from its name.
* **direct** (``frozen_layers == 0``, the CUDA default): full fine-tuning of encoder + head on token
  windows, bf16 autocast on GPU.

Validation notes are held out per folder by file name (``split_by_name``), scored after every epoch
with exactly the windowing/decoding of :class:`TaggerPipeline` and :func:`metrics.evaluate`; the best
epoch (overlap F1 + strict F1) is kept, training stops early after ``patience`` epochs without gain,
and ``train_state.pt`` in the work folder lets a rerun of the same command resume where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from worker.nlp.corpus import Document, Span, load_documents, split_by_name
from worker.nlp.decoding import decode_spans, merge_windows, plan_windows, spans_to_tags
from worker.nlp.encoders import DEFAULT_ENCODER, special_affixes
from worker.nlp.metrics import EvaluationReport, calibrate_min_score, evaluate, format_report, report_to_json
from worker.nlp.tagger import CONFIG_FILE, DEFAULT_LABELS, WEIGHTS_FILE, ClinicalTagger, TaggerConfig, TaggerPipeline

__all__ = [
    "CurvePoint",
    "EncoderSplit",
    "TrainConfig",
    "TrainResult",
    "data_efficiency_curve",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_corpora",
    "train",
]

logger = logging.getLogger("fhir_ner.training")

STATE_FILE = "train_state.pt"
HISTORY_FILE = "train_history.json"
IGNORE = -100


# --------------------------------------------------------------------------- configuration / results


@dataclass
class TrainConfig:
    """Everything that decides the trained weights; its fingerprint guards resuming."""

    encoder: str = DEFAULT_ENCODER
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    val_fraction: float = 0.1
    epochs: int = 3
    patience: int = 2
    seed: int = 0
    frozen_layers: int | None = None  # None: 10 on CPU (cached recipe), 0 on CUDA (full fine-tuning)
    encoder_lr: float = 3e-4
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    batch_tokens: int = 2048  # padded tokens per optimiser step
    train_window: int | None = None  # body tokens per training window; None = the encoder's limit
    train_overlap: int = 32
    train_fraction: float = 1.0  # share of the training notes used (the data-efficiency curve)
    cnn_channels: int = 256
    cnn_kernel_size: int = 5
    dropout: float = 0.1
    # Warm start: a tagger checkpoint on the same encoder whose head and trained layers seed this run
    # (for example the shipped default, to continue it on more layers or on a hospital's own notes).
    init_from: str = ""
    model_revision: str = ""
    # Sentence-start crops: for each training note, this many extra windows cut from it at a random sentence
    # boundary (1-3 sentences long). Whole-note windows always start at the note's first words, which almost
    # never hold a mention, so without crops a model learns that a window's first tokens are O and misses a
    # mention at the very start of a one-sentence note.
    crops_per_note: int = 0
    # Per-epoch share of the training windows of each group (the folder name; "crops" for the crops): 0.2
    # trains on a fresh random fifth of that folder's windows each epoch, 2.0 on each window twice. Groups
    # not named take part whole. This sets the mix of corpora (for example Spanish vs translated notes).
    group_fraction: dict[str, float] = field(default_factory=dict)
    # Full fine-tuning only (frozen_layers == 0): False keeps the embeddings (96 MB of e5-small's 118 M
    # parameters) as they are and trains the 12 layers + head (issue 15's "frozen or trained embeddings").
    train_embeddings: bool = True

    def fingerprint(self) -> str:
        data = asdict(self)
        data.pop("epochs")  # more epochs may be asked for on resume
        data.pop("patience")
        data.pop("model_revision")
        if data["train_embeddings"]:
            data.pop("train_embeddings")  # the default: fingerprints of earlier runs stay what they were
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    """What :func:`train` did: where the model is, how it scored, how long it took."""

    output: Path
    best_epoch: int
    epochs_run: int
    scores: dict[str, Any]  # report_to_json of the saved checkpoint on the validation notes
    history: list[dict[str, Any]]
    n_train_docs: int
    n_val_docs: int
    seconds: float
    recipe: str

    @property
    def overlap_f1(self) -> float:
        return float(self.scores["overall"]["overlap_f1"])

    @property
    def strict_f1(self) -> float:
        return float(self.scores["overall"]["strict_f1"])


@dataclass
class CurvePoint:
    fraction: float
    n_train_docs: int
    overlap_f1: float
    strict_f1: float
    best_epoch: int
    seconds: float


# --------------------------------------------------------------------------- data


@dataclass
class _Note:
    key: str  # folder/doc_id: unique across corpora
    text: str
    spans: list[tuple[str, int, int]]


def _folder_key(folder: Path) -> str:
    """A folder's name in document ids: ``train``/``train2``/``val`` folders are named with their parent (``en/val``
    is ``en-val``), so that the same excerpt in two languages gets two ids; the genre passages' folders
    (``genres/en/train``) are ``en-genres-train``, apart from the translated excerpts' ``en-train``."""
    if folder.name not in ("train", "train2", "val"):
        return folder.name
    if folder.parent.parent.name == "genres":
        return f"{folder.parent.name}-genres-{folder.name}"
    return f"{folder.parent.name}-{folder.name}"


def load_corpora(
    data_dirs: Sequence[Path],
    labels: Sequence[str] = DEFAULT_LABELS,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_dirs: Sequence[Path] = (),
    val_dirs: Sequence[Path] = (),
) -> tuple[list[Document], list[Document], list[str]]:
    """All folders mixed, validation held out per folder by file name; other labels dropped.

    ``data_dirs`` are split by file name; ``train_dirs`` are used whole for training and ``val_dirs``
    whole for validation. Returns (train, val, keys of val docs). Document ids are prefixed with the folder
    name (``en-train`` for ``.../en/train``) so that two corpora with a file of the same name cannot collide.
    """
    train: list[Document] = []
    val: list[Document] = []
    folders = [(Path(f), val_fraction) for f in data_dirs]
    folders += [(Path(f), 0.0) for f in train_dirs] + [(Path(f), 1.0) for f in val_dirs]
    for folder, fraction in folders:
        docs = load_documents(folder, labels=set(labels))
        renamed = [
            Document(f"{_folder_key(folder)}/{d.doc_id}", d.text, [s for s in d.spans if s.label in labels])
            for d in docs
        ]
        part_train, part_val = split_by_name(docs, fraction, seed=seed)
        val_ids = {d.doc_id for d in part_val}
        for original, doc in zip(docs, renamed, strict=True):
            (val if original.doc_id in val_ids else train).append(doc)
        logger.info("corpus %s: %d train, %d val notes", folder, len(part_train), len(part_val))
    return train, val, [d.doc_id for d in val]


def _notes(docs: Iterable[Document]) -> list[_Note]:
    return [_Note(d.doc_id, d.text, [(s.label, s.start, s.end) for s in d.spans]) for d in docs]


def _subset(docs: Sequence[Document], fraction: float, seed: int) -> list[Document]:
    """A fixed share of the notes, chosen by a hash of their names (nested: 10% ⊂ 25% ⊂ 50%)."""
    if fraction >= 1.0:
        return list(docs)
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}\x01{d.doc_id}".encode()).digest())
    return ranked[: max(1, round(len(ranked) * fraction))]


_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+(?=\S)|\n+(?=\S)")


def _crops(notes: Sequence[_Note], per_note: int, seed: int, max_sentences: int = 3) -> list[_Note]:
    """Extra training notes cut from each note at random sentence boundaries (not its first sentence).

    Each crop is 1..``max_sentences`` sentences; it keeps the spans that lie wholly inside it. Its key is
    ``crops/<note key>@<offset>``, so its group is ``crops``.
    """
    if per_note <= 0:
        return []
    rng = random.Random(seed * 7919 + 17)
    out: list[_Note] = []
    for note in notes:
        starts = [m.end() for m in _SENTENCE_END.finditer(note.text)]
        if not starts:
            continue
        bounds = [*starts, len(note.text)]
        for begin in rng.sample(range(len(starts)), min(per_note, len(starts))):
            start = bounds[begin]
            end = bounds[min(begin + rng.randint(1, max_sentences), len(bounds) - 1)]
            text = note.text[start:end].rstrip()
            end = start + len(text)
            if not text:
                continue
            spans = [(label, s - start, e - start) for label, s, e in note.spans if start <= s and e <= end]
            out.append(_Note(f"crops/{note.key}@{start}", text, spans))
    return out


def _group(key: str) -> str:
    return key.split("/", 1)[0]


def _epoch_windows(groups: Sequence[str], fraction: dict[str, float], rng: random.Random) -> list[int]:
    """The training windows of one epoch: each group's share (``group_fraction``), drawn afresh per epoch."""
    by_group: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        by_group.setdefault(group, []).append(i)
    chosen: list[int] = []
    for group in sorted(by_group):
        members = by_group[group]
        share = fraction.get(group, 1.0)
        whole, part = int(share), share - int(share)
        chosen.extend(members * whole)
        if part > 0:
            chosen.extend(rng.sample(members, max(1, round(len(members) * part))))
    return sorted(chosen)


@dataclass
class _Window:
    note: int
    start: int
    end: int
    input_ids: list[int]
    tags: np.ndarray  # [len(input_ids), n_labels], IGNORE at special tokens


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], np.ndarray]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return list(encoded["input_ids"]), np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def _windows(tokenizer: Any, notes: Sequence[_Note], labels: Sequence[str], body: int, overlap: int) -> list[_Window]:
    prefix, suffix = special_affixes(tokenizer)
    out: list[_Window] = []
    for index, note in enumerate(notes):
        ids, offsets = _tokenize(tokenizer, note.text)
        if not ids:
            continue
        tags = spans_to_tags(offsets, note.spans, labels)
        for start, end in plan_windows(len(ids), body, overlap):
            full = np.full((len(prefix) + end - start + len(suffix), len(labels)), IGNORE, dtype=np.int64)
            full[len(prefix) : len(prefix) + end - start] = tags[start:end]
            out.append(_Window(index, start, end, prefix + ids[start:end] + suffix, full))
    return out


def _batches(lengths: Sequence[int], batch_tokens: int, rng: random.Random | None) -> list[list[int]]:
    """Length-bucketed batches of about ``batch_tokens`` padded tokens; shuffled when ``rng`` is given."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _pad_tags(tags: Sequence[np.ndarray], width: int) -> torch.Tensor:
    out = torch.full((len(tags), width, tags[0].shape[1]), IGNORE, dtype=torch.long)
    for row, t in enumerate(tags):
        out[row, : len(t)] = torch.from_numpy(t)
    return out


# --------------------------------------------------------------------------- split encoder


class EncoderSplit:
    """Run a BERT-like encoder in two parts: frozen lower layers (cached) and trainable top layers.

    Works for Hugging Face encoders that expose ``embeddings`` and ``encoder.layer`` (BERT, RoBERTa,
    XLM-R, e5); ``lower(...)`` followed by ``upper(...)`` equals ``encoder(...).last_hidden_state``.
    """

    def __init__(self, encoder: nn.Module, frozen_layers: int) -> None:
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        if layers is None or not hasattr(encoder, "embeddings"):
            raise ValueError(
                f"{type(encoder).__name__}: cannot split (no embeddings/encoder.layer); use frozen_layers=0"
            )
        if not 0 < frozen_layers < len(layers):
            raise ValueError(f"frozen_layers must be within 1..{len(layers) - 1}, got {frozen_layers}")
        self.encoder = encoder
        self.layers = layers
        self.frozen = frozen_layers

    @property
    def trained_layers(self) -> list[int]:
        return list(range(self.frozen, len(self.layers)))

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        create = getattr(self.encoder, "_create_attention_masks", None)
        if create is not None:
            # A private helper whose keywords change between transformers releases (5.17: past_key_values,
            # 5.24: cache): pass the ones this release takes.
            offered = {
                "attention_mask": attention_mask,
                "encoder_attention_mask": None,
                "embedding_output": hidden,
                "encoder_hidden_states": None,
                "cache": None,
                "past_key_values": None,
                "cache_position": None,
            }
            accepted = inspect.signature(create).parameters
            return create(**{k: v for k, v in offered.items() if k in accepted})[0]
        extended = self.encoder.get_extended_attention_mask(attention_mask, attention_mask.shape)
        return extended.to(hidden.dtype)

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: Iterable[nn.Module]) -> torch.Tensor:
        mask = self._mask(hidden, attention_mask)
        for layer in layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.embeddings(input_ids=input_ids)
        return self._run(hidden, attention_mask, list(self.layers)[: self.frozen])

    def upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(hidden, attention_mask, list(self.layers)[self.frozen :])

    def set_trainable(self) -> list[nn.Parameter]:
        """Freeze everything below the split; return the parameters of the trained layers."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        for layer in list(self.layers)[self.frozen :]:
            for p in layer.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params


# --------------------------------------------------------------------------- helpers


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device) -> Any:
    """bf16 autocast: on CUDA always; on CPU where the ISA has bf16 dot products (2x on AVX512-BF16)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    from worker.nlp.quantize import cpu_has_fast_bf16

    if cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _progress(iterable: Iterable[Any], enabled: bool, **kwargs: Any) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return iterable
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def _say(message: str, progress: bool) -> None:
    logger.info(message)
    if progress:
        print(message, file=sys.stderr, flush=True)


def _data_fingerprint(data_dirs: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for folder in data_dirs:
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                digest.update(f"{file.relative_to(folder)}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _to_spans(key: str, tagged: Iterable[Any]) -> list[Span]:
    return [Span(key, s.label, s.start, s.end, score=s.score) for s in tagged]


def _gold(notes: Sequence[_Note]) -> list[Span]:
    return [Span(n.key, label, start, end) for n in notes for label, start, end in n.spans]


def _save_half(tagger: ClinicalTagger, folder: Path) -> None:
    """``save_pretrained``, then the weights rewritten in float16 (half the size; loads back into fp32)."""
    tagger.save_pretrained(folder)
    weights = folder / WEIGHTS_FILE
    state = load_file(str(weights))
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})


def _require_checkpoint(folder: Path) -> Path:
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"--init-from {folder}: not a tagger checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return folder


def _checkpoint_config(folder: Path) -> TaggerConfig:
    return TaggerConfig.from_json(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))


def _lowest_trained(config: TaggerConfig) -> int | None:
    if config.encoder_weights == "all":
        return 0
    return min(config.encoder_weights) if config.encoder_weights else None


def lowest_trained_layer(checkpoint: Path) -> int | None:
    """The lowest encoder layer a checkpoint fine-tuned (0 when it holds the whole encoder; None: head only)."""
    return _lowest_trained(_checkpoint_config(_require_checkpoint(Path(checkpoint))))


def warm_start(tagger: ClinicalTagger, checkpoint: Path, frozen_layers: int = 0) -> list[str]:
    """Load a checkpoint's head and trained encoder layers into a fresh tagger; returns what was loaded.

    The checkpoint must be built on the same encoder, labels and head shape: anything else would train
    from weights that mean something different, so it is refused with a clear error. So is a run that
    would freeze layers the checkpoint fine-tuned: the new checkpoint saves only the layers it trains, so
    those would silently fall back to the base encoder's at load time.
    """
    folder = _require_checkpoint(Path(checkpoint))
    other = _checkpoint_config(folder)
    mine = tagger.config
    for name in ("encoder", "labels", "cnn_channels", "cnn_kernel_size"):
        if getattr(other, name) != getattr(mine, name):
            raise ValueError(
                f"--init-from {folder}: its {name} is {getattr(other, name)!r}, this run's is {getattr(mine, name)!r}"
            )
    lowest = _lowest_trained(other)
    if frozen_layers > 0 and lowest is not None and lowest < frozen_layers:
        raise ValueError(
            f"--init-from {folder}: it fine-tuned encoder layers from {lowest} up, but this run freezes layers "
            f"0-{frozen_layers - 1} and would not save them; use --frozen-layers {lowest} or fewer"
        )
    state = load_file(str(folder / WEIGHTS_FILE))
    own = tagger.state_dict()
    unexpected = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if unexpected or not any(k.startswith("head.") for k in state):
        raise ValueError(f"--init-from {folder}: weights do not fit this tagger ({unexpected[:3]})")
    tagger.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    mine.window_leads = dict(other.window_leads)  # the position habit the lead corrects comes with the weights
    return sorted(state)


def export_checkpoint(src: Path, dst: Path) -> Path:
    """Copy only what a checkpoint needs (config + weights, and ``encoder/`` when self-contained)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(src / name, dst / name)
        (dst / name).chmod(0o644)  # safetensors writes 0600; a shipped model must be readable by all
    if (src / "encoder").is_dir():
        shutil.copytree(src / "encoder", dst / "encoder", dirs_exist_ok=True)
    return dst


def predict_checkpoint(
    checkpoint: Path,
    docs: Sequence[Document],
    batch_size: int = 8,
    min_span_score: float | None = None,
    precision: str | None = None,
    language: str | None = None,
    edge_rules: bool = True,
) -> tuple[list[Span], list[Span], list[str]]:
    """Gold spans, predicted spans (with scores) and labels of a saved checkpoint on notes, through the
    production inference path (TaggerPipeline); ``min_span_score`` overrides the checkpoint's threshold.
    ``precision`` defaults to the reference arithmetic: fp32 on a CPU (never a recorded int8), bf16 on a GPU.
    ``language`` (of all the notes; None: detected per note) picks the span-edge rules, ``edge_rules`` switches
    them (worker/nlp/span_edges.py)."""
    tagger = ClinicalTagger.from_pretrained(checkpoint)
    if min_span_score is not None:
        tagger.config.set_span_threshold(min_span_score)
    precision = precision or ("auto" if torch.cuda.is_available() else "fp32")
    pipeline = TaggerPipeline(tagger, batch_size=batch_size, precision=precision, edge_rules=edge_rules)
    predicted = pipeline.predict([d.text for d in docs], [language] * len(docs))
    pred = [span for d, spans in zip(docs, predicted, strict=True) for span in _to_spans(d.doc_id, spans)]
    gold = [Span(d.doc_id, s.label, s.start, s.end) for d in docs for s in d.spans]
    return gold, pred, tagger.labels


def evaluate_checkpoint(
    checkpoint: Path, docs: Sequence[Document], batch_size: int = 8, labels: Sequence[str] | None = None
) -> EvaluationReport:
    """Score a saved checkpoint on notes with the production inference path (TaggerPipeline)."""
    gold, pred, tagger_labels = predict_checkpoint(checkpoint, docs, batch_size)
    return evaluate(gold, pred, labels or tagger_labels)


def _update_config(checkpoint: Path, values: dict[str, Any], revision_suffix: str | None) -> dict[str, Any]:
    """Set ``values`` in the checkpoint's config, with ``revision_suffix`` appended to its revision once (the
    checkpoint's outputs change, so its revision must)."""
    config_file = Path(checkpoint) / CONFIG_FILE
    config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(values)
    if revision_suffix and not str(config.get("model_revision", "")).endswith(revision_suffix):
        config["model_revision"] = f"{config.get('model_revision', '')}{revision_suffix}"
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def save_window_leads(checkpoint: Path, leads: dict[str, str], revision_suffix: str | None = None) -> dict[str, Any]:
    """Write the window leads (language -> text read before a note's first token) into the config; removing them
    (``{}``) adds no suffix."""
    return _update_config(checkpoint, {"window_leads": dict(leads)}, revision_suffix if leads else None)


def save_min_span_score(checkpoint: Path, threshold: float, revision_suffix: str | None = None) -> dict[str, Any]:
    """Write the span-score threshold, for every language (per-language ones are dropped), and optionally a
    revision suffix (outputs change) into the config."""
    return save_span_thresholds(checkpoint, threshold, {}, revision_suffix)


def save_span_thresholds(
    checkpoint: Path, default: float, by_language: dict[str, float], revision_suffix: str | None = None
) -> dict[str, Any]:
    """Write the span-score threshold for every language and the per-language ones that replace it."""
    values = {"min_span_score": default, "min_span_score_by_language": dict(by_language)}
    return _update_config(checkpoint, values, revision_suffix)


def calibrate_checkpoint(
    checkpoint: Path, docs: Sequence[Document], batch_size: int = 8
) -> tuple[float, EvaluationReport]:
    """Choose the checkpoint's ``min_span_score`` on validation notes and save it in its config.

    The notes are tagged once with no threshold (production inference path); the threshold that maximises
    overlap F1 + strict F1 on them is written to ``tagger_config.json``. Returns it with its report.
    """
    gold, scored, labels = predict_checkpoint(checkpoint, docs, batch_size, min_span_score=0.0)
    threshold, report = calibrate_min_score(gold, scored, labels)
    save_min_span_score(checkpoint, threshold)
    return threshold, report


# --------------------------------------------------------------------------- validation (pipeline-identical)


class _Validator:
    """Validation windows planned exactly as TaggerPipeline plans them; scores via the same decoding."""

    def __init__(self, tagger: ClinicalTagger, notes: Sequence[_Note]) -> None:
        # Same arithmetic as TaggerPipeline.__init__ (not instantiated: on CUDA it casts the model to bf16).
        prefix, suffix = special_affixes(tagger.tokenizer)
        window = int(tagger.config.max_window_tokens or 512) - len(prefix) - len(suffix)
        overlap = tagger.config.window_overlap or max(16, window // 4)
        self.notes = list(notes)
        self.tokenized = [_tokenize(tagger.tokenizer, n.text) for n in notes]
        self.plans: list[list[tuple[int, int]]] = []
        self.windows: list[list[int]] = []
        for ids, _ in self.tokenized:
            plan = plan_windows(len(ids), window, overlap) if ids else []
            self.plans.append(plan)
            self.windows.extend(prefix + ids[s:e] + suffix for s, e in plan)
        self.prefix = len(prefix)
        self.labels = tagger.labels
        self.gold = _gold(notes)

    def score(self, window_probs: Sequence[np.ndarray], per_group: bool = False) -> Any:
        """The report over all validation notes; with ``per_group``, also one per folder: (report, {group: report})."""
        pred: list[Span] = []
        cursor = 0
        for note, (ids, offsets), plan in zip(self.notes, self.tokenized, self.plans, strict=True):
            if not plan:
                continue
            probs = [
                p[self.prefix : self.prefix + (e - s)]
                for p, (s, e) in zip(window_probs[cursor : cursor + len(plan)], plan, strict=True)
            ]
            cursor += len(plan)
            merged = merge_windows(len(ids), plan, probs)
            pred.extend(_to_spans(note.key, decode_spans(note.text, offsets, merged, self.labels)))
        report = evaluate(self.gold, pred, self.labels)
        if not per_group:
            return report
        groups = sorted({_group(n.key) for n in self.notes})
        return report, {
            g: evaluate(
                [s for s in self.gold if _group(s.doc_id) == g], [s for s in pred if _group(s.doc_id) == g], self.labels
            )
            for g in groups
        }


# --------------------------------------------------------------------------- the two recipes


class _Recipe:
    """Forward passes of one recipe: training loss on a batch of windows, probabilities for validation."""

    name = ""

    def loss(self, batch: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def train_lengths(self) -> list[int]:
        raise NotImplementedError

    def val_probs(self) -> list[np.ndarray]:
        raise NotImplementedError


def _loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    valid = tags >= 0
    return nn.functional.cross_entropy(logits[valid].float(), tags[valid])


class _CachedRecipe(_Recipe):
    """Frozen lower layers computed once (fp16), top layers + head trained on the cached states."""

    def __init__(
        self,
        tagger: ClinicalTagger,
        split: EncoderSplit,
        train_windows: list[_Window],
        val_windows: list[list[int]],
        cache_dir: Path,
        cache_key: str,
        device: torch.device,
        progress: bool,
    ) -> None:
        self.name = (
            f"cached: layers 0-{split.frozen - 1} frozen and cached, layers {split.trained_layers} + head trained"
        )
        self.tagger = tagger
        self.split = split
        self.device = device
        self.train_windows = train_windows
        pad = tagger.tokenizer.pad_token_id or 0
        self.pad_id = pad
        self.train_states = self._cache(
            [w.input_ids for w in train_windows], cache_dir / f"train-{cache_key}.pt", progress, "cache train"
        )
        self.val_windows = val_windows
        self.val_states = self._cache(val_windows, cache_dir / f"val-{cache_key}.pt", progress, "cache val")

    @torch.inference_mode()
    def _cache(self, seqs: list[list[int]], file: Path, progress: bool, desc: str) -> list[torch.Tensor]:
        if file.is_file():
            states: list[torch.Tensor] = torch.load(file, weights_only=True)
            if len(states) == len(seqs):
                return states
        self.tagger.encoder.eval()
        out: list[torch.Tensor | None] = [None] * len(seqs)
        batches = _batches([len(s) for s in seqs], 4096, None)
        for batch in _progress(batches, progress, desc=desc, unit="batch"):
            ids, mask = _pad([seqs[i] for i in batch], self.pad_id)
            with _autocast(self.device):
                hidden = self.split.lower(ids.to(self.device), mask.to(self.device))
            hidden = hidden.to(torch.float16).cpu()
            for row, i in enumerate(batch):
                out[i] = hidden[row, : len(seqs[i])].clone()
        states = [s for s in out if s is not None]
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save(states, tmp)
        tmp.replace(file)
        return states

    def _hidden(self, states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in states)
        hidden = torch.zeros((len(states), width, states[0].shape[-1]), dtype=torch.float32)
        mask = torch.zeros((len(states), width), dtype=torch.long)
        for row, s in enumerate(states):
            hidden[row, : len(s)] = s.float()
            mask[row, : len(s)] = 1
        return hidden.to(self.device), mask.to(self.device)

    def _logits(self, states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = self._hidden(states)
        # CPU: fp32 here. bf16 autocast only pays off for the cache pass; with a padding mask the
        # bf16 attention backward on CPU measured 3x slower than fp32.
        with _autocast(self.device) if self.device.type == "cuda" else nullcontext():
            top = self.split.upper(hidden, mask)
            logits = self.tagger.head(top, mask)
        return logits, mask

    def train_lengths(self) -> list[int]:
        return [len(w.input_ids) for w in self.train_windows]

    def loss(self, batch: list[int]) -> torch.Tensor:
        logits, mask = self._logits([self.train_states[i] for i in batch])
        tags = _pad_tags([self.train_windows[i].tags for i in batch], mask.shape[1]).to(self.device)
        return _loss(logits, tags)

    @torch.inference_mode()
    def val_probs(self) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(self.val_states)
        for batch in _batches([len(s) for s in self.val_states], 4096, None):
            logits, _ = self._logits([self.val_states[i] for i in batch])
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            for row, i in enumerate(batch):
                out[i] = probs[row, : len(self.val_states[i])]
        return [p for p in out if p is not None]


class _DirectRecipe(_Recipe):
    """Full fine-tuning of encoder + head on token windows (the GPU path)."""

    name = "direct: full fine-tuning of encoder + head"

    def __init__(
        self, tagger: ClinicalTagger, train_windows: list[_Window], val_windows: list[list[int]], device: torch.device
    ) -> None:
        self.tagger = tagger
        self.train_windows = train_windows
        self.val_windows = val_windows
        self.device = device
        self.pad_id = tagger.tokenizer.pad_token_id or 0

    def train_lengths(self) -> list[int]:
        return [len(w.input_ids) for w in self.train_windows]

    def loss(self, batch: list[int]) -> torch.Tensor:
        ids, mask = _pad([self.train_windows[i].input_ids for i in batch], self.pad_id)
        tags = _pad_tags([self.train_windows[i].tags for i in batch], ids.shape[1])
        with _autocast(self.device):
            logits, _ = self.tagger(ids.to(self.device), mask.to(self.device))
        return _loss(logits, tags.to(self.device))

    @torch.inference_mode()
    def val_probs(self) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(self.val_windows)
        for batch in _batches([len(s) for s in self.val_windows], 4096, None):
            ids, mask = _pad([self.val_windows[i] for i in batch], self.pad_id)
            with _autocast(self.device):
                logits, _ = self.tagger(ids.to(self.device), mask.to(self.device))
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            for row, i in enumerate(batch):
                out[i] = probs[row, : len(self.val_windows[i])]
        return [p for p in out if p is not None]


# --------------------------------------------------------------------------- training


def _schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _trainable_state(tagger: ClinicalTagger) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tagger.named_parameters() if v.requires_grad}


def _summary(report: EvaluationReport) -> str:
    per = "  ".join(f"{label} {s.strict_f1:.3f}/{s.overlap_f1:.3f}" for label, s in report.per_label.items())
    return f"strict F1 {report.overall.strict_f1:.4f}  overlap F1 {report.overall.overlap_f1:.4f}  ({per})"


def train(
    data_dirs: Sequence[Path],
    output: Path,
    encoder: str = DEFAULT_ENCODER,
    val_fraction: float = 0.1,
    epochs: int = 3,
    seed: int = 0,
    curve: bool = False,
    progress: bool = True,
    *,
    frozen_layers: int | None = None,
    init_from: Path | None = None,
    patience: int = 2,
    work_dir: Path | None = None,
    threads: int | None = None,
    model_revision: str = "",
    config: TrainConfig | None = None,
    max_train_windows: int | None = None,
    train_dirs: Sequence[Path] = (),
    val_dirs: Sequence[Path] = (),
    cache_dir: Path | None = None,
    calibrate: bool = True,
) -> TrainResult:
    """Train a tagger on annotated folders and save the best epoch's checkpoint to ``output``.

    ``work_dir`` (default: ``output``) holds ``train_state.pt`` and the layer cache; rerunning the same
    call resumes from it. ``curve=True`` also runs :func:`data_efficiency_curve` into ``output/curve``.
    ``config`` overrides all the keyword hyper-parameters at once. ``max_train_windows`` caps the
    training windows (smoke tests and throughput measurements). ``train_dirs`` / ``val_dirs`` are folders
    used whole for training / validation (``data_dirs`` are split by file name); ``cache_dir`` (default:
    ``work_dir/cache``) holds the cached lower-layer states, which runs on the same data can share.
    ``calibrate=False`` skips the final threshold calibration (a full pass over the validation notes); the
    scores returned are then the best epoch's, without a threshold.
    """
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    cfg = config or TrainConfig(
        encoder=encoder,
        val_fraction=val_fraction,
        epochs=epochs,
        patience=patience,
        seed=seed,
        frozen_layers=frozen_layers,
        init_from=str(init_from or ""),
        model_revision=model_revision,
    )
    if cfg.init_from:
        _require_checkpoint(Path(cfg.init_from))  # before minutes of corpus loading
    device = _device()
    if cfg.frozen_layers is None:
        cfg.frozen_layers = 0 if device.type == "cuda" else 10
        lowest = lowest_trained_layer(Path(cfg.init_from)) if cfg.init_from else None
        if lowest is not None:  # keep training every layer the warm start fine-tuned
            cfg.frozen_layers = min(cfg.frozen_layers, lowest)
    output = Path(output)
    work = Path(work_dir) if work_dir else output
    work.mkdir(parents=True, exist_ok=True)
    data_dirs = [Path(d) for d in data_dirs]
    train_dirs, val_dirs = [Path(d) for d in train_dirs], [Path(d) for d in val_dirs]
    data_print = _data_fingerprint(data_dirs) + (
        f"+{_data_fingerprint(train_dirs)}+{_data_fingerprint(val_dirs)}" if train_dirs or val_dirs else ""
    )

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    train_docs, val_docs, _ = load_corpora(data_dirs, cfg.labels, cfg.val_fraction, cfg.seed, train_dirs, val_dirs)
    train_docs = _subset(train_docs, cfg.train_fraction, cfg.seed)
    if not train_docs:
        raise ValueError("no training notes (check the folders and val_fraction)")
    _say(f"training notes: {len(train_docs)}, validation notes: {len(val_docs)}", progress)

    tagger = ClinicalTagger.from_encoder(
        cfg.encoder, cfg.labels, cnn_channels=cfg.cnn_channels, cnn_kernel_size=cfg.cnn_kernel_size, dropout=cfg.dropout
    )
    if cfg.init_from:
        loaded = warm_start(tagger, Path(cfg.init_from), cfg.frozen_layers)
        _say(f"warm start from {cfg.init_from}: {len(loaded)} tensors", progress)
    tagger.to(device)
    prefix, suffix = special_affixes(tagger.tokenizer)
    max_body = int(tagger.config.max_window_tokens or 512) - len(prefix) - len(suffix)
    body = min(cfg.train_window or max_body, max_body)
    train_notes, val_notes = _notes(train_docs), _notes(val_docs)
    crops = _crops(train_notes, cfg.crops_per_note, cfg.seed)
    if crops:
        _say(f"sentence-start crops: {len(crops)}", progress)
        train_notes += crops
    train_windows = _windows(tagger.tokenizer, train_notes, cfg.labels, body, cfg.train_overlap)
    if max_train_windows is not None:
        train_windows = train_windows[:max_train_windows]
    window_groups = [_group(train_notes[w.note].key) for w in train_windows]
    validator = _Validator(tagger, val_notes) if val_notes else None
    val_windows = validator.windows if validator else []
    n_tokens = sum(len(w.input_ids) for w in train_windows)
    _say(f"training windows: {len(train_windows)} ({n_tokens} tokens, body ≤ {body})", progress)

    recipe: _Recipe
    if cfg.frozen_layers > 0:
        split = EncoderSplit(tagger.encoder, cfg.frozen_layers)
        encoder_params = split.set_trainable()
        tagger.config.encoder_weights = split.trained_layers
        key = hashlib.sha256(
            json.dumps(
                [
                    tagger.config.encoder,
                    tagger.config.encoder_revision,
                    cfg.frozen_layers,
                    body,
                    cfg.train_overlap,
                    cfg.val_fraction,
                    cfg.seed,
                    cfg.train_fraction,
                    max_train_windows,
                    data_print,
                    *([cfg.crops_per_note] if cfg.crops_per_note else []),
                ]
            ).encode()
        ).hexdigest()[:16]
        cache = Path(cache_dir) if cache_dir else work / "cache"
        recipe = _CachedRecipe(tagger, split, train_windows, val_windows, cache, key, device, progress)
    else:
        encoder_params = [
            p
            for name, p in tagger.encoder.named_parameters()
            if cfg.train_embeddings or not name.startswith("embeddings.")
        ]
        for p in tagger.encoder.parameters():
            p.requires_grad_(False)
        for p in encoder_params:
            p.requires_grad_(True)
        # With the embeddings frozen the checkpoint holds only the layers (the embeddings come from the base
        # encoder, as in the cached recipe): 42 MB for e5-small's twelve in float16 instead of the whole encoder.
        layers = getattr(getattr(tagger.encoder, "encoder", None), "layer", None)
        trained_all = cfg.train_embeddings or layers is None
        tagger.config.encoder_weights = "all" if trained_all else list(range(len(layers)))
        recipe = _DirectRecipe(tagger, train_windows, val_windows, device)
    _say(f"recipe: {recipe.name}; device {device}; threads {torch.get_num_threads()}", progress)

    optimiser = torch.optim.AdamW(
        [
            {"params": encoder_params, "lr": cfg.encoder_lr},
            {"params": list(tagger.head.parameters()), "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    lengths = recipe.train_lengths()

    def epoch_lengths(epoch: int) -> tuple[list[int], list[int]]:
        """This epoch's windows (by group_fraction, drawn per epoch) and their lengths."""
        if not cfg.group_fraction:
            return list(range(len(lengths))), lengths
        chosen = _epoch_windows(window_groups, cfg.group_fraction, random.Random(cfg.seed * 1000 + epoch + 500))
        return chosen, [lengths[i] for i in chosen]

    steps_per_epoch = len(_batches(epoch_lengths(1)[1], cfg.batch_tokens, None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, _schedule(steps_per_epoch * cfg.epochs, cfg.warmup_fraction)
    )

    state_file = work / STATE_FILE
    fingerprint = cfg.fingerprint() + f"-{max_train_windows}-{data_print}"
    epoch0, best_score, best_epoch, bad_epochs, history = 0, -math.inf, 0, 0, []
    finished = False
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        if state.get("fingerprint") == fingerprint:
            tagger.load_state_dict(state["trainable"], strict=False)
            optimiser.load_state_dict(state["optimiser"])
            scheduler.load_state_dict(state["scheduler"])
            epoch0, best_score, best_epoch = state["epoch"], state["best_score"], state["best_epoch"]
            bad_epochs, history, finished = state["bad_epochs"], state["history"], state["finished"]
            random.setstate(state["python_rng"])
            torch.set_rng_state(state["torch_rng"])
            _say(f"resuming after epoch {epoch0} (best so far: epoch {best_epoch})", progress)
        else:
            _say(f"{state_file} belongs to another configuration: starting afresh", progress)

    for epoch in range(epoch0 + 1, cfg.epochs + 1):
        if finished:
            break
        tagger.train()
        if cfg.frozen_layers > 0:  # the frozen part runs without dropout, as when it was cached
            tagger.encoder.eval()
            for layer in list(tagger.encoder.encoder.layer)[cfg.frozen_layers :]:
                layer.train()
        rng = random.Random(cfg.seed * 1000 + epoch)
        chosen, chosen_lengths = epoch_lengths(epoch)
        batches = [[chosen[i] for i in batch] for batch in _batches(chosen_lengths, cfg.batch_tokens, rng)]
        epoch_tokens = sum(chosen_lengths)
        epoch_started = time.perf_counter()
        losses: list[float] = []
        bar = _progress(batches, progress, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch")
        for batch in bar:
            optimiser.zero_grad(set_to_none=True)
            loss = recipe.loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimiser.param_groups for p in g["params"]], 1.0)
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if progress and hasattr(bar, "set_postfix") and len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        train_seconds = time.perf_counter() - epoch_started
        tagger.eval()
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else math.nan,
            "train_seconds": round(train_seconds, 1),
            "tokens_per_second": round(epoch_tokens / max(train_seconds, 1e-9), 1),
        }
        if validator is not None:
            report, groups = validator.score(recipe.val_probs(), per_group=True)
            score = report.overall.overlap_f1 + report.overall.strict_f1
            record["val"] = report_to_json(report)
            _say(f"epoch {epoch}: loss {record['loss']:.4f}  val {_summary(report)}", progress)
            if len(groups) > 1:
                record["val_groups"] = {g: report_to_json(r)["overall"] for g, r in groups.items()}
                for g, r in groups.items():
                    _say(f"  {g}: strict F1 {r.overall.strict_f1:.3f}  overlap F1 {r.overall.overlap_f1:.3f}", progress)
        else:
            score = -record["loss"]
            _say(f"epoch {epoch}: loss {record['loss']:.4f} (no validation notes)", progress)
        history.append(record)
        if score > best_score:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            tagger.config.model_revision = cfg.model_revision or f"trained-{time.strftime('%Y%m%d')}"
            facts = _card_facts(cfg, len(train_docs), len(val_docs), epoch, recipe.name, device)
            tagger.config.extra = {"training": facts}
            _save_half(tagger, output)
        else:
            bad_epochs += 1
        finished = bad_epochs >= cfg.patience  # a rerun with more epochs continues a run that hit the limit
        torch.save(
            {
                "fingerprint": fingerprint,
                "trainable": _trainable_state(tagger),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "history": history,
                "finished": finished,
                "python_rng": random.getstate(),
                "torch_rng": torch.get_rng_state(),
            },
            state_file.with_suffix(".tmp"),
        )
        state_file.with_suffix(".tmp").replace(state_file)
        (work / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
        if bad_epochs >= cfg.patience:
            _say(f"early stop: no gain for {cfg.patience} epochs (best epoch {best_epoch})", progress)
            break

    if not (output / WEIGHTS_FILE).is_file():
        raise RuntimeError(f"training ended without a checkpoint in {output}")
    if val_docs and not calibrate:
        scores = next(h["val"] for h in history if h["epoch"] == best_epoch)
    elif val_docs:
        threshold, final = calibrate_checkpoint(output, val_docs)
        _say(
            f"validation (saved checkpoint, TaggerPipeline, spans scoring >= {threshold}):\n" + format_report(final),
            progress,
        )
        scores = report_to_json(final)
    else:
        scores = {"overall": {"overlap_f1": math.nan, "strict_f1": math.nan}, "per_label": {}}
    result = TrainResult(
        output=output,
        best_epoch=best_epoch,
        epochs_run=len(history),
        scores=scores,
        history=history,
        n_train_docs=len(train_docs),
        n_val_docs=len(val_docs),
        seconds=round(time.perf_counter() - started, 1),
        recipe=recipe.name,
    )
    if curve:
        data_efficiency_curve(data_dirs, output / "curve", config=cfg, progress=progress, work_dir=work / "curve")
    return result


def _card_facts(
    cfg: TrainConfig, n_train: int, n_val: int, epoch: int, recipe: str, device: torch.device
) -> dict[str, Any]:
    return {
        "recipe": recipe,
        "epoch": epoch,
        "n_train_docs": n_train,
        "n_val_docs": n_val,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "encoder_lr": cfg.encoder_lr,
        "head_lr": cfg.head_lr,
        "frozen_layers": cfg.frozen_layers,
        "init_from": Path(cfg.init_from).name if cfg.init_from else "",
        "batch_tokens": cfg.batch_tokens,
        **({"crops_per_note": cfg.crops_per_note} if cfg.crops_per_note else {}),
        **({"group_fraction": cfg.group_fraction} if cfg.group_fraction else {}),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


# --------------------------------------------------------------------------- data-efficiency curve


def data_efficiency_curve(
    data_dirs: Sequence[Path],
    output: Path,
    fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    config: TrainConfig | None = None,
    progress: bool = True,
    work_dir: Path | None = None,
    **train_kwargs: Any,
) -> list[CurvePoint]:
    """Validation F1 against the number of training notes: one training run per share of the notes.

    The validation notes are the same for every point, and the training subsets are nested. Writes
    ``curve.csv`` and (with matplotlib) ``curve.png`` into ``output``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else output
    base = config or TrainConfig()
    points: list[CurvePoint] = []
    for fraction in fractions:
        cfg = TrainConfig(**{**asdict(base), "train_fraction": float(fraction)})
        tag = f"{int(round(fraction * 100)):03d}"
        result = train(
            data_dirs,
            output / f"model-{tag}",
            config=cfg,
            progress=progress,
            work_dir=work / f"work-{tag}",
            **train_kwargs,
        )
        points.append(
            CurvePoint(
                fraction, result.n_train_docs, result.overlap_f1, result.strict_f1, result.best_epoch, result.seconds
            )
        )
        _write_curve(points, output)
    return points


def _write_curve(points: Sequence[CurvePoint], output: Path) -> None:
    with (output / "curve.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fraction", "n_train_docs", "overlap_f1", "strict_f1", "best_epoch", "seconds"])
        for p in points:
            writer.writerow(
                [p.fraction, p.n_train_docs, f"{p.overlap_f1:.4f}", f"{p.strict_f1:.4f}", p.best_epoch, p.seconds]
            )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: wrote curve.csv only")
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    xs = [p.n_train_docs for p in points]
    axis.plot(xs, [p.overlap_f1 for p in points], marker="o", label="overlap F1")
    axis.plot(xs, [p.strict_f1 for p in points], marker="s", label="strict F1")
    axis.set_xlabel("training notes")
    axis.set_ylabel("validation F1")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output / "curve.png", dpi=120)
    plt.close(figure)
