"""Per-token int8 (worker/token_int8.py): near the float32 encoder, and a string's vector never depends on its batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worker.token_int8 import (
    TokenInt8Encoder,
    _int_mm_works,
    _kernel_seconds,
    _probed_product,
    best_in_turns,
    int8_product,
    int_mm_pays,
)

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


def forget_probe() -> None:
    """The kernel timings and the choices made from them, forgotten: the next question probes again."""
    _kernel_seconds.cache_clear()
    _probed_product.cache_clear()


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


@pytest.mark.parametrize("threads", [1, 2])
def test_a_strings_vector_is_the_same_alone_and_in_any_batch(tiny: tuple[Any, Any], threads: int) -> None:
    """On two threads PyTorch's attention gave two copies of a string in one call results a float32 step from the
    string alone (for some tokenizers: 1 run in 20); the encoder's attention runs on one thread whatever the
    process's count."""
    model, tokenizer = tiny
    encoder = TokenInt8Encoder(model)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = int8_vectors(encoder, tokenizer, TEXTS)
        for position, text in enumerate(TEXTS):
            np.testing.assert_array_equal(int8_vectors(encoder, tokenizer, [text])[0], together[position])
        # Strings of one length share an attention call (here the same string twice and three times), longer ones
        # pad the batch.
        shuffled = int8_vectors(
            encoder, tokenizer, [*TEXTS[::-1], "a much longer string than any of the others", TEXTS[2], TEXTS[0]]
        )
        np.testing.assert_array_equal(shuffled[: len(TEXTS)][::-1], together)
        np.testing.assert_array_equal(shuffled[-2], together[2])
        np.testing.assert_array_equal(shuffled[-1], together[0])
        assert torch.get_num_threads() == threads  # the process's count is back after the attention
    finally:
        torch.set_num_threads(before)


