"""Per-process singletons for the worker: the tagger and the mapping profile load once, lazily."""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import TYPE_CHECKING

from adapter.settings import get_settings
from mappings.profile import MappingProfile, load_profile

if TYPE_CHECKING:
    from worker.nlp.tagger import TaggerPipeline

logger = logging.getLogger("fhir_ner.worker")
_lock = threading.Lock()
_pipeline: TaggerPipeline | None = None


class ModelNotConfiguredError(RuntimeError):
    """No tagger checkpoint is configured or shipped yet."""


def get_pipeline() -> TaggerPipeline:
    """Load the tagger on first use in this process (never at import), then reuse it."""
    global _pipeline
    if _pipeline is None:
        with _lock:
            if _pipeline is None:
                from worker.nlp.tagger import ClinicalTagger, TaggerPipeline

                settings = get_settings()
                if not settings.model_path:
                    raise ModelNotConfiguredError(
                        "no tagger checkpoint configured: set FHIR_NER_MODEL_PATH to a checkpoint folder"
                    )
                tagger = ClinicalTagger.from_pretrained(settings.model_path, cache_dir=settings.cache_dir)
                _pipeline = TaggerPipeline(
                    tagger, batch_size=settings.inference_batch_size, threads=settings.torch_threads
                )
                logger.info("tagger loaded", extra={"model": tagger.config.encoder})
    return _pipeline


def reset_pipeline() -> None:
    global _pipeline
    _pipeline = None
    get_profile.cache_clear()


@lru_cache(maxsize=1)
def get_profile() -> MappingProfile:
    return load_profile(get_settings().mapping_profile)
