"""The inference stage: one pass over a batch of notes, out-of-memory recovery, and the metrics it records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import SAMPLE_NOTES

from worker.inference import is_out_of_memory, predict_shrinking, tag_texts
from worker.metrics import BATCH_NOTES, MENTIONS, OOM_SHRINKS, TOKENS
from worker.nlp.tagger import ClinicalTagger, TaggerPipeline


@pytest.fixture()
def pipeline(tiny_tagger_path: Path) -> TaggerPipeline:
    return TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path), batch_size=8)


def _spans(results: list[list[Any]]) -> list[list[tuple[str, int, int]]]:
    return [[(s.label, s.start, s.end) for s in spans] for spans in results]


def test_out_of_memory_halves_the_windows_per_pass_until_they_fit(
    pipeline: TaggerPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [SAMPLE_NOTES[i % 3] * (1 + i % 4) for i in range(10)]
    expected = _spans(pipeline.predict(texts))
    encoder = pipeline.tagger.encoder
    real_forward = encoder.forward
    widest: list[int] = []

    def forward_with_little_memory(*args: Any, **kwargs: Any) -> Any:
        rows = kwargs["input_ids"].shape[0]
        if rows > 2:  # this "device" holds two windows at a time
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        widest.append(rows)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", forward_with_little_memory)
    before = OOM_SHRINKS._value.get()
    assert _spans(predict_shrinking(pipeline, texts)) == expected
    assert pipeline.batch_size == 2 and max(widest) == 2
    assert OOM_SHRINKS._value.get() - before == 2  # 8 -> 4 -> 2


def test_a_single_window_that_does_not_fit_is_an_error(
    pipeline: TaggerPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipeline.tagger.encoder, "forward", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        predict_shrinking(pipeline, [SAMPLE_NOTES[0]])
    assert pipeline.batch_size == 1


def test_other_errors_are_not_mistaken_for_out_of_memory(
    pipeline: TaggerPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(pipeline.tagger.encoder, "forward", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        predict_shrinking(pipeline, [SAMPLE_NOTES[0]])
    assert pipeline.batch_size == 8
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("out of memory"))


def test_a_batch_gives_each_note_what_it_gives_alone_and_counts_it(pipeline: TaggerPipeline) -> None:
    texts = list(SAMPLE_NOTES)
    alone = [tag_texts(pipeline, [text], ["es"])[0][0] for text in texts]
    batches, tokens, present = BATCH_NOTES._sum.get(), TOKENS._value.get(), MENTIONS.labels("DISEASE", "present")
    diseases = present._value.get()
    together, model = tag_texts(pipeline, texts, ["es"] * len(texts))
    assert [[(m.label, m.start, m.end, m.assertion) for m in ms] for ms in together] == [
        [(m.label, m.start, m.end, m.assertion) for m in ms] for ms in alone
    ]
    assert model.name.startswith("fhir-ner-tagger/")
    assert BATCH_NOTES._sum.get() - batches == len(texts)
    assert TOKENS._value.get() - tokens == sum(
        len(pipeline.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts
    )
    assert present._value.get() - diseases == sum(
        1 for ms in together for m in ms if m.label == "DISEASE" and m.assertion == "present"
    )
