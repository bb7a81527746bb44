"""Per-token int8 (worker/token_int8.py): near the float32 encoder, and a string's vector never depends on its batch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worker.token_int8 import TokenInt8Encoder, _int_mm_works, int_mm_pays

TEXTS = [
    "dolor torácico opresivo irradiado al brazo izquierdo",
    "acute exacerbation of chronic obstructive pulmonary disease",
    "fibrillazione atriale parossistica",
    "förmaksflimmer",
    "cukrovka druhého typu",
    "x",
]


@pytest.fixture(scope="module")
def tiny(tiny_encoder: Path) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_encoder))


def float32_vectors(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**inputs).last_hidden_state
    weights = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (states * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def int8_vectors(encoder: TokenInt8Encoder, tokenizer: Any, texts: list[str]) -> np.ndarray:
    inputs = tokenizer(texts, padding=True, return_tensors="np")
    return encoder(inputs["input_ids"].astype(np.int64), inputs["attention_mask"].astype(np.int64))


def test_per_token_int8_stays_near_float32(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    vectors = int8_vectors(TokenInt8Encoder(model), tokenizer, TEXTS)
    reference = float32_vectors(model, tokenizer, TEXTS)
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = (vectors * reference).sum(axis=1)
    assert cosine.min() > 0.995, cosine
    # The float32 model itself is unchanged (its weights were copied, not quantised in place).
    np.testing.assert_array_equal(float32_vectors(model, tokenizer, TEXTS), reference)


def test_a_strings_vector_is_the_same_alone_and_in_any_batch(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    encoder = TokenInt8Encoder(model)
    together = int8_vectors(encoder, tokenizer, TEXTS)
    for position, text in enumerate(TEXTS):
        np.testing.assert_array_equal(int8_vectors(encoder, tokenizer, [text])[0], together[position])
    # Strings of one length share an attention call (here the same string twice), longer ones pad the batch.
    shuffled = int8_vectors(encoder, tokenizer, [*TEXTS[::-1], "a much longer string than any of the others", TEXTS[2]])
    np.testing.assert_array_equal(shuffled[: len(TEXTS)][::-1], together)
    np.testing.assert_array_equal(shuffled[-1], together[2])


def test_without_int_mm_the_same_integers_are_multiplied_in_float32(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    assert _int_mm_works()  # this PyTorch has the CPU operator
    exact = TokenInt8Encoder(model)
    exact.exact_int_mm = True  # whatever this CPU's speed: the integer products themselves
    reference = int8_vectors(exact, tokenizer, TEXTS)

    def refuses(*args: Any) -> Any:
        raise RuntimeError("_int_mm: not supported here")

    monkeypatch.setattr(torch, "_int_mm", refuses)
    int_mm_pays.cache_clear()
    try:
        assert not _int_mm_works() and not int_mm_pays()
        fallback = TokenInt8Encoder(model)
    finally:
        int_mm_pays.cache_clear()
    assert not fallback.exact_int_mm
    np.testing.assert_array_equal(int8_vectors(fallback, tokenizer, TEXTS), reference)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_float32_product_is_int_mms_to_the_bit_for_any_batch(threads: int) -> None:
    """A feed-forward output projection (1,536 inputs: sums of products reach 2**24, beyond which float32 rounds):
    its float32 product equals ``torch._int_mm``'s, for a row alone and inside batches of any size."""
    from worker.token_int8 import _Int8Linear

    generator = torch.Generator().manual_seed(3)
    # Weights of +-1 (every integer +-127) and rows that follow one channel's signs (integers 120-127): that
    # channel's sum of products is ~24 million, past 2**24, where a float32 sum rounds by the order it is taken in.
    signs = torch.randint(0, 2, (384, 1536), generator=generator).float() * 2 - 1
    linear = _Int8Linear(signs, torch.zeros(384))
    channels = torch.randint(0, 384, (42,), generator=generator)
    rows = signs[channels] * (120 + 7 * torch.rand(42, 1536, generator=generator))
    rows[:2] = torch.randn(2, 1536, generator=generator)  # and two ordinary rows
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        exact = linear(rows, exact_int_mm=True)
        assert torch.equal(linear(rows, exact_int_mm=False), exact)
        for size in (1, 3, 17):
            assert torch.equal(linear(rows[:size], exact_int_mm=False), exact[:size])
        assert torch.equal(linear(rows[-1:], exact_int_mm=False), exact[-1:])
    finally:
        torch.set_num_threads(previous)


def test_int_mm_is_used_only_where_it_beats_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without VNNI (AVX2 only) ``torch._int_mm`` ran 35-40x slower than float32: the probe times both
    on one product and keeps the faster (here the integer product is replaced by a slow and by a fast one)."""
    real = torch._int_mm
    known: dict[tuple[int, ...], torch.Tensor] = {}

    def slow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        return real(a, b)

    def instant(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        key = (a.data_ptr(), b.data_ptr(), *a.shape, *b.shape)
        if key not in known:
            known[key] = real(a, b)  # the first call (a warm-up) computes it; the timed ones look it up
        return known[key]

    try:
        for fake, expected in ((slow, False), (instant, True)):
            monkeypatch.setattr(torch, "_int_mm", fake)
            int_mm_pays.cache_clear()
            assert int_mm_pays() is expected
            assert int_mm_pays() is expected  # asked once per process
    finally:
        monkeypatch.setattr(torch, "_int_mm", real)
        int_mm_pays.cache_clear()


def test_relative_positions_are_refused(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    model.config.position_embedding_type = "relative_key"
    try:
        with pytest.raises(ValueError, match="absolute position"):
            TokenInt8Encoder(model)
    finally:
        model.config.position_embedding_type = "absolute"
