"""Per-token dynamic int8 for a BERT-style encoder on CPUs: the linker's query encoder.

Weights are int8 with one scale per output channel; activations are quantised to 7-bit integers (-63..63) when
each linear layer runs, with **one scale per token**. No scale is shared between tokens, so a string's vector
never depends on the other strings of its batch: a note's mentions run together in one call, their real tokens
packed for the linear layers (no padding) and attention run on each string alone, unpadded, and each
mention gets exactly the vector it gets alone. ONNX Runtime's dynamic int8 quantises a whole call's activations
with one scale, which is why its graph had to run each mention alone (``_OnnxQueries.rowwise``): one session run,
and one read of every weight, per mention. One scale per token is also closer to float32 (cosine 0.9992 against
0.9970 on the distilled query encoder, CodiEsp train synonyms).

Attention, layer norms, the activation function and the embeddings stay float32. The integer products are exact
on every CPU, so every CPU gets the same vectors to the bit; :func:`int8_product` picks the fastest exact kernel,
once per process:

* ``torch._int_mm`` (oneDNN: fast with VNNI: AVX512-VNNI, AVX-VNNI, AMX; 35-40x slower than float32 on AVX2);
* ONNX Runtime's ``MatMulInteger`` on uint8 tokens (the 7-bit integers + 64) x int8 weights: on AVX2
  (``vpmaddubsw``) it adds pairs of products in 16 bits, which 8-bit tokens would overflow (255 x 127 x 2) and
  7-bit ones cannot (127 x 127 x 2 = 32,258): that is why the tokens have 7 bits. 1.7-2.7x faster than float32
  on an AVX2 EPYC;
* the same integers multiplied in float32, in slices of the inner dimension short enough that every partial sum
  stays below 2**24 (exact whatever the kernel's order), the slices added in float64.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("fhir_ner.terminology")

# The largest integers of the weights and of the tokens in :class:`TokenInt8Encoder`. Tokens in 7 bits let ONNX
# Runtime's u8 x s8 product run exact on AVX2; on CodiEsp dev they moved DISEASE top-1 / top-5 by +0.17 / -0.06
# points (7-bit weights instead: -0.03 / -0.03, and more translated pairs lost their Spanish code; README, "Cost").
WEIGHT_LEVELS = 127
ACTIVATION_LEVELS = 63
# The exact integer products, by name (:func:`int8_product` chooses).
PRODUCTS = ("int_mm", "onnxruntime", "float32")


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
        self._onnx: _OnnxIntegerProduct | None = None  # made on first use

    def __call__(self, x: torch.Tensor, product: str) -> torch.Tensor:
        """``product``: which exact integer product (:data:`PRODUCTS`); every one gives the same result."""
        levels = self.activation_levels
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(levels)
        # |x| <= levels x row_scale up to one rounding, so every integer is within -levels..levels: no clamp.
        quantised = torch.div(x, row_scale).round_()  # integers, still in float32
        if product == "int_mm":
            products = torch._int_mm(quantised.to(torch.int8), self.weight).float()
        elif product == "onnxruntime":
            if self._onnx is None:
                self._onnx = _OnnxIntegerProduct(self.weight, int(levels) + 1)
            products = self._onnx(quantised)
        else:
            products = self._float_product(quantised)
        return torch.addcmul(self.bias, products, row_scale * self.scale)

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


def onnx_product_exact(weight_levels: int, activation_levels: int) -> bool:
    """Whether uint8 tokens (the int8 ones + ``activation_levels + 1``) x int8 weights can never overflow AVX2's
    16-bit pair sums: the largest pair, (2a + 1) x w x 2, stays within 32,767."""
    return (2 * activation_levels + 1) * weight_levels * 2 <= 32767


def _matmul_integer_session(zero_point: int, weight: np.ndarray | None = None, in_memory: bool = False) -> Any:
    """An ONNX Runtime session on one thread of ``MatMulInteger(A uint8 [M, K] with zero point ``zero_point``, B int8
    [K, N])``: B an initializer (``weight``: packed once) or, without it, an input.

    ``in_memory`` (a large ``weight``: :class:`OnnxRowProducts`): B goes in as an in-memory external initializer,
    so no copy of it is serialised into the graph and ONNX Runtime keeps only its packed copy, and the session has
    no memory arena, whose largest output (queries x rows int32, 11 MB for 40 queries) would stay resident for the
    process's life."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inner, outer = (weight.shape[0], weight.shape[1]) if weight is not None else ("K", "N")
    left = helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", inner])
    out = helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", outer])
    initializers = [numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), "A_zero")]
    inputs = [left]
    options = ort.SessionOptions()
    if weight is None:
        inputs.append(helper.make_tensor_value_info("B", TensorProto.INT8, ["K", "N"]))
    elif in_memory:
        external = TensorProto(name="B", data_type=TensorProto.INT8, dims=list(weight.shape))
        external.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "B.bin"), ("offset", "0"), ("length", str(weight.nbytes))):
            entry = external.external_data.add()
            entry.key, entry.value = key, value
        initializers.append(external)
        options.add_external_initializers_from_files_in_memory(["B.bin"], [weight], [weight.nbytes])
        options.enable_cpu_mem_arena = False
    else:
        initializers.append(numpy_helper.from_array(weight, "B"))
    node = helper.make_node("MatMulInteger", ["A", "B", "A_zero"], ["Y"])
    graph = helper.make_graph([node], "int8_product", inputs, [out], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class _OnnxIntegerProduct:
    """ONNX Runtime's ``MatMulInteger``, one thread: uint8 tokens (the int8 integers + ``zero_point``) x the int8
    weights ``[in, out]`` (an initializer, packed once), with the zero point taken off exactly in int32."""

    def __init__(self, weight: torch.Tensor, zero_point: int) -> None:
        self.zero_point = float(zero_point)
        self.session = _matmul_integer_session(zero_point, weight.numpy())

    def __call__(self, quantised: torch.Tensor) -> torch.Tensor:
        # + the zero point in place (the caller's integers are not read again); NumPy's cast to uint8 took a
        # quarter of PyTorch's here.
        tokens = quantised.add_(self.zero_point).numpy().astype(np.uint8)
        (products,) = self.session.run(None, {"A": tokens})
        return torch.from_numpy(products).float()


@lru_cache(maxsize=1)
def integer_product_errors() -> tuple[type[BaseException], ...]:
    """What a failing integer product raises: PyTorch's ``RuntimeError`` (or a missing ``torch._int_mm``), and ONNX
    Runtime's own errors (``Fail``, ``RuntimeException``, ...), which derive from ``Exception`` only, so catching
    ``RuntimeError`` alone let an ONNX Runtime failure escape a fallback meant for it."""
    errors: list[type[BaseException]] = [AttributeError, RuntimeError, NotImplementedError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return tuple(errors)
    for name in dir(ort_state):
        error = getattr(ort_state, name)
        if isinstance(error, type) and issubclass(error, Exception) and error.__module__ == ort_state.__name__:
            errors.append(error)
    return tuple(errors)


def _int_mm_works() -> bool:
    """Whether this PyTorch multiplies int8 matrices on the CPU (``torch._int_mm``), checked on a small product."""
    try:
        a = torch.tensor([[1, -2, 3, 4] * 8] * 3, dtype=torch.int8)
        b = torch.tensor([[2, 1, -1, 5] * 2] * 32, dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, b), a.int() @ b.int()))
    except integer_product_errors():
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


