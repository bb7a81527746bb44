"""The forward pass alone: ONNX graphs of the tagger (and PyTorch fp32) on the same input, in one process.

Accuracy of each int8 variant comes from bench_int8.py; this script says which variant is fast and why: it
times one forward pass of a fixed batch (token ids drawn at random from the vocabulary; the arithmetic does not
depend on them), alternating between the methods round after round so that the shared machine's load falls on
all of them alike, and prints the op types of the graph each session actually runs (ORT_ENABLE_ALL, dumped by
the session), so one sees whether ``MatMulIntegerToFloat``, ``DynamicQuantizeMatMul``, ``QLinearMatMul`` or
``QAttention`` appear.

    .venv/bin/python benchmarks/bench_onnx_forward.py /tmp/h17/work/tagger.fp32.onnx /tmp/h17/work/tagger.X.onnx \\
        --torch --threads 2 --batch 2 --tokens 512 --rounds 10
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def session(path: Path, threads: int, config: list[str], dump: Path) -> tuple[Any, dict[str, int]]:
    """A CPU session as OnnxRunner makes it (plus any session config entries), and its optimised graph's ops."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(dump)
    for entry in config:
        key, _, value = entry.partition("=")
        options.add_session_config_entry(key, value)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(dump), load_external_data=False).graph.node)
    return sess, dict(ops)


def graph_feed(sess: Any, path: Path, ids: Any, mask: Any) -> dict[str, Any]:
    """The session's inputs for this batch: the ids, or (a cached int8 graph, whose word embeddings are read
    outside the session) the batch's table rows and each token's index into them, looked up once, untimed."""
    import numpy as np

    from worker.nlp.quantize import WORD_INDEX_INPUT, WORD_TABLE_INPUT, WORD_TABLE_SUFFIX, WordTable

    inputs = {i.name: i for i in sess.get_inputs()}
    if WORD_TABLE_INPUT not in inputs:
        return {"input_ids": ids, "attention_mask": mask}
    table = WordTable(path.with_name(path.name + WORD_TABLE_SUFFIX), int(inputs[WORD_TABLE_INPUT].shape[1]))
    unique, index = np.unique(ids, return_inverse=True)
    return {
        WORD_TABLE_INPUT: table.lookup(unique),
        WORD_INDEX_INPUT: index.reshape(ids.shape).astype(np.int64),
        "attention_mask": mask,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="*", type=Path)
    parser.add_argument("--torch", action="store_true", help="also PyTorch fp32 (the default checkpoint)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--config", action="append", default=[], help="session config entry key=value")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 200_000, size=(args.batch, args.tokens), dtype=np.int64)
    mask = np.ones_like(ids)
    runners: dict[str, Any] = {}
    if args.torch:
        from worker.nlp.tagger import ClinicalTagger
        from worker.runtime import default_model_path

        tagger = ClinicalTagger.from_pretrained(default_model_path()).eval()
        tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)

        def run_torch() -> None:
            with torch.inference_mode():
                tagger(tids, tmask)

        runners["torch-fp32"] = run_torch
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.graphs:
            sess, ops = session(path, args.threads, args.config, Path(tmp) / f"{path.stem}.opt.onnx")
            interesting = {k: v for k, v in sorted(ops.items()) if v and k not in ("Constant", "Shape", "Unsqueeze")}
            print(f"{path.name}: {interesting}", flush=True)
            feed = graph_feed(sess, path, ids, mask)
            name = path.name if path.name not in runners else f"{path.parent.name}/{path.name}"  # cache entries
            runners[name] = lambda sess=sess, feed=feed: sess.run(["logits"], feed)
        for run in runners.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        load = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, run in runners.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        load.append(os.getloadavg()[0])
    tokens = args.batch * args.tokens
    base = statistics.median(times[next(iter(times))])
    print(
        f"{args.batch} x {args.tokens} tokens, {args.threads} threads, {args.rounds} rounds, "
        f"load {load[0]:.2f}-{load[1]:.2f}"
    )
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"{name:<60} median {median * 1000:7.1f} ms  best {min(seconds) * 1000:7.1f} ms  "
            f"{tokens / median:7.0f} tok/s  x first {base / median:5.2f}"
        )


if __name__ == "__main__":
    main()