def test_every_integer_product_gives_the_same_vectors(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch._int_mm``, ONNX Runtime's u8 x s8 product and the float32 product of the same integers: one vector
    to the bit, so every CPU codes a mention alike whichever kernel its probe picked."""
    model, tokenizer = tiny
    assert _int_mm_works()  # this PyTorch has the CPU operator
    encoder = TokenInt8Encoder(model)
    vectors = {}
    for product in ("int_mm", "onnxruntime", "float32"):
        encoder.product = product  # whatever this CPU's speed: each kernel itself
        vectors[product] = int8_vectors(encoder, tokenizer, TEXTS)
    np.testing.assert_array_equal(vectors["onnxruntime"], vectors["int_mm"])
    np.testing.assert_array_equal(vectors["float32"], vectors["int_mm"])

    def refuses(*args: Any) -> Any:
        raise RuntimeError("_int_mm: not supported here")

    monkeypatch.setattr(torch, "_int_mm", refuses)
    forget_probe()
    try:
        assert not _int_mm_works() and not int_mm_pays()
        fallback = TokenInt8Encoder(model)
    finally:
        forget_probe()
    assert fallback.product in ("onnxruntime", "float32")
    np.testing.assert_array_equal(int8_vectors(fallback, tokenizer, TEXTS), vectors["int_mm"])


def test_onnx_runtimes_product_is_exact_at_the_largest_integers() -> None:
    """The uint8 tokens (int8 + 128) x 7-bit weights: AVX2's 16-bit pair sums hold the largest pairs (255 x 63 x 2),
    and the zero point comes off exactly; with 8-bit weights the probe refuses the kernel (pairs could overflow)."""
    from worker.token_int8 import _OnnxIntegerProduct, _product_works, onnx_product_exact

    generator = torch.Generator().manual_seed(5)
    weight = torch.randint(-63, 64, (1536, 384), dtype=torch.int8, generator=generator)
    weight[:, :8] = 63
    weight[:, 8:16] = -63
    rows = torch.randint(-127, 128, (37, 1536), generator=generator).float()
    rows[0], rows[1] = 127.0, -127.0
    expected = (rows.long() @ weight.long()).float()
    assert torch.equal(_OnnxIntegerProduct(weight, 128)(rows), expected)
    assert onnx_product_exact(63, 127) and onnx_product_exact(127, 63) and not onnx_product_exact(127, 127)
    assert _product_works("onnxruntime", 63, 127) and not _product_works("onnxruntime", 127, 127)


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
        exact = linear(rows, "int_mm")
        assert torch.equal(linear(rows, "float32"), exact)
        for size in (1, 3, 17):
            assert torch.equal(linear(rows[:size], "float32"), exact[:size])
        assert torch.equal(linear(rows[-1:], "float32"), exact[-1:])
    finally:
        torch.set_num_threads(previous)


def test_the_probe_keeps_the_fastest_exact_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without VNNI (AVX2 only) ``torch._int_mm`` ran 35-40x slower than float32 and ONNX Runtime's u8 x s8
    product 2-2.7x faster: the probe times every exact kernel on one product and keeps the fastest (here the
    integer product is replaced by a slow and by a fast one, and ONNX Runtime by a slow one)."""
    import worker.token_int8 as token_int8

    real = torch._int_mm
    real_onnx = token_int8._OnnxIntegerProduct.__call__
    # The fast fakes remember each answer by the identity of its operands, and keep the operands alive with it: a
    # freed operand's address or id could be reused by a new one with other integers (the exactness check's fresh
    # 5 x 96 rows), which would then get a stale answer and the kernel be judged inexact.
    known: dict[tuple[int, ...], tuple[object, ...]] = {}

    def slow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        return real(a, b)

    def instant(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        key = (a.data_ptr(), b.data_ptr(), *a.shape, *b.shape)
        if key not in known:
            known[key] = (a, b, real(a, b))  # the first call (a warm-up) computes it; the timed ones look it up
        return known[key][-1]  # type: ignore[return-value]

    def slow_onnx(self: Any, quantised: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        return real_onnx(self, quantised)

    try:
        for fake, expected in ((slow, False), (instant, True)):
            monkeypatch.setattr(torch, "_int_mm", fake)
            forget_probe()
            assert int_mm_pays() is expected
            assert int_mm_pays() is expected  # asked once per process
        monkeypatch.setattr(torch, "_int_mm", slow)
        monkeypatch.setattr(token_int8._OnnxIntegerProduct, "__call__", slow_onnx)
        forget_probe()
        assert int8_product(63, 127) == "float32"
        assert token_int8.first_pass_product() is None
        onnx_known: dict[tuple[int, ...], tuple[object, ...]] = {}

        def instant_onnx(self: Any, quantised: torch.Tensor) -> torch.Tensor:
            key = (id(self), quantised.data_ptr(), *quantised.shape)
            if key not in onnx_known:
                onnx_known[key] = (self, quantised, real_onnx(self, quantised))
            return onnx_known[key][-1]  # type: ignore[return-value]

        monkeypatch.setattr(token_int8._OnnxIntegerProduct, "__call__", instant_onnx)
        forget_probe()
        assert int8_product(63, 127) == "onnxruntime"
        assert token_int8.first_pass_product() == "onnxruntime"
        assert int8_product(127, 127) != "onnxruntime"  # 8-bit weights: pairs could overflow, never chosen
    finally:
        monkeypatch.setattr(torch, "_int_mm", real)
        monkeypatch.setattr(token_int8._OnnxIntegerProduct, "__call__", real_onnx)
        forget_probe()


def test_a_kernel_slow_on_its_first_calls_is_still_timed_again() -> None:
    """torch._int_mm's first calls of a shape are slow, and slower on a machine busy loading a model: a first timing
    6x the fastest must not drop a kernel that is the fastest afterwards (a 4x bound did, and a worker coded on ONNX
    Runtime's slower product); one 100x slower (AVX2's _int_mm, 35-40x) is still timed only once. The sleeps leave
    20 ms or more of oversleeping before either answer could change."""
    calls = {"cold": 0, "steady": 0, "hopeless": 0}

    def run(name: str, seconds: Callable[[int], float]) -> Callable[[], None]:
        def call() -> None:
            calls[name] += 1
            time.sleep(seconds(calls[name]))

        return call

    timings = best_in_turns(
        {
            "cold": run("cold", lambda number: 0.03 if number <= 2 else 0.001),
            "steady": run("steady", lambda number: 0.005),
            "hopeless": run("hopeless", lambda number: 0.5),
        },
        repeats=3,
    )
    assert min(timings, key=lambda name: timings[name]) == "cold"
    assert calls == {"cold": 8, "steady": 8, "hopeless": 2}  # an untimed and a timed call a turn
    assert timings["hopeless"] >= 0.5


def test_relative_positions_are_refused(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    model.config.position_embedding_type = "relative_key"
    try:
        with pytest.raises(ValueError, match="absolute position"):
            TokenInt8Encoder(model)
    finally:
        model.config.position_embedding_type = "absolute"