def _product_works(product: str, weight_levels: int, activation_levels: int) -> bool:
    """Whether ``product`` gives the exact integers here, on random and on the largest tokens and weights."""
    if product == "float32":
        return True
    if product == "int_mm" and not _int_mm_works():
        return False
    if product == "onnxruntime" and not onnx_product_exact(weight_levels, activation_levels):
        return False
    generator = torch.Generator().manual_seed(1)
    weight = torch.randint(-weight_levels, weight_levels + 1, (96, 40), dtype=torch.int8, generator=generator)
    weight[:, 0] = weight_levels
    weight[:, 1] = -weight_levels
    rows = torch.randint(-activation_levels, activation_levels + 1, (5, 96), generator=generator).float()
    rows[0] = activation_levels
    rows[1] = -activation_levels
    try:
        expected = (rows.long() @ weight.long()).float()
        if product == "int_mm":
            got = torch._int_mm(rows.to(torch.int8), weight).float()
        else:
            got = _OnnxIntegerProduct(weight, activation_levels + 1)(rows)
        return bool(torch.equal(got, expected))
    except Exception as error:  # a missing operator or runtime: that kernel is not used
        logger.info("int8 products: %s unavailable (%s)", product, error)
        return False


def int8_product(weight_levels: int = WEIGHT_LEVELS, activation_levels: int = ACTIVATION_LEVELS) -> str:
    """The fastest exact integer product on this CPU for these levels (:data:`PRODUCTS`).

    Every kernel is timed once per process (:func:`_kernel_seconds`); for each levels, the fastest of those that
    give the exact integers at these levels is kept (the answer changes only the speed, never a result). With VNNI
    that is ``torch._int_mm``; on an AMD EPYC with AVX2 only, ONNX Runtime's u8 x s8 product (7-bit tokens) ran
    1.7-2.7x faster than float32 and ``torch._int_mm`` 35-40x slower (sessions 12 and 13).
    """
    return _probed_product(int(weight_levels), int(activation_levels))


