"""The clinical NER tagger: a Hugging Face encoder, the paper's two-layer CNN head, one O/B/I classifier per type.

One classifier per entity type (rather than one BIO sequence) lets spans of different types overlap,
as about 12% of the Spanish training spans do.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from worker.nlp.decoding import TaggedSpan, decode_spans, merge_windows, plan_windows
from worker.nlp.encoders import (
    ResolvedEncoder,
    load_encoder,
    load_encoder_skeleton,
    max_window_tokens,
    resolve_encoder,
    special_affixes,
)
from worker.nlp.span_edges import apply_edge_rules, default_edge_rules

logger = logging.getLogger("fhir_ner.tagger")

DEFAULT_LABELS = ("DISEASE", "SYMPTOM", "PROCEDURE")
PRECISIONS = ("auto", "fp32", "int8", "bf16")
CONFIG_FILE = "tagger_config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A tagger checkpoint that is missing or does not fit its encoder."""


@dataclass
class TaggerConfig:
    encoder: str
    encoder_revision: str = ""
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    cnn_channels: int = 256
    cnn_kernel_size: int = 5
    dropout: float = 0.1
    max_window_tokens: int | None = None
    window_overlap: int | None = None
    # Which encoder weights the checkpoint carries: "all", "none", or the trained layer indices.
    encoder_weights: str | list[int] = "all"
    model_revision: str = ""
    # Spans whose confidence (mean inside-probability) is lower are dropped. `fhir-ner train` calibrates it
    # on the validation notes: the tagger over-predicts, and this trades recall for precision where F1 gains.
    min_span_score: float = 0.0
    # Per-language thresholds that replace ``min_span_score`` for notes in that language (BCP 47 primary subtag):
    # Spanish, the language most of the training notes are in, scores its spans higher than the other six
    # (issue 15), so one threshold for all either drops the others' mentions or lets Spanish over-predict.
    min_span_score_by_language: dict[str, float] = field(default_factory=dict)
    # Text read before a note's first token, per language ("*": any other), and dropped from the output: the
    # model is unsure of mentions in a window's first words, which a one-sentence note is made of (issue 15).
    window_leads: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaggerConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def span_threshold(self, language: str | None) -> float:
        """The span-score threshold for a note in ``language`` (its own, else ``min_span_score``)."""
        return self.min_span_score_by_language.get(language or "", self.min_span_score)

    def set_span_threshold(self, threshold: float, by_language: dict[str, float] | None = None) -> None:
        """``threshold`` for every language but those of ``by_language`` (none: one threshold for all, as scoring
        paths that tag with none need)."""
        self.min_span_score = threshold
        self.min_span_score_by_language = dict(by_language or {})


class CnnTaggingHead(nn.Module):
    """Two 1-D convolutions over the token states (sharper span boundaries), then per-type O/B/I logits."""

    def __init__(self, hidden_size: int, n_labels: int, channels: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv1d(hidden_size, channels, kernel_size, padding=padding)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding=padding)
        self.activation = nn.GELU()
        self.classifier = nn.Linear(channels + hidden_size, n_labels * 3)
        self.n_labels = n_labels

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        states = self.dropout(hidden * keep)  # padding must not leak into neighbours through the kernel
        x = self.activation(self.conv1(states.transpose(1, 2)))
        x = self.activation(self.conv2(self.dropout(x) * keep.transpose(1, 2)))
        features = torch.cat([x.transpose(1, 2), states], dim=-1)
        logits = self.classifier(self.dropout(features))
        return logits.view(hidden.shape[0], hidden.shape[1], self.n_labels, 3)


