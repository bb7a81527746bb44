"""One inference pass over a batch of notes, with out-of-memory recovery.

All windows of all the notes go through the tagger together, sorted by length into forward passes of
``pipeline.batch_size`` windows (so short notes never pad to long ones). When a pass runs out of memory
the windows per pass are halved and the batch is tagged again; the smaller size stays for the life of the
worker process, since the memory that was missing will be missing next time too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mappings.bundle import ModelInfo
from mappings.mentions import Mention

if TYPE_CHECKING:
    from worker.nlp.tagger import TaggedSpan, TaggerPipeline

logger = logging.getLogger("fhir_ner.worker")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, a CPU allocator failure, or Python's MemoryError."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def predict_shrinking(
    pipeline: TaggerPipeline, texts: Sequence[str], languages: Sequence[str | None] | None = None
) -> list[list[TaggedSpan]]:
    """``pipeline.predict(texts, languages)``, halving its windows per pass on out-of-memory until one window fails."""
    from worker.metrics import OOM_SHRINKS

    while True:
        try:
            return pipeline.predict(texts, languages)
        except Exception as error:
            if not is_out_of_memory(error) or pipeline.batch_size <= 1:
                raise
            pipeline.batch_size = max(1, pipeline.batch_size // 2)
            OOM_SHRINKS.inc()
            logger.warning("out of memory: windows per pass now %d", pipeline.batch_size)
            _release_memory()


def tag_texts(
    pipeline: TaggerPipeline, texts: Sequence[str], languages: Sequence[str | None]
) -> tuple[list[list[Mention]], ModelInfo]:
    """Mentions (with assertions) of each text, from one batched pass; records the worker's metrics."""
    from worker.metrics import BATCH_NOTES, INFERENCE_SECONDS, MENTIONS, TOKENS
    from worker.nlp.assertion import default_detector

    started = time.perf_counter()
    tokens_before = pipeline.stats["tokens"]
    spans = predict_shrinking(pipeline, texts, languages)  # the language picks the span-edge rules
    detector = default_detector()
    results: list[list[Mention]] = []
    for text, language, found in zip(texts, languages, spans, strict=True):
        mentions = [Mention(s.label, s.start, s.end, text[s.start : s.end], s.score) for s in found]
        mentions = detector.annotate(text, mentions, language)
        for mention in mentions:
            MENTIONS.labels(mention.label, mention.assertion).inc()
        results.append(mentions)
    BATCH_NOTES.observe(len(texts))
    INFERENCE_SECONDS.observe(time.perf_counter() - started)
    TOKENS.inc(pipeline.stats["tokens"] - tokens_before)
    name, revision = pipeline.tagger.model_info()
    return results, ModelInfo(name, revision)
