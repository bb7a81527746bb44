"""The CPU's matrix-multiply peak at the encoder's own shapes: fp32 (PyTorch) and int8 (ONNX Runtime, PyTorch).

The roofline the README compares the tagger with: the best GFLOP/s (fp32) or GOP/s (int8: one multiply-add
is two operations, as for fp32) that each library reaches on the e5-small encoder's matrix products, at
8 windows of 512 tokens (M = 4,096 rows), with the given threads. The best of ``--repeat`` runs is kept,
so a busy machine lowers the figures less than it lowers a mean.

- fp32: ``torch.matmul`` (MKL / oneDNN);
- int8 ONNX Runtime: ``MatMulInteger`` (uint8 activations x int8 weights, int32 out: MLAS's kernel, the one the
  int8 tagger uses; it picks AVX2 ``vpmaddubsw``, AVX-VNNI / AVX-512 VNNI ``vpdpbusd`` or AMX tiles);
- int8 PyTorch: ``torch.ops.quantized.linear_dynamic`` (fbgemm / oneDNN, the kernel of dynamic quantisation).

    .venv/bin/python benchmarks/bench_gemm_peak.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.token_int8 import best_seconds  # noqa: E402

SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (K, N): projections, feed-forward in, feed-forward out


def ort_matmul_integer(m: int, k: int, n: int, threads: int) -> Callable[[], object]:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    weight = np.random.default_rng(0).integers(-127, 127, (k, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 255, (m, k), dtype=np.uint8)
    return lambda: session.run(None, {"a": a})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    m = args.rows
    print(f"M = {m}, {args.threads} threads, best of {args.repeat}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'K x N':<12}{'fp32 torch':>14}{'int8 ORT':>14}{'int8 torch':>14}   (G(FL)OP/s)")
    for k, n in SHAPES:
        ops = 2 * m * k * n
        a = torch.randn(m, k)
        w = torch.randn(k, n)
        fp32 = ops / best_seconds(lambda a=a, w=w: torch.matmul(a, w), args.repeat) / 1e9
        ort_int8 = ops / best_seconds(ort_matmul_integer(m, k, n, args.threads), args.repeat) / 1e9
        torch.backends.quantized.engine = "x86"
        qw = torch.quantize_per_channel(
            torch.randn(n, k), torch.full((n,), 0.02), torch.zeros(n, dtype=torch.long), 0, torch.qint8
        )
        packed = torch.ops.quantized.linear_prepack(qw, torch.zeros(n))
        torch_int8 = ops / best_seconds(lambda a=a, p=packed: torch.ops.quantized.linear_dynamic(a, p), args.repeat)
        print(f"{f'{k} x {n}':<12}{fp32:>14.0f}{ort_int8:>14.0f}{torch_int8 / 1e9:>14.0f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