@lru_cache(maxsize=4)
def _probed_product(weight_levels: int, activation_levels: int) -> str:
    """:func:`int8_product`, remembered by its levels alone (however the caller passed them)."""
    timings = {
        product: seconds
        for product, seconds in _kernel_seconds().items()
        if _product_works(product, weight_levels, activation_levels)
    }
    chosen = min(timings, key=lambda name: timings[name])
    logger.info(
        "int8 products: %s (%s)",
        chosen,
        ", ".join(f"{name} {seconds * 1000:.2f} ms" for name, seconds in timings.items()),
    )
    return chosen


DROP_AFTER_FIRST_TURN = 10  # a kernel this many times slower than the fastest in the first turn is not timed again


@lru_cache(maxsize=1)
def _kernel_seconds(repeats: int = 8) -> dict[str, float]:
    """Each working kernel's best time on one note-sized product (a kernel's speed does not depend on the integers,
    so one timing serves every levels). Kernels that fail here (a missing operator or runtime) are left out."""
    generator = torch.Generator().manual_seed(0)
    # A note's mention tokens against a feed-forward projection: at this size ONNX Runtime's lead over float32 on AVX2
    # (about 2x) stands clear of a busy worker's noise; at 128 x 384 x 384 it was within it.
    left = torch.randint(-ACTIVATION_LEVELS, ACTIVATION_LEVELS + 1, (256, 384), generator=generator).float()
    right = torch.randint(-WEIGHT_LEVELS, WEIGHT_LEVELS + 1, (384, 1536), dtype=torch.int8, generator=generator)
    runs: dict[str, Callable[[], object]] = {}
    for product in PRODUCTS:
        if not _product_works(product, WEIGHT_LEVELS, ACTIVATION_LEVELS):
            continue
        if product == "int_mm":
            runs[product] = functools.partial(torch._int_mm, left.to(torch.int8), right)
        elif product == "onnxruntime":
            runs[product] = functools.partial(_OnnxIntegerProduct(right, ACTIVATION_LEVELS + 1), left)
        else:
            runs[product] = functools.partial(torch.matmul, left, right.float())
    # On one thread, as a note's mentions encode (ONNX Runtime's sessions have one; float32 on two looked as fast).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best_in_turns(runs, repeats)
    finally:
        torch.set_num_threads(threads)


def best_in_turns(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each run's best time over ``repeats`` turns after a first one (each timing after an untimed call), taken in
    turns so that a busy moment of a shared machine slows them alike.

    A run more than DROP_AFTER_FIRST_TURN times slower than the fastest in the first turn is not timed again (AVX2's
    ``_int_mm``: 35-40x). The bound was 4x until session 19: ``torch._int_mm``'s first calls of a shape are slow (7,
    then 1.3-1.5 ms for three calls, then 0.7 ms on an AVX512-VNNI EPYC), and an I/O worker probing while the
    inference worker loaded its model timed its second call at 5.4 ms against ONNX Runtime's 0.8, dropped it, and
    coded notes in 0.066-0.068 s of CPU instead of 0.045-0.053 (2 of 3 end-to-end runs).
    """
    timings = {name: best_seconds(run, 1) for name, run in runs.items()}
    fastest = min(timings.values())
    runs = {name: run for name, run in runs.items() if timings[name] <= DROP_AFTER_FIRST_TURN * fastest}
    for _ in range(repeats):
        for name, run in runs.items():
            timings[name] = min(timings[name], best_seconds(run, 1))
    return timings


def int_mm_pays() -> bool:
    """Whether ``torch._int_mm`` is the fastest exact product of full int8 (8-bit weights and tokens): ONNX
    Runtime's u8 x s8 could overflow there, so it is ``_int_mm`` or float32."""
    return int8_product(127, 127) == "int_mm"


def first_pass_product() -> str | None:
    """The integer product of the linker index's first pass (``SourceIndex.set_first_pass``): ``int_mm`` (int8
    rows x int8 queries) where it is the fastest, else ``onnxruntime`` (7-bit queries x the int8 rows packed in
    ONNX Runtime: :class:`OnnxRowProducts`, AVX2) where that beats float32, else None: the index is searched in
    float32 alone."""
    if int_mm_pays():
        return "int_mm"
    # The same kernel as the query encoder's (7-bit queries here, 7-bit tokens there): one probe decides both.
    return "onnxruntime" if int8_product() == "onnxruntime" else None


def onnx_rows_work() -> bool:
    """Whether ONNX Runtime's u8 x s8 product of 7-bit queries and int8 rows (:class:`OnnxRowProducts`, the first
    pass's) gives the exact integers here."""
    return _product_works("onnxruntime", WEIGHT_LEVELS, OnnxRowProducts.ZERO_POINT - 1)


