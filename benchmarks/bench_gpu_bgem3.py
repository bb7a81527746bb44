"""GPU: a BGE-M3-shaped tagger (XLM-RoBERTa, 24 layers, hidden 1024, 16 heads; random weights) in bf16.

Measures tokens/s, sequences/s and achieved TFLOP/s at 512, 2048 and 8192 tokens against the device's peak
bf16 dense throughput (pass --peak-tflops; 989 for an H100 SXM, 989 for an H200). The 2048-token row's
sequences/s is the notes/s of ~2,000-token notes (issue 8); for the inference worker's batching on a GPU, run
``benchmarks/bench_batching.py --device cuda``.

    python benchmarks/bench_gpu_bgem3.py --peak-tflops 989
"""

from __future__ import annotations

import argparse
import time

import torch


def forward_flops(layers: int, hidden: int, ffn: int, seq: int, batch: int) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add): projections, attention, feed-forward."""
    per_layer = 2 * seq * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * seq * seq * hidden
    return float(batch * layers * per_layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens-per-batch", type=int, default=32768)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from worker.nlp.tagger import CnnTaggingHead

    config = XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
        attn_implementation="sdpa",
    )
    device = torch.device("cuda")
    encoder = XLMRobertaModel(config, add_pooling_layer=False).to(device, torch.bfloat16).eval()
    head = CnnTaggingHead(1024, 3, 256, 5, 0.0).to(device, torch.bfloat16).eval()
    print(f"{torch.cuda.get_device_name()}; peak {args.peak_tflops} TFLOP/s bf16")
    # At 2048 tokens a sequence is a ~2,000-token note in one window: seqs/s is that note size's notes/s.
    print(f"{'tokens':>8}{'batch':>7}{'tokens/s':>12}{'seqs/s':>9}{'TFLOP/s':>10}{'% peak':>8}")
    for seq in args.lengths:
        batch = max(1, args.tokens_per_batch // seq)
        ids = torch.randint(5, 250000, (batch, seq), device=device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            for _ in range(2):
                head(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.iterations):
                head(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.iterations
        flops = forward_flops(24, 1024, 4096, seq, batch) / seconds / 1e12
        rate = f"{batch * seq / seconds:>12.0f}{batch / seconds:>9.1f}"
        print(f"{seq:>8}{batch:>7}{rate}{flops:>10.1f}{100 * flops / args.peak_tflops:>7.1f}%")


if __name__ == "__main__":
    main()
