"""Which int8 matrix product pays on this CPU: the encoders' shapes, each kernel timed and checked for exactness.

    .venv/bin/python benchmarks/bench_int8_products.py [--threads 1] [--repeats 5]

Per shape (rows x inner x outer: a note's mention tokens and a batch of tagger windows against e5-small's
projections) it times, best of ``--repeats``:

* ``torch f32``: the same integers multiplied in float32 (what :mod:`worker.token_int8` falls back to);
* ``torch._int_mm``: oneDNN's int8 product (fast with VNNI: AVX512-VNNI, AVX-VNNI, AMX);
* ``ort s8s8``: ONNX Runtime's ``MatMulInteger`` on int8 x int8;
* ``ort u8s8``: the same on uint8 activations (int8 + 128, corrected by the weights' column sums) x int8 weights,
  MLAS's fast path on AVX2 (``vpmaddubsw``), which adds pairs of products in 16 bits and saturates;
* ``ort u8s7``: the same with weights in 7 bits (-63..63), where no pair can saturate.

``exact`` says whether the kernel's integers equal the int32 product. A kernel that is both exact and faster than
``torch f32`` would give per-token int8 (worker/token_int8.py) its speed on this CPU without changing a result.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.token_int8 import best_seconds  # noqa: E402

SHAPES = [(256, 384, 1152), (256, 384, 1536), (256, 1536, 384), (4096, 384, 1536)]


def best_ms(run: Callable[..., object], arguments: tuple[Any, ...], repeats: int) -> float:
    return round(best_seconds(lambda: run(*arguments), repeats) * 1000, 3)


def matmul_integer_session(left_type: int, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    left = helper.make_tensor_value_info("A", left_type, ["M", "K"])
    right = helper.make_tensor_value_info("B", TensorProto.INT8, ["K", "N"])
    out = helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", "N"])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g", [left, right], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from onnx import TensorProto

    torch.set_num_threads(args.threads)
    signed = matmul_integer_session(TensorProto.INT8, args.threads)
    unsigned = matmul_integer_session(TensorProto.UINT8, args.threads)
    rng = np.random.default_rng(0)
    results = []
    for rows, inner, outer in SHAPES:
        left = rng.integers(-127, 128, (rows, inner), dtype=np.int8)
        shifted = (left.astype(np.int16) + 128).astype(np.uint8)
        row: dict[str, Any] = {"shape": f"{rows}x{inner}x{outer}"}
        for name, low, high in (("", -127, 128), ("7bit", -63, 64)):
            right = rng.integers(low, high, (inner, outer), dtype=np.int8)
            truth = left.astype(np.int32) @ right.astype(np.int32)
            column_sums = 128 * right.astype(np.int32).sum(axis=0)[None, :]
            if not name:
                left_float = torch.from_numpy(left.astype(np.float32))
                right_float = torch.from_numpy(right.astype(np.float32))
                row["torch f32"] = {"ms": best_ms(torch.matmul, (left_float, right_float), args.repeats), "exact": True}
                left_t, right_t = torch.from_numpy(left), torch.from_numpy(right)
                exact = bool(np.array_equal(torch._int_mm(left_t, right_t).numpy(), truth))
                row["torch._int_mm"] = {
                    "ms": best_ms(torch._int_mm, (left_t, right_t), args.repeats),
                    "exact": exact,
                }
                feeds = {"A": left, "B": right}
                exact = bool(np.array_equal(signed.run(None, feeds)[0], truth))
                row["ort s8s8"] = {"ms": best_ms(signed.run, (None, feeds), args.repeats), "exact": exact}
            feeds_u = {"A": shifted, "B": right}
            exact = bool(np.array_equal(unsigned.run(None, feeds_u)[0] - column_sums, truth))
            key = "ort u8s7" if name else "ort u8s8"
            row[key] = {"ms": best_ms(unsigned.run, (None, feeds_u), args.repeats), "exact": exact}
        results.append(row)
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line for line in lines if line.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    print(json.dumps({"threads": args.threads, "cpu": isa, "products": results}, indent=1))


if __name__ == "__main__":
    main()