class ClinicalTagger(nn.Module):
    def __init__(self, config: TaggerConfig, encoder: Any, tokenizer: Any) -> None:
        super().__init__()
        self.config = config
        self.encoder: Any = encoder
        self.tokenizer = tokenizer
        self.source: Path | None = None  # the checkpoint folder it was loaded from (keys the int8 cache)
        hidden = int(encoder.config.hidden_size)
        self.head = CnnTaggingHead(
            hidden, len(config.labels), config.cnn_channels, config.cnn_kernel_size, config.dropout
        )
        if config.max_window_tokens is None:
            config.max_window_tokens = max_window_tokens(encoder.config, tokenizer)

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_encoder(
        cls, encoder: str, labels: Sequence[str] = DEFAULT_LABELS, cache_dir: Path | None = None, **head: Any
    ) -> ClinicalTagger:
        """A new tagger (untrained head) on top of any encoder."""
        resolved = resolve_encoder(encoder, cache_dir)
        model, tokenizer = load_encoder(resolved)
        config = TaggerConfig(encoder=resolved.name, encoder_revision=resolved.revision, labels=list(labels), **head)
        tagger = cls(config, model, tokenizer)
        return tagger

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, cache_dir: Path | None = None) -> ClinicalTagger:
        folder = Path(checkpoint)
        config_file = folder / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(f"no tagger checkpoint at {folder} (missing {CONFIG_FILE})")
        config = TaggerConfig.from_json(json.loads(config_file.read_text(encoding="utf-8")))
        if config.encoder_weights == "all" and (folder / "encoder").is_dir():
            # Self-contained checkpoint: encoder architecture and tokenizer here, weights in the safetensors.
            resolved = ResolvedEncoder(config.encoder, str(folder / "encoder"), config.encoder_revision)
            model, tokenizer = load_encoder_skeleton(resolved)
        else:
            resolved = resolve_encoder(config.encoder, cache_dir)
            if config.encoder_revision and resolved.revision != config.encoder_revision:
                logger.warning(
                    "encoder revision differs from the checkpoint's",
                    extra={"expected": config.encoder_revision, "found": resolved.revision},
                )
            model, tokenizer = load_encoder(resolved)
        tagger = cls(config, model, tokenizer)
        state = load_file(str(folder / WEIGHTS_FILE))
        missing, unexpected = tagger.load_state_dict(state, strict=False)
        missing_head = [k for k in missing if k.startswith("head.")]
        if config.encoder_weights == "all":
            missing_head += [k for k in missing if k.startswith("encoder.")]
        elif isinstance(config.encoder_weights, list):
            # The trained layers must really be in the file, or the model would silently run on base weights.
            prefixes = tuple(f"encoder.encoder.layer.{i}." for i in config.encoder_weights)
            missing_head += [k for k in missing if k.startswith(prefixes)]
        if missing_head or unexpected:
            raise CheckpointError(
                f"checkpoint {folder} does not fit: missing {missing_head[:3]}, unexpected {unexpected[:3]}"
            )
        tagger.eval()
        tagger.source = folder
        return tagger

    def save_pretrained(self, folder: str | Path) -> None:
        """Config + safetensors; the encoder part holds only what ``encoder_weights`` says was trained."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        selection = self.config.encoder_weights
        if selection == "none":
            state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        elif isinstance(selection, list):
            prefixes = tuple(f"encoder.encoder.layer.{i}." for i in selection)
            state = {k: v for k, v in state.items() if not k.startswith("encoder.") or k.startswith(prefixes)}
        else:
            encoder_folder = out / "encoder"
            self.encoder.config.save_pretrained(encoder_folder)
            self.tokenizer.save_pretrained(encoder_folder)
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8")

    # --- forward ----------------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tags: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(hidden, attention_mask)
        loss = None
        if tags is not None:
            valid = tags >= 0
            loss = nn.functional.cross_entropy(logits[valid].float(), tags[valid])
        return logits, loss

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def model_info(self) -> tuple[str, str]:
        revision = self.config.model_revision or f"untrained@{self.config.encoder_revision}"
        return f"fhir-ner-tagger/{self.config.encoder}", revision


def _cpu_auto_precision(tagger: ClinicalTagger) -> str:
    """int8 where the checkpoint validated it; else bf16 where it validated bf16 and the CPU runs bf16 natively
    (AMX or AVX512-BF16); else fp32."""
    from worker.nlp.quantize import bf16_validated, cpu_has_fast_bf16, int8_validated

    if int8_validated(tagger):
        return "int8"
    if cpu_has_fast_bf16() and bf16_validated(tagger):
        return "bf16"
    return "fp32"


@dataclass
class _Window:
    doc: int
    start: int
    end: int
    input_ids: list[int]
    lead: int = 0  # lead tokens after the prefix, whose probabilities are dropped


class TaggerPipeline:
    """Batched, windowed inference over whole notes; offsets come straight from the tokenizer.

    ``precision``: "auto" runs bf16 on GPUs; on CPUs it runs int8 when the checkpoint records that its int8
    model met the accuracy bar on its validation notes (worker/nlp/quantize.py), else bf16 when the CPU runs bf16
    natively (AMX or AVX512-BF16) and the checkpoint records that bf16 met the bar in every language, else fp32.
    "int8" runs the tagger as an int8 ONNX Runtime graph, exported once per checkpoint into ``cache_dir``; the
    pipeline then frees the tagger's own weights (it keeps its tokenizer and config).
    The pipeline moves the tagger to its device; build it around a model that is not being trained.
    """

    def __init__(
        self,
        tagger: ClinicalTagger,
        device: str | None = None,
        batch_size: int = 8,
        threads: int | None = None,
        precision: str = "auto",
        cache_dir: Path | None = None,
        edge_rules: bool = True,
        leads: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tagger = tagger.to(self.device).eval()
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else _cpu_auto_precision(tagger)
        if precision == "int8" and self.device.type != "cpu":
            raise ValueError("int8 runs on CPUs (ONNX Runtime); use bf16 on a GPU")
        self.precision = precision
        self.tokenizer = tagger.tokenizer
        self.batch_size = batch_size
        self.prefix_ids, self.suffix_ids = special_affixes(self.tokenizer)
        specials = len(self.prefix_ids) + len(self.suffix_ids)
        # The checkpoint's window leads, tokenised once; every window leaves room for the longest.
        self.leads: dict[str, list[int]] = {}
        if leads:
            for language, lead in tagger.config.window_leads.items():
                self.leads[language] = list(self.tokenizer(lead, add_special_tokens=False)["input_ids"])
        specials += max((len(ids) for ids in self.leads.values()), default=0)
        self.window = int(tagger.config.max_window_tokens or 512) - specials
        self.overlap = tagger.config.window_overlap or max(16, self.window // 4)
        self.stats = {"tokens": 0, "windows": 0, "seconds": 0.0}
        # Span-edge rules per language (worker/nlp/span_edges.py); False gives the model's raw spans.
        self.edge_rules = edge_rules
        # (ids, mask) -> logits: the tagger itself, or an ONNX Runtime session for int8 (worker/nlp/quantize.py).
        self.runner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._torch_forward
        if precision == "int8":
            from worker.nlp.quantize import OnnxRunner, int8_model_path, release_weights

            path = int8_model_path(tagger, cache_dir)
            release_weights(self.tagger)  # before the session exists, so the two never sit in memory together
            # Row by row: a note's spans must not depend on the notes batched with it (dynamic int8's scales).
            self.runner = OnnxRunner(path, threads or torch.get_num_threads(), rowwise=True)

    def _torch_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits, _ = self.tagger(input_ids, attention_mask)
        return logits

    def _tokenize(self, text: str) -> tuple[list[int], np.ndarray]:
        encoded = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False, verbose=False
        )
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return list(encoded["input_ids"]), offsets

    def _language(self, text: str, language: str | None) -> str | None:
        """The note's language: the one given, else detected from its text (picks edge rules and lead)."""
        if not self.edge_rules and not self.leads:
            return language
        from worker.nlp.assertion import default_detector

        return default_detector().resolve_language(language, text)

    def _lead_for(self, language: str | None) -> list[int]:
        return self.leads.get(language or "", self.leads.get("*", []))

    def predict(self, texts: Sequence[str], languages: Sequence[str | None] | None = None) -> list[list[TaggedSpan]]:
        """Spans per text; ``languages`` (BCP 47 or None per text) chooses the span-edge rules, else detected."""
        started = time.perf_counter()
        if languages is None:
            languages = [None] * len(texts)
        elif len(languages) != len(texts):
            raise ValueError("one language (or None) per text")
        tokenized = [self._tokenize(text) for text in texts]
        resolved = [self._language(text, language) for text, language in zip(texts, languages, strict=True)]
        windows: list[_Window] = []
        plans: list[list[tuple[int, int]]] = []
        for doc, (ids, _) in enumerate(tokenized):
            plan = plan_windows(len(ids), self.window, self.overlap) if ids else []
            plans.append(plan)
            for start, end in plan:
                lead = self._lead_for(resolved[doc]) if start == 0 else []
                body = ids[start:end]
                windows.append(_Window(doc, start, end, self.prefix_ids + lead + body + self.suffix_ids, len(lead)))
        probs_by_window = self._run(windows)
        results: list[list[TaggedSpan]] = []
        cursor = 0
        for doc, (text, (ids, offsets)) in enumerate(zip(texts, tokenized, strict=True)):
            plan = plans[doc]
            if not plan:
                results.append([])
                continue
            window_probs = probs_by_window[cursor : cursor + len(plan)]
            cursor += len(plan)
            merged = merge_windows(len(ids), plan, window_probs)
            min_score = self.tagger.config.span_threshold(resolved[doc])
            if self.edge_rules:
                # Rules first, threshold after: a joined span is judged by its joined score, and scoring paths that
                # tag once with no threshold and filter later (calibration, eval_languages) see the same spans.
                spans = decode_spans(text, offsets, merged, self.tagger.labels)
                rules = default_edge_rules().get(resolved[doc] or "")
                spans = [s for s in apply_edge_rules(text, spans, rules) if s.score >= min_score]
            else:
                spans = decode_spans(text, offsets, merged, self.tagger.labels, min_score=min_score)
            results.append(spans)
            self.stats["tokens"] += len(ids)
        self.stats["windows"] += len(windows)
        self.stats["seconds"] += time.perf_counter() - started
        return results

    @torch.inference_mode()
    def _run(self, windows: list[_Window]) -> list[np.ndarray]:
        """Length-sorted batches; returns per-window [body_tokens, n_labels, 3] probabilities."""
        outputs: list[np.ndarray | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].input_ids))
        pad_id = self.tokenizer.pad_token_id or 0
        for batch_start in range(0, len(order), self.batch_size):
            batch = order[batch_start : batch_start + self.batch_size]
            width = max(len(windows[i].input_ids) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                seq = windows[index].input_ids
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = self.runner(ids.to(self.device), mask.to(self.device))
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            for row, index in enumerate(batch):
                window = windows[index]
                body = window.end - window.start
                prefix = len(self.prefix_ids) + window.lead
                outputs[index] = probs[row, prefix : prefix + body]
        return [o for o in outputs if o is not None]