def release_freed_heap() -> None:
    """Hand the heap's freed memory back to the system (glibc's ``malloc_trim``; elsewhere nothing): building a
    large ONNX Runtime session frees more than it keeps (measured: building ICD-10-CM's first-pass sessions left up
    to 85 MB of freed heap resident, besides the 33 MB they hold), and so does dropping a model's weights."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class OnnxRowProducts:
    """Integer products of a few 7-bit queries with many int8 rows in ONNX Runtime (AVX2's exact u8 x s8 product):
    the rows are the session's constant right-hand side, packed once when it opens, and the queries (+ 64, uint8)
    the left. The other way round (rows as the left, uint8, the queries as an input) ONNX Runtime re-packed the
    whole table on every call: 25 ms for 17 queries x 70,000 rows on an AVX2 EPYC, against 9 ms this way.

    ONNX Runtime keeps only its packed copy of the rows, about their bytes (measured: 33 MB for ICD-10-CM's 87,407
    rows); building it frees a copy on the heap, which its caller hands back (:func:`release_freed_heap`)."""

    ZERO_POINT = 64  # queries are within -63..63: + 64 is within 1..127, so no pair of products passes 16 bits

    def __init__(self, rows: np.ndarray) -> None:
        import mmap

        count, inner = rows.shape
        # The transposed copy in an anonymous mapping of its own, filled a block at a time: freed, it goes back to
        # the system at once (on the heap, such temporaries stayed resident).
        right = np.frombuffer(mmap.mmap(-1, max(1, count * inner)), dtype=np.int8)[: count * inner]
        right = right.reshape(inner, count)
        for start in range(0, count, 8192):
            right[:, start : start + 8192] = rows[start : start + 8192].T
        self.session = _matmul_integer_session(self.ZERO_POINT, right, in_memory=True)
        self.shape = (int(count), int(inner))

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        """``queries`` int8 [Q, K] within -63..63 -> their products with every row, int32 [Q, rows], exact."""
        tokens = (queries.astype(np.int16) + self.ZERO_POINT).astype(np.uint8)
        (product,) = self.session.run(None, {"A": tokens})
        return np.asarray(product)


class _Float32Linear:
    """A linear layer left float32 among int8 ones (same call as :class:`_Int8Linear`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight.detach().float()
        self.bias = bias.detach().float()

    def __call__(self, x: torch.Tensor, product: str) -> torch.Tensor:
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
        self.layers = encoder_layers(model, (), WEIGHT_LEVELS, ACTIVATION_LEVELS)
        self.product = int8_product(WEIGHT_LEVELS, ACTIVATION_LEVELS)  # any of them: the same result

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.forward(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Vectors of right-padded rows: the linear layers run on the batch's real tokens packed together, the
        attention on the strings of each length together, unpadded, on one thread. PyTorch's attention kernel is
        batch-invariant on one thread only: on two, two copies of a string in one call came out up to a float32
        step apart from the string alone (which a token's 7-bit rounding sometimes carried on), so attention ran
        per string until session 20. On one thread, strings of one length get their vectors alone to the bit
        (CodiEsp dev's 4,932 distinct mentions of 150 notes, and a test on two threads); one attention call per
        length instead of per string took 7% off the encoder's CPU. A note's mentions run on one thread anyway."""
        keep = mask.bool()
        lengths = keep.sum(dim=1).tolist()
        starts = np.cumsum([0, *lengths[:-1]]).tolist()
        by_length: dict[int, list[int]] = {}
        for start, length in zip(starts, lengths, strict=True):
            by_length.setdefault(int(length), []).append(int(start))
        # Per length: how many strings, and the positions of their tokens among the packed ones, string by string.
        groups = [
            (length, len(first), torch.tensor([start + i for start in first for i in range(length)]))
            for length, first in by_length.items()
        ]
        head_size = self.hidden // self.heads
        x = self.embeddings(input_ids=ids)[keep]  # [tokens, hidden]
        for layer in self.layers:
            qkv = layer["qkv"](x, self.product)
            context = torch.empty_like(x)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for length, count, where in groups:
                    parts = qkv.index_select(0, where).view(count, length, 3, self.heads, head_size)
                    query, key, value = parts.permute(2, 0, 3, 1, 4)
                    attended = nn.functional.scaled_dot_product_attention(query, key, value)
                    context.index_copy_(0, where, attended.transpose(1, 2).reshape(count * length, self.hidden))
            finally:
                torch.set_num_threads(threads)
            x = layer["norm1"](layer["out"](context, self.product) + x)
            x = layer["norm2"](layer["down"](layer["act"](layer["up"](x, self.product)), self.product) + x)
        pooled = torch.stack(
            [x[start : start + length].mean(dim=0) for start, length in zip(starts, lengths, strict=True)]
        )
        return nn.functional.normalize(pooled, dim=-1)
