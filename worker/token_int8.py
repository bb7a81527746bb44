"""Per-token dynamic int8 for a BERT-style encoder on CPUs: the linker's query encoder.

Weights are int8 with one scale per output channel; activations are quantised to int8 when each linear layer
runs, with **one scale per token**. No scale is shared between tokens, so a string's vector never depends on the
other strings of its batch: a note's mentions run together in one call, their real tokens packed for the linear
layers (no padding) and attention run on strings of one length at a time, unpadded, and each mention gets exactly
the vector it gets alone. ONNX Runtime's dynamic int8 quantises a whole call's activations with one scale, which is
why its graph had to run each mention alone (``_OnnxQueries.rowwise``): one session run, and one read of every
weight, per mention. One scale per token is also closer to float32 (cosine 0.9992 against 0.9970 on the distilled
query encoder, CodiEsp train synonyms).

Attention, layer norms, the activation function and the embeddings stay float32. The int8 products are
``torch._int_mm`` (oneDNN: VNNI where the CPU has it); where that operator is missing, refuses, or is slower
than float32 (:func:`int_mm_pays`: on a CPU without VNNI, AVX2 only, it ran 35-40x slower), the same integers
are multiplied in float32, in slices of the inner dimension short enough that every partial sum stays below 2**24
(exact whatever the kernel's order), the slices added in float64: the same float32 result as ``_int_mm``'s, to the
bit and for any batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("fhir_ner.terminology")


class _Int8Linear:
    """``x @ weight.T + bias`` with int8 weights (a scale per output channel) and int8 tokens (a scale per row)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, levels: int = 127, activation_levels: int = 127
    ) -> None:
        """``levels`` and ``activation_levels``: the largest integer of the weights and of the tokens (127: int8;
        63: 7 bits; with either in 7 bits, AVX2's unsigned x signed int8 product, ``vpmaddubsw``, adds its pairs
        without saturating)."""
        self.activation_levels = float(activation_levels)
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / levels
        self.weight = (
            torch.round(weight / scale[:, None]).clamp(-levels, levels).to(torch.int8).t().contiguous()
        )  # [in, out]
        self.scale = scale
        self.bias = bias.detach().float()
        # Inner-dimension slices short enough that no partial sum of products reaches 2**24, where float32 stops
        # holding every integer: each slice's float32 product is then exact whatever the kernel's order.
        self._slice = max(1, 2**24 // (int(levels) * int(activation_levels)))
        self._float_weights: list[torch.Tensor] | None = None  # those slices in float32, made on first use

    def __call__(self, x: torch.Tensor, exact_int_mm: bool) -> torch.Tensor:
        levels = self.activation_levels
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / levels
        quantised = torch.round(x / row_scale).clamp_(-levels, levels)  # integers, still in float32
        if exact_int_mm:
            product = torch._int_mm(quantised.to(torch.int8), self.weight).float()
        else:
            product = self._float_product(quantised)
        return torch.addcmul(self.bias, product, row_scale * self.scale)

    def _float_product(self, quantised: torch.Tensor) -> torch.Tensor:
        """The integer product in float32 arithmetic, equal to ``torch._int_mm``'s rounded to float32, to the bit
        and for any batch: each slice's product is exact, and the slices' sums are added exactly (float64) before
        the one rounding to float32 that ``_int_mm(...).float()`` makes too."""
        if self._float_weights is None:
            self._float_weights = [part.float() for part in self.weight.split(self._slice)]
        if len(self._float_weights) == 1:
            return quantised @ self._float_weights[0]
        total: torch.Tensor | None = None
        for part, weight in zip(quantised.split(self._slice, dim=1), self._float_weights, strict=True):
            partial = (part @ weight).double()
            total = partial if total is None else total + partial
        assert total is not None
        return total.float()


def _int_mm_works() -> bool:
    """Whether this PyTorch multiplies int8 matrices on the CPU (``torch._int_mm``), checked on a small product."""
    try:
        a = torch.tensor([[1, -2, 3, 4] * 8] * 3, dtype=torch.int8)
        b = torch.tensor([[2, 1, -1, 5] * 2] * 32, dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, b), a.int() @ b.int()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed runs, after one untimed (a busy machine lowers a best less than a mean)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@lru_cache(maxsize=1)
def int_mm_pays() -> bool:
    """Whether ``torch._int_mm`` is right on this CPU and faster than the same integers multiplied in float32.

    Asked once per process, on one product of a note's size (a few milliseconds; the answer changes only the
    speed, never a result). With VNNI (AVX512-VNNI, AVX-VNNI, AMX) oneDNN's int8 product is the faster; on an AMD
    EPYC with AVX2 only it ran at 3.5 GFLOP/s against float32's 130 (session 12), so there the int8 arithmetic
    stays and its products run in float32, and the linker searches its index in float32 alone.
    """
    if not _int_mm_works():
        return False
    generator = torch.Generator().manual_seed(0)
    left = torch.randint(-127, 128, (128, 384), dtype=torch.int8, generator=generator)
    right = torch.randint(-127, 128, (384, 384), dtype=torch.int8, generator=generator)
    left_float, right_float = left.float(), right.float()
    integer = best_seconds(lambda: torch._int_mm(left, right))
    floating = best_seconds(lambda: left_float @ right_float)
    pays = integer < floating
    logger.info(
        "int8 products: %s (torch._int_mm %.2f ms, float32 %.2f ms)",
        "torch._int_mm" if pays else "float32",
        integer * 1000,
        floating * 1000,
    )
    return pays


class _Float32Linear:
    """A linear layer left float32 among int8 ones (same call as :class:`_Int8Linear`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight.detach().float()
        self.bias = bias.detach().float()

    def __call__(self, x: torch.Tensor, exact_int_mm: bool) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def encoder_layers(
    model: Any, keep_fp32: Collection[str] = (), weight_levels: int = 127, activation_levels: int = 127
) -> list[dict[str, Any]]:
    """Per encoder layer: its linear groups (``qkv``: query, key and value fused; ``out``, the attention output;
    ``up`` and ``down``, the feed-forward) in per-token int8, or float32 for the groups ``keep_fp32`` names (a group,
    or a group and a layer number: ``down11``), with the layer's norms (``norm1``, ``norm2``, shared, not copied)
    and activation (``act``). ``weight_levels``, ``activation_levels``: see :class:`_Int8Linear`."""

    def linear(weight: torch.Tensor, bias: torch.Tensor, group: str, index: int) -> _Int8Linear | _Float32Linear:
        if group in keep_fp32 or f"{group}{index}" in keep_fp32:
            return _Float32Linear(weight, bias)
        return _Int8Linear(weight, bias, weight_levels, activation_levels)

    layers: list[dict[str, Any]] = []
    for index, layer in enumerate(model.encoder.layer):
        attention, own = layer.attention, layer.attention.self
        layers.append(
            {
                "qkv": linear(
                    torch.cat([own.query.weight, own.key.weight, own.value.weight]),
                    torch.cat([own.query.bias, own.key.bias, own.value.bias]),
                    "qkv",
                    index,
                ),
                "out": linear(attention.output.dense.weight, attention.output.dense.bias, "out", index),
                "norm1": attention.output.LayerNorm,
                "up": linear(layer.intermediate.dense.weight, layer.intermediate.dense.bias, "up", index),
                "act": layer.intermediate.intermediate_act_fn,
                "down": linear(layer.output.dense.weight, layer.output.dense.bias, "down", index),
                "norm2": layer.output.LayerNorm,
            }
        )
    return layers


class TokenInt8Encoder:
    """(ids, mask) -> L2-normalised mean-pooled vectors, like the float32 model with mean pooling, in per-token int8.

    ``model``: a Hugging Face BERT/XLM-R encoder (``embeddings``, ``encoder.layer``) with absolute positions, in
    eval mode; its weights are copied (quantised) at construction, its embeddings and layer norms are shared.
    """

    def __init__(self, model: Any) -> None:
        config = model.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("per-token int8: only encoders with absolute position embeddings")
        self.embeddings = model.embeddings
        self.heads = int(config.num_attention_heads)
        self.hidden = int(config.hidden_size)
        self.layers = encoder_layers(model)
        self.exact_int_mm = int_mm_pays()  # else the same integers multiplied in float32: the same result

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.forward(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Vectors of right-padded rows: the linear layers run on the batch's real tokens packed together, the
        attention on strings of one length at a time, unpadded (so that no padding, and no string of another
        length, changes a result; strings of one length share a call, each computed as alone)."""
        keep = mask.bool()
        lengths = keep.sum(dim=1).tolist()
        starts = np.cumsum([0, *lengths[:-1]]).tolist()
        by_length: dict[int, list[int]] = {}
        for row, length in enumerate(lengths):
            by_length.setdefault(int(length), []).append(row)
        # Per length: the packed positions of its strings' tokens, [strings, length].
        groups = [
            (length, torch.tensor([list(range(starts[row], starts[row] + length)) for row in rows]))
            for length, rows in by_length.items()
        ]
        head_size = self.hidden // self.heads
        x = self.embeddings(input_ids=ids)[keep]  # [tokens, hidden]
        for layer in self.layers:
            qkv = layer["qkv"](x, self.exact_int_mm)
            context = torch.empty_like(x)
            for length, positions in groups:
                count = positions.shape[0]
                parts = qkv[positions.reshape(-1)].view(count, length, 3, self.heads, head_size)
                query, key, value = parts.permute(2, 0, 3, 1, 4)
                attended = nn.functional.scaled_dot_product_attention(query, key, value)
                context[positions.reshape(-1)] = attended.transpose(1, 2).reshape(count * length, self.hidden)
            x = layer["norm1"](layer["out"](context, self.exact_int_mm) + x)
            x = layer["norm2"](layer["down"](layer["act"](layer["up"](x, self.exact_int_mm)), self.exact_int_mm) + x)
        pooled = torch.stack(
            [x[start : start + length].mean(dim=0) for start, length in zip(starts, lengths, strict=True)]
        )
        return nn.functional.normalize(pooled, dim=-1)
