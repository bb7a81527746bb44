"""Int8 inference on CPUs: which layers to quantise, and how.

The tagger's arithmetic is the encoder's linear layers (projections and feed-forward, ~94% of its FLOPs);
int8 runs them on the CPU's integer dot-product instructions (AVX2 ``vpmaddubsw``, AVX-512/AVX VNNI
``vpdpbusd``, AMX tiles). Which variant keeps the model's accuracy was measured on the default model's
validation notes (``benchmarks/bench_int8.py``; figures in the README, "Inference speed (CPU)").

Layers are named by groups so that a variant can keep the sensitive ones in fp32:

- ``embeddings``: the word, position and token-type tables (only ONNX Runtime quantises a lookup);
- ``first`` / ``last``: encoder block 0 / the last block;
- ``query``, ``key``, ``value``: the attention's input projections; ``attn_out``: its output projection;
- ``ffn_in`` / ``ffn_out``: the feed-forward layer's expansion and its projection back;
- ``head``: the CNN head and the per-label classifiers;
- ``block<k>``: every quantisable layer of encoder block k (``block0`` .. ``block11``), for screening which
  block int8 hurts most;
- ``<type>.block<k>`` (``ffn_in.block3``, ``ffn_out.block0``, ``query.block5`` ...): one layer type in one
  block, for screening which blocks' ``ffn_in`` dynamic int8 moves spans (a keep set is a union of groups).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

GROUPS = ("embeddings", "first", "last", "query", "key", "value", "attn_out", "ffn_in", "ffn_out", "head")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")
_BLOCK = re.compile(r"block\d+")
LAYER_TYPES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")  # may be narrowed to one block
_TYPE_BLOCK = re.compile(rf"(?:{'|'.join(LAYER_TYPES)})\.block\d+")
_SUFFIX_GROUP = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
}


def parameter_groups(name: str, n_layers: int) -> set[str]:
    """The groups a module of the tagger (by its qualified name) belongs to."""
    groups: set[str] = set()
    if name.startswith("head"):
        groups.add("head")
    if ".embeddings" in name or name.startswith("embeddings"):
        groups.add("embeddings")
    layer = _LAYER.search(name)
    if layer:
        index = int(layer.group(1))
        groups.add(f"block{index}")
        if index == 0:
            groups.add("first")
        if index == n_layers - 1:
            groups.add("last")
        rest = name[layer.end() :].removesuffix(".linear")  # a smoothed layer wraps the original one
        for suffix, group in _SUFFIX_GROUP.items():
            if rest == suffix:
                groups.update((group, f"{group}.block{index}"))
                break
    return groups


def check_groups(keep_fp32: Iterable[str]) -> list[str]:
    """The keep set, sorted (it is part of the int8 graph's cache key); raises on a name no layer has."""
    keep = sorted(set(keep_fp32))
    unknown = [g for g in keep if g not in GROUPS and not _BLOCK.fullmatch(g) and not _TYPE_BLOCK.fullmatch(g)]
    if unknown:
        raise ValueError(f"unknown layer groups {unknown}; known: {', '.join(GROUPS)}, block<k>, <type>.block<k>")
    return keep


def quantize_dynamic_torch(
    tagger: nn.Module, per_channel: bool = True, keep_fp32: Iterable[str] = (), engine: str | None = None
) -> list[str]:
    """PyTorch dynamic int8 (int8 weights, activations quantised per batch) of the tagger's linear layers,
    in place; returns the names of the layers quantised. Layers in a ``keep_fp32`` group stay fp32."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    keep = set(check_groups(keep_fp32))
    if engine:
        torch.backends.quantized.engine = engine
    n_layers = _n_layers(tagger)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec: dict[str | type[nn.Module], Any] = {}
    for name, module in tagger.named_modules():
        if isinstance(module, nn.Linear) and not (parameter_groups(name, n_layers) & keep):
            spec[name] = qconfig
    quantize_dynamic(tagger, spec, dtype=torch.qint8, inplace=True)
    return [name for name in spec if isinstance(name, str)]


def _n_layers(tagger: nn.Module) -> int:
    encoder = getattr(tagger, "encoder", None)
    config = getattr(encoder, "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


# --------------------------------------------------------------------------- smoothing activation outliers

# Inputs of the feed-forward layers carry one or two outlier channels (absolute values ~30 where the median
# channel stays under 1): with one uint8 scale per tensor they leave the other channels a few levels, which
# is where dynamic int8 lost its accuracy (SQNR 14-15 dB into ffn_out, 25 dB into ffn_in; 33+ dB elsewhere).
# As in SmoothQuant (Xiao et al., 2023), each input channel j is divided by s_j and the weight's column j
# multiplied by it, so the product is unchanged and the outliers move into the (per-channel) weights. The
# encoder is post-LayerNorm (the LayerNorm output is also the residual stream), so the division cannot be
# folded into the LayerNorm: it stays an explicit multiply before the layer, cheap beside the product.
SMOOTHED_GROUPS = ("ffn_in", "ffn_out")
SMOOTHING_FILE = "int8_smoothing.safetensors"  # beside model.safetensors: per layer, its s (from training notes)


class SmoothedLinear(nn.Module):
    """linear(x / s) with the weight's columns scaled by s: the same function, smaller activation outliers."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            linear.weight.mul_(scale.to(linear.weight.dtype))
        self.linear = linear
        self.register_buffer("inverse", (1.0 / scale).to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inverse)  # type: ignore[no-any-return]


def _smoothable(tagger: nn.Module) -> dict[str, nn.Linear]:
    n_layers = _n_layers(tagger)
    return {
        name: module
        for name, module in tagger.named_modules()
        if isinstance(module, nn.Linear) and parameter_groups(name, n_layers) & set(SMOOTHED_GROUPS)
    }


@torch.no_grad()
def activation_absmax(tagger: nn.Module, windows: Iterable[list[int]]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| entering each smoothable layer over calibration windows."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in _smoothable(tagger).items():

        def record(_: nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor, name: str = name) -> None:
            peak = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
            found[name] = torch.maximum(found[name], peak) if name in found else peak

        hooks.append(module.register_forward_hook(record))
    try:
        for window in windows:
            ids = torch.tensor([window])
            tagger(ids, torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def smoothing_scales(tagger: nn.Module, absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """s_j = max|x_j|^alpha / max|w_j|^(1 - alpha), SmoothQuant's balance between activations and weights."""
    layers = _smoothable(tagger)
    scales = {}
    for name, peak in absmax.items():
        weight_peak = layers[name].weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
        scales[name] = (peak.clamp(min=1e-5) ** alpha / weight_peak ** (1 - alpha)).clamp(min=1e-3, max=1e3)
    return scales


def apply_smoothing(tagger: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Replace each named linear layer by its SmoothedLinear, in place."""
    for name, scale in scales.items():
        parent_name, _, child = name.rpartition(".")
        parent = tagger.get_submodule(parent_name)
        setattr(parent, child, SmoothedLinear(getattr(parent, child), scale))


# --------------------------------------------------------------------------- ONNX Runtime

ONNX_OPSET = 17


def _onnx_groups(node_name: str, op_type: str, n_layers: int) -> set[str]:
    """Groups of a node of the fused graph (``optimize_onnx``): fused ops carry their own names."""
    if op_type in ("EmbedLayerNormalization", "Gather"):
        return {"embeddings"}
    if op_type == "Attention":  # Attention_<layer>: the fused query/key/value projection
        index = int(node_name.rsplit("_", 1)[1])
        groups = {"query", "key", "value", f"block{index}"} | {f"{t}.block{index}" for t in ("query", "key", "value")}
        if index == 0:
            groups.add("first")
        if index == n_layers - 1:
            groups.add("last")
        return groups
    # Exported nodes are named after the module path: /tagger/encoder/encoder/layer.0/intermediate/dense/MatMul
    module = ".".join(node_name.strip("/").split("/")[:-1])
    return parameter_groups(module.removeprefix("tagger."), n_layers)


class _Exportable(nn.Module):
    def __init__(self, tagger: nn.Module) -> None:
        super().__init__()
        self.tagger = tagger

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits, _ = self.tagger(input_ids, attention_mask)
        return logits  # type: ignore[no-any-return]


class MeanPooled(nn.Module):
    """A sentence encoder's L2-normalised mean-pooled vectors (the linker's queries), exported in one graph."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def export_onnx(tagger: Any, path: str | Path) -> None:
    """The fp32 tagger (encoder + head) as one ONNX graph with dynamic batch and length."""
    export_encoder_graph(_Exportable(tagger), tagger.encoder, path, "logits", {0: "batch", 1: "tokens"})


def export_encoder_graph(
    module: nn.Module, encoder: Any, path: str | Path, output: str, output_axes: dict[int, str]
) -> None:
    """``module(input_ids, attention_mask) -> output`` as an ONNX graph with dynamic batch and length.

    ``encoder`` (the Hugging Face encoder inside ``module``) is exported with eager attention (not SDPA): ONNX
    Runtime's transformer optimiser recognises its pattern and fuses it into one ``Attention`` op per layer
    (with ``EmbedLayerNormalization``, ``SkipLayerNormalization`` and ``BiasGelu``), which SDPA's exported
    pattern does not get.
    """
    previous = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")
    try:
        ids = torch.full((2, 16), 5, dtype=torch.long)
        mask = torch.ones_like(ids)
        axes = {0: "batch", 1: "tokens"}
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                module.eval(),
                (ids, mask),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=[output],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, output: output_axes},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    finally:
        encoder.set_attn_implementation(previous)


def optimize_onnx(src: str | Path, dst: str | Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """ONNX Runtime's BERT fusions (offline, so every session starts from the fused graph)."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    model.save_model_to_file(str(dst))
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


def quantize_onnx_dynamic(
    src: str | Path,
    dst: str | Path,
    n_layers: int,
    per_channel: bool = True,
    keep_fp32: Iterable[str] = (),
    op_types: Iterable[str] | None = None,
) -> list[str]:
    """ONNX Runtime dynamic int8 (int8 weights, uint8 activations quantised per call) of the fused graph;
    returns the names of the nodes kept in fp32. ``op_types`` limits it to those ops (e.g. ``Attention`` alone,
    over a graph whose other layers were quantised statically)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = set(check_groups(keep_fp32))
    graph = onnx.load(str(src), load_external_data=False).graph
    quantisable = {"MatMul", "Attention", "EmbedLayerNormalization", "Gather", "Conv"}
    excluded = [
        n.name for n in graph.node if n.op_type in quantisable and _onnx_groups(n.name, n.op_type, n_layers) & keep
    ]
    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        op_types_to_quantize=list(op_types) if op_types is not None else None,
        extra_options={"DefaultTensorType": 1},  # fused ops carry no type information for shape inference
    )
    return excluded


# The cached graph reads its word embeddings from outside the session (issue #17, peak memory): the fp32 table
# (250k x 384, 384 MB, kept fp32 for accuracy) sits in ``<graph>.words``, and each call feeds the session only
# the rows its batch uses (``word_embeddings``) and the batch's tokens as indices into them (``word_index``).
# Left in the memory-mapped weights file, the table's lookups pulled ~300 MB of it into the process by page
# faults and fault-around; read with pread, only the rows a batch uses are ever in the process's memory.
WORD_TABLE_SUFFIX = ".words"
WORD_TABLE_INPUT = "word_embeddings"
WORD_INDEX_INPUT = "word_index"


class WordTable:
    """Rows of an fp32 [rows, hidden] table in a raw file, read on demand (pread: no mapping, no read-ahead)."""

    def __init__(self, path: str | Path, hidden: int) -> None:
        import os

        self.hidden = hidden
        self.row_bytes = hidden * 4
        self.file = Path(path).open("rb")  # noqa: SIM115 - held open for the session's lifetime
        self.rows = os.fstat(self.file.fileno()).st_size // self.row_bytes

    def lookup(self, ids: Any) -> Any:
        """The table's rows for these (unique) ids, as a float32 [len(ids), hidden] array."""
        import os

        import numpy as np

        out = np.empty((len(ids), self.hidden), dtype=np.float32)
        handle = self.file.fileno()
        for row, token in enumerate(ids.tolist()):
            if not 0 <= token < self.rows:
                raise ValueError(f"token id {token} is outside the word-embedding table ({self.rows} rows)")
            if os.preadv(handle, [out[row]], token * self.row_bytes) != self.row_bytes:
                raise OSError(f"short read from {self.file.name}")
        return out


def threads_spin() -> bool:
    """Whether this process's idle compute threads should spin (busy-wait) rather than sleep: as its OpenMP threads
    do, by ``OMP_WAIT_POLICY``, which ``fhir-ner worker`` sets from ``FHIR_NER_THREAD_WAIT`` before PyTorch loads
    (an ``OMP_WAIT_POLICY`` already in the environment wins). ONNX Runtime's own pool spins by default; where the
    I/O worker and an int8 inference worker share a 2-core machine its spinning took CPU from both (session 24:
    the int8 worker's CPU a note 0.90 s against fp32's 0.81, with passive OpenMP threads). The variable is read
    rather than the settings because it is the policy OpenMP actually runs with in this process."""
    import os

    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


class OnnxRunner:
    """An ONNX Runtime session with the tagger's forward signature: (ids, mask) -> logits.

    A graph with a ``word_embeddings`` input (the cached int8 graph) gets its word-embedding rows from the
    table file beside it (``WordTable``); any other graph (e.g. the benchmarks' variants) is fed the ids.

    ``rowwise`` (the tagger's pipeline): each row runs alone, without its padding. Dynamic int8 quantises a
    call's activations with one scale, so in a batch a window's logits depended on the windows beside it (the
    shipped default: 113 of 769 spans of 24 CodiEsp notes differed between tagging each note alone and all
    together); row by row, a note's spans depend on that note only, as in fp32.
    """

    def __init__(
        self, path: str | Path, threads: int | None = None, rowwise: bool = False, spin: bool | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle threads spin or sleep as PyTorch's do in this process (:func:`threads_spin`; ``spin`` overrides).
        spinning = threads_spin() if spin is None else spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = str(path)
        self.rowwise = rowwise
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.words: WordTable | None = None
        if WORD_TABLE_INPUT in inputs:
            hidden = int(inputs[WORD_TABLE_INPUT].shape[1])
            self.words = WordTable(Path(path).with_name(Path(path).name + WORD_TABLE_SUFFIX), hidden)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        import numpy as np

        ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy()
        if not self.rowwise or len(ids) < 2:
            return torch.from_numpy(self.run("logits", ids, mask))
        rows = self.run_rows("logits", ids, mask)  # the pipeline's rows are left-aligned: tokens, then padding
        logits = np.zeros((len(ids), ids.shape[1], *rows[0].shape[1:]), dtype=rows[0].dtype)
        for row, out in enumerate(rows):
            logits[row, : len(out)] = out
        return torch.from_numpy(logits)

    def _token_inputs(self, ids: Any) -> dict[str, Any]:
        """A batch's token inputs: its ids, or (a graph with a word table) the batch's word-embedding rows, read
        once, and each token's index into them."""
        import numpy as np

        if self.words is None:
            return {"input_ids": ids}
        unique, index = np.unique(ids, return_inverse=True)
        return {
            WORD_TABLE_INPUT: self.words.lookup(unique),
            WORD_INDEX_INPUT: index.reshape(ids.shape).astype(np.int64),
        }

    def run_rows(self, output: str, ids: Any, attention_mask: Any) -> list[Any]:
        """``run`` for each row alone, without its padding (right-padded rows), as a list of per-row outputs; the
        word-embedding rows of the whole batch are read once."""
        tokens = self._token_inputs(ids)
        results = []
        for row in range(len(ids)):
            length = int(attention_mask[row].sum())
            feed = {"attention_mask": attention_mask[row : row + 1, :length]}
            for name, value in tokens.items():
                feed[name] = value if name == WORD_TABLE_INPUT else value[row : row + 1, :length]
            results.append(self.session.run([output], feed)[0][0])
        return results

    def run(self, output: str, ids: Any, attention_mask: Any) -> Any:
        """The graph's ``output`` for a batch of token ids and its mask (int64 numpy arrays), as numpy."""
        (result,) = self.session.run([output], {"attention_mask": attention_mask, **self._token_inputs(ids)})
        return result


def quantize_onnx_static(
    src: str | Path,
    dst: str | Path,
    n_layers: int,
    windows: Iterable[list[int]],
    keep_fp32: Iterable[str] = (),
    method: str = "MinMax",
    quant_format: str = "QDQ",
    activation_signed: bool = False,
    extra_options: dict[str, Any] | None = None,
) -> list[str]:
    """ONNX Runtime static int8: activation scales fixed from calibration windows (training notes).

    ``quant_format`` QDQ (Quantize/DequantizeLinear pairs that the session fuses) or QOperator
    (``QLinearMatMul`` and friends written out); ``activation_signed`` gives s8 activations (s8s8) instead of
    u8 (u8s8); ``extra_options`` go to ``quantize_static`` (e.g. ``ActivationSymmetric``, ``MatMulConstBOnly``).
    Only MatMul and Conv are quantised; the fused ``Attention`` op has no static form, so the query/key/value
    projection stays fp32 here. Returns the names of the nodes kept in fp32.
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    keep = set(check_groups(keep_fp32))
    graph = onnx.load(str(src), load_external_data=False).graph
    excluded = [
        n.name
        for n in graph.node
        if n.op_type in ("MatMul", "Conv") and _onnx_groups(n.name, n.op_type, n_layers) & keep
    ]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(
                {"input_ids": np.asarray([w], dtype=np.int64), "attention_mask": np.ones((1, len(w)), dtype=np.int64)}
                for w in windows
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=getattr(QuantFormat, quant_format),
        op_types_to_quantize=["MatMul", "Conv"],
        per_channel=True,
        activation_type=QuantType.QInt8 if activation_signed else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"DefaultTensorType": 1, **(extra_options or {})},
    )
    return excluded


# --------------------------------------------------------------------------- the int8 model of a checkpoint

# The recipe `--precision int8` uses unless the checkpoint's record names another (chosen by measurement).
# Dynamic int8 keeps the feed-forward output projections in fp32: their inputs are the GELU outputs, whose
# per-call uint8 scale cost 1.5 / 0.7 points (strict / overlap F1) on the default's validation notes; with
# them fp32 the spans match fp32's scores, at no measurable cost in speed (README, "Int8 on CPUs").
DEFAULT_KEEP_FP32: tuple[str, ...] = ("embeddings", "head", "ffn_out")
# Static int8 (QDQ) kept accuracy without that (ONNX Runtime runs its MatMuls as weight-only int8).
STATIC_KEEP_FP32: tuple[str, ...] = ("embeddings", "head")
# Static int8 (activation ranges calibrated on training notes) needs those notes' token windows: the
# calibration script stores them in the checkpoint, so the graph can be rebuilt wherever it is used.
CALIBRATION_FILE = "int8_calibration.safetensors"
RECIPE_VERSION = 3  # bump when the exported graph changes: it is part of the cache key
# (2: external weights; 3: word embeddings read outside the session, ``WordTable``)
# The cached graph keeps its weights in a side file: ONNX Runtime maps it into memory instead of parsing a
# 430 MB protobuf and copying every initializer out of it (a transient of ~340 MB at session start, which made
# the int8 path's peak higher than fp32's).
WEIGHTS_DATA_SUFFIX = ".data"
RECORD_KEY = "int8"  # tagger_config.json: extra.int8 = what was chosen and how it scored
# Config fields the exported graph does not depend on, left out of its cache key.
GRAPH_INDEPENDENT_CONFIG = frozenset(
    {"extra", "min_span_score", "min_span_score_by_language", "window_leads", "model_revision"}
)
ACCURACY_BAR = 0.005  # strict and overlap F1 within half a point of fp32 on the validation notes


def weights_digest(folder: Path) -> str:
    """sha256 of a checkpoint's weights file: ties a record (and a cached graph) to these exact weights."""
    import hashlib

    digest = hashlib.sha256()
    with (folder / "model.safetensors").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def int8_record(tagger: Any) -> dict[str, Any] | None:
    record = tagger.config.extra.get(RECORD_KEY)
    return record if isinstance(record, dict) else None


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def int8_validated(tagger: Any) -> bool:
    """True when the checkpoint records that its int8 model met the accuracy bar, for these very weights."""
    record = int8_record(tagger)
    if not record or not record.get("meets_bar") or tagger.source is None or not onnxruntime_available():
        return False
    if not record.get("auto", True):  # met the accuracy bar, but its owner chose fp32 for auto (speed, memory)
        return False
    return bool(record.get("weights_sha256") == weights_digest(Path(tagger.source)))


# bf16 on CPUs: tagger_config.json's extra.bf16 records how PyTorch's bf16 autocast scored against fp32 on the
# validation sets of every language (benchmarks/eval_languages.py --record-bf16).
BF16_RECORD_KEY = "bf16"


def cpu_bf16_units() -> dict[str, bool]:
    """Which native bf16 matrix instructions this CPU has, by PyTorch's own probes (false where a PyTorch lacks
    one): AMX tiles and AVX512-BF16 dot products."""
    found: dict[str, bool] = {}
    for name, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        try:
            found[name] = bool(getattr(torch.cpu, probe)())
        except (AttributeError, RuntimeError):
            found[name] = False
    return found


def cpu_bf16_isa() -> str:
    """What PyTorch's bf16 matrix products run on here: "amx", "avx512_bf16" or "emulated". Rounding differs a little
    between them (the kernels sum in different orders), so a bf16 accuracy record says which it was measured on."""
    units = cpu_bf16_units()
    return "amx" if units["amx"] else "avx512_bf16" if units["avx512_bf16"] else "emulated"


def cpu_has_fast_bf16() -> bool:
    """True where PyTorch's bf16 matrix products run natively (oneDNN): AMX tiles (Intel Sapphire Rapids and later;
    the tagger measured 2.15x the HF pipeline's fp32) or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake; 2.22x
    on a Zen 4-class EPYC). Elsewhere bf16 is emulated and slower than fp32, so ``auto`` never picks it; training's
    bf16 autocast on CPUs asks the same."""
    return any(cpu_bf16_units().values())


def bf16_validated(tagger: Any) -> bool:
    """True when the checkpoint records that bf16 met the accuracy bar in every language, for these very weights."""
    record = tagger.config.extra.get(BF16_RECORD_KEY)
    if not isinstance(record, dict) or not record.get("meets_bar") or not record.get("auto", True):
        return False
    return tagger.source is not None and record.get("weights_sha256") == weights_digest(Path(tagger.source))


def recipe(tagger: Any) -> dict[str, Any]:
    """How the int8 graph is built: the record's choice, else static when calibration windows are there."""
    record = int8_record(tagger) or {}
    calibrated = tagger.source is not None and (Path(tagger.source) / CALIBRATION_FILE).is_file()
    method = record.get("method") or ("onnxruntime-static" if calibrated else "onnxruntime-dynamic")
    keep = record.get("keep_fp32", list(STATIC_KEEP_FP32 if method == "onnxruntime-static" else DEFAULT_KEEP_FP32))
    return {"method": method, "per_channel": True, "keep_fp32": check_groups(keep)}


def save_calibration_windows(folder: Path, windows: list[list[int]]) -> None:
    from safetensors.torch import save_file

    ids = torch.tensor([i for w in windows for i in w], dtype=torch.int32)
    lengths = torch.tensor([len(w) for w in windows], dtype=torch.int32)
    save_file({"ids": ids, "lengths": lengths}, str(folder / CALIBRATION_FILE), metadata={"format": "pt"})
    (folder / CALIBRATION_FILE).chmod(0o644)


def load_calibration_windows(folder: Path) -> list[list[int]]:
    from safetensors.torch import load_file

    data = load_file(str(folder / CALIBRATION_FILE))
    ids = data["ids"].tolist()
    windows, start = [], 0
    for length in data["lengths"].tolist():
        windows.append(ids[start : start + length])
        start += length
    return windows


def graph_cache_root(cache_dir: Path | None = None) -> Path:
    """Where built ONNX graphs are cached: ``cache_dir`` (``FHIR_NER_CACHE_DIR``), else the encoders' cache."""
    from worker.nlp.e5_convert import _default_cache_root

    if not onnxruntime_available():
        raise RuntimeError("int8 inference needs onnxruntime (pip install onnxruntime)")
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached_graph(
    root: Path, prefix: str, identity: Any, file_name: str, build: Callable[[Path, Path], dict[str, Any]]
) -> Path:
    """``root/<prefix>-<hash of identity>/<file_name>``, built by ``build(folder, graph)`` on first use.

    ``identity`` (JSON) must name everything the graph depends on (weights, recipe, library versions, and
    ``RECIPE_VERSION``). ``build`` writes the graph (its scratch files beside it are removed) and returns what
    ``meta.json`` records. The entry appears complete or not at all: built in a temporary folder, its weights
    moved to side files (``_externalise_weights``), renamed into place under a file lock, so concurrent
    workers build it once.
    """
    import hashlib
    import json
    import os
    import shutil
    import tempfile

    from worker.nlp.e5_convert import file_lock

    key = json.dumps([identity, RECIPE_VERSION], sort_keys=True)
    folder = root / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    model = folder / file_name
    if model.is_file():
        return model
    with file_lock(root / f".{prefix}.lock"):
        if model.is_file():
            return model
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=root))
        try:
            meta = build(tmp, tmp / file_name)
            for leftover in tmp.iterdir():  # the raw and fused graphs, ONNX Runtime's augmented calibration copy
                if leftover.name != file_name:
                    leftover.unlink()
            meta["word_table"] = _externalise_weights(tmp / file_name)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            os.chmod(tmp, 0o755)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model


def int8_model_path(tagger: Any, cache_dir: Path | None = None) -> Path:
    """The checkpoint's int8 ONNX graph, exported, fused and quantised on first use, then cached.

    The cache entry is keyed by the weights' digest, the config, the recipe and the library versions
    (``cached_graph``).
    """
    import hashlib

    import onnxruntime

    root = graph_cache_root(cache_dir)
    if tagger.source is not None:
        weights = weights_digest(Path(tagger.source))
    else:  # a tagger built in memory: its parameters are the identity
        digest = hashlib.sha256()
        for name, tensor in sorted(tagger.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        weights = digest.hexdigest()
    chosen = recipe(tagger)
    smoothing = Path(tagger.source) / SMOOTHING_FILE if tagger.source is not None else None
    if smoothing is not None and smoothing.is_file():
        chosen["smoothing"] = hashlib.sha256(smoothing.read_bytes()).hexdigest()
    if chosen["method"] == "onnxruntime-static":
        if tagger.source is None or not (Path(tagger.source) / CALIBRATION_FILE).is_file():
            raise RuntimeError(f"static int8 needs {CALIBRATION_FILE} in the checkpoint (benchmarks/calibrate_int8.py)")
        chosen["calibration"] = hashlib.sha256((Path(tagger.source) / CALIBRATION_FILE).read_bytes()).hexdigest()
    # What decoding reads (threshold, window lead) and the revision that names the weights leave the graph as it is:
    # changing them must not rebuild it (a minute, and a 5.7 GB peak).
    config = {k: v for k, v in vars(tagger.config).items() if k not in GRAPH_INDEPENDENT_CONFIG}
    identity = [weights, config, chosen, torch.__version__, onnxruntime.__version__]

    def build(tmp: Path, model: Path) -> dict[str, Any]:
        encoder_config = tagger.encoder.config
        if "smoothing" in chosen and smoothing is not None:
            from safetensors.torch import load_file

            apply_smoothing(tagger, load_file(str(smoothing)))  # the tagger's weights are released after
        export_onnx(tagger, tmp / "raw.onnx")
        fused = optimize_onnx(
            tmp / "raw.onnx", tmp / "fused.onnx", encoder_config.num_attention_heads, encoder_config.hidden_size
        )
        if chosen["method"] == "onnxruntime-static":
            kept = quantize_onnx_static(
                tmp / "fused.onnx",
                model,
                encoder_config.num_hidden_layers,
                load_calibration_windows(Path(tagger.source)),
                keep_fp32=chosen["keep_fp32"],
            )
        else:
            kept = quantize_onnx_dynamic(
                tmp / "fused.onnx",
                model,
                encoder_config.num_hidden_layers,
                per_channel=chosen["per_channel"],
                keep_fp32=chosen["keep_fp32"],
            )
        return {**chosen, "weights_sha256": weights, "fused": fused, "kept_fp32_nodes": kept}

    return cached_graph(root, "tagger-int8", identity, "tagger.int8.onnx", build)


def _split_word_embeddings(model: Any, table: Path) -> list[int] | None:
    """Move the fp32 word-embedding table out of the graph into ``table`` (raw float32, row-major), in place.

    The table becomes the graph input ``word_embeddings`` (the rows a batch uses) and ``input_ids`` becomes
    ``word_index`` (each token's row in it); the arithmetic is unchanged. Returns the table's shape, or None
    when the graph has no fp32 table to move (e.g. embeddings quantised).
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    node = next((n for n in graph.node if n.op_type == "EmbedLayerNormalization"), None)
    if node is None or node.input[2] not in initializers:
        return None
    weights = initializers[node.input[2]]
    if weights.data_type != onnx.TensorProto.FLOAT or len(weights.dims) != 2:
        return None
    numpy_helper.to_array(weights).astype("<f4", copy=False).tofile(table)
    table.chmod(0o644)
    shape = [int(d) for d in weights.dims]
    graph.initializer.remove(weights)
    node.input[2] = WORD_TABLE_INPUT
    graph.input.append(onnx.helper.make_tensor_value_info(WORD_TABLE_INPUT, onnx.TensorProto.FLOAT, ["rows", shape[1]]))
    for value in graph.input:
        if value.name == "input_ids":
            value.name = WORD_INDEX_INPUT
    for other in graph.node:
        for position, name in enumerate(other.input):
            if name == "input_ids":
                other.input[position] = WORD_INDEX_INPUT
    return shape


def _externalise_weights(path: Path) -> list[int] | None:
    """Rewrite the graph with its initializers in ``<name>.data`` beside it (memory-mapped by ONNX Runtime),
    and its word-embedding table in ``<name>.words`` (read row by row, ``WordTable``); returns that table's
    shape (None if the graph kept none)."""
    import onnx

    model = onnx.load(str(path))
    table = _split_word_embeddings(model, path.with_name(path.name + WORD_TABLE_SUFFIX))
    data = path.name + WEIGHTS_DATA_SUFFIX
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    (path.parent / data).chmod(0o644)
    return table


def release_weights(tagger: nn.Module) -> None:
    """Drop the tagger's torch weights (an ONNX Runtime session runs it from now on); config and tokenizer stay.

    The freed memory is handed back to the system (glibc's ``malloc_trim``) before the session allocates its
    own, so the process's peak is not the torch weights and the session's weights together.
    """
    import gc

    from worker.token_int8 import release_freed_heap

    tagger.to_empty(device="meta")
    gc.collect()
    release_freed_heap()
