"""Per-process singletons for the worker: the tagger and the mapping profile load once, lazily."""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import get_settings
from mappings.profile import MappingProfile, load_profile

if TYPE_CHECKING:
    from worker.nlp.tagger import TaggerPipeline

logger = logging.getLogger("fhir_ner.worker")
_lock = threading.Lock()
_pipeline: TaggerPipeline | None = None


class ModelNotConfiguredError(RuntimeError):
    """No tagger checkpoint is configured or shipped yet."""


def default_model_path() -> Path | None:
    """The tagger shipped inside the package (trained on the Spanish corpora, see its MODEL_CARD.md)."""
    folder = Path(str(resources.files("worker").joinpath("models/default")))
    return folder if (folder / "tagger_config.json").is_file() else None


def get_pipeline() -> TaggerPipeline:
    """Load the tagger on first use in this process (never at import), then reuse it."""
    global _pipeline
    if _pipeline is None:
        with _lock:
            if _pipeline is None:
                from worker.nlp.tagger import ClinicalTagger, TaggerPipeline

                settings = get_settings()
                checkpoint = settings.model_path or default_model_path()
                if checkpoint is None:
                    raise ModelNotConfiguredError(
                        "no tagger checkpoint: set FHIR_NER_MODEL_PATH (the default model is not installed)"
                    )
                tagger = ClinicalTagger.from_pretrained(checkpoint, cache_dir=settings.cache_dir)
                _pipeline = TaggerPipeline(
                    tagger,
                    batch_size=settings.inference_batch_size,
                    threads=settings.torch_threads,
                    precision=settings.precision,
                    cache_dir=settings.cache_dir,
                )
                logger.info("tagger loaded", extra={"model": tagger.config.encoder, "precision": _pipeline.precision})
    return _pipeline


def inference_max_notes() -> int:
    """Notes per inference pass: the setting, else 32 on a GPU and 1 on a CPU.

    Measured on the CPU (``benchmarks/bench_batching.py``): batching 16 notes ran at 0.97x the speed of one at a
    time, since a 512-token window already keeps the cores busy, while the first notes of a batch waited for
    the last. On a GPU one window leaves most of the device idle.
    """
    configured = get_settings().inference_max_notes
    return configured if configured is not None else (32 if _has_cuda() else 1)


@lru_cache(maxsize=1)
def _has_cuda() -> bool:
    """Asked once per process: the batch size is read for every message the inference worker receives."""
    import torch

    return bool(torch.cuda.is_available())


def reset_pipeline() -> None:
    global _pipeline
    _pipeline = None
    get_profile.cache_clear()


@lru_cache(maxsize=1)
def get_profile() -> MappingProfile:
    return load_profile(get_settings().mapping_profile)
