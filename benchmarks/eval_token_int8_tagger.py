"""Per-token int8 for the tagger's encoder (issue 17, tried, not shipped): accuracy against fp32, and speed.

The linker's query encoder runs in per-token int8 (worker/token_int8.py: int8 weights per output channel, each
token's activations with its own scale). This applies the same arithmetic to the tagger's twelve layers, in PyTorch,
and scores the validation sets of ``eval_languages.py`` through the production pipeline (the window lead and the
span-edge rules, the checkpoint's threshold) against the fp32 scores the checkpoint's bf16 record holds:

    .venv/bin/python benchmarks/eval_token_int8_tagger.py                 # every linear layer int8
    .venv/bin/python benchmarks/eval_token_int8_tagger.py --keep down     # feed-forward output projections fp32
    .venv/bin/python benchmarks/eval_token_int8_tagger.py --speed         # tokens/s: fp32, bf16, int8, int8 compiled
    .venv/bin/python benchmarks/eval_token_int8_tagger.py --checkpoint CKPT   # another tagger (default: shipped)
    .venv/bin/python benchmarks/eval_token_int8_tagger.py --weight-bits 7  # weights in 7 bits (AVX2's u8 x s8 product)

``--keep`` names linear groups left fp32: qkv, out (attention output), up, down (feed-forward), each optionally
followed by a layer number (``down11``). Scoring multiplies the integers with the fastest exact product here
(``worker.token_int8.int8_product``: ``torch._int_mm``, ONNX Runtime's u8 x s8 where a side has 7 bits, or
float32): the same integers, the same result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
warnings.simplefilter("ignore")
DEFAULT_CHECKPOINT = ROOT / "worker" / "models" / "default"


class Int8Hidden(torch.nn.Module):
    """Stands in for the tagger's encoder: the same embeddings, layer norms and attention (float32), the linear
    layers in per-token int8 except the groups in ``keep``; returns ``last_hidden_state`` as the encoder does."""

    def __init__(
        self,
        encoder: Any,
        keep: set[str],
        weight_levels: int = 127,
        product: str = "int_mm",
        activation_levels: int = 127,
    ) -> None:
        from worker.token_int8 import encoder_layers

        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.hidden, self.heads = int(encoder.config.hidden_size), int(encoder.config.num_attention_heads)
        self.layers = encoder_layers(encoder, keep, weight_levels, activation_levels)
        self.exact = product  # worker.token_int8.PRODUCTS: any of them gives the same result

    def body(self, x: torch.Tensor, blocked: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        head_size = self.hidden // self.heads
        for layer in self.layers:
            qkv = layer["qkv"](x, self.exact).view(batch, length, 3, self.heads, head_size)
            query, key, value = qkv.permute(2, 0, 3, 1, 4)
            context = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=blocked)
            context = context.transpose(1, 2).reshape(batch * length, self.hidden)
            x = layer["norm1"](layer["out"](context, self.exact) + x)
            x = layer["norm2"](layer["down"](layer["act"](layer["up"](x, self.exact)), self.exact) + x)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
        batch, length = input_ids.shape
        x = self.encoder.embeddings(input_ids=input_ids).reshape(batch * length, self.hidden)
        blocked = torch.zeros(batch, 1, 1, length, dtype=x.dtype)
        blocked.masked_fill_(~attention_mask.bool()[:, None, None, :], float("-inf"))
        hidden = self.body(x, blocked, batch, length)
        return types.SimpleNamespace(last_hidden_state=hidden.view(batch, length, self.hidden))


def accuracy(checkpoint: Path, keep: set[str], weight_levels: int = 127, activation_levels: int = 127) -> None:
    from eval_languages import validation

    import worker.nlp.training as training
    from worker.nlp.tagger import ClinicalTagger
    from worker.token_int8 import int8_product

    original = ClinicalTagger.from_pretrained.__func__  # type: ignore[attr-defined]

    def with_int8(cls: type, *args: Any, **kwargs: Any) -> Any:
        tagger = original(cls, *args, **kwargs)
        tagger.encoder = Int8Hidden(
            tagger.encoder, keep, weight_levels, int8_product(weight_levels, activation_levels), activation_levels
        )
        return tagger

    training.ClinicalTagger.from_pretrained = classmethod(with_int8)  # type: ignore[method-assign, assignment]
    config = json.loads((checkpoint / "tagger_config.json").read_text(encoding="utf-8"))
    reference = config["extra"]["bf16"]["by_language"]  # fp32's scores, recorded beside bf16's
    from worker.nlp.tagger import TaggerConfig

    scores = validation(checkpoint, TaggerConfig.from_json(config))
    worst = 0.0
    for name, result in scores.items():
        if not isinstance(result, dict) or "threshold" not in result:
            continue
        mine, fp32 = result["threshold"], reference[name[:2]]["fp32"]
        strict = (mine["strict_f1"] - fp32["strict_f1"]) * 100
        overlap = (mine["overlap_f1"] - fp32["overlap_f1"]) * 100
        worst = min(worst, strict, overlap)
        print(
            f"{name[:2]}  int8 {mine['strict_f1']:.4f} / {mine['overlap_f1']:.4f}  fp32 {fp32['strict_f1']:.4f} / "
            f"{fp32['overlap_f1']:.4f}  points {strict:+.2f} / {overlap:+.2f}"
        )
    print(
        f"kept fp32: {sorted(keep) or 'nothing'}; weights {weight_levels.bit_length() + 1} bits, "
        f"tokens {activation_levels.bit_length() + 1} bits; "
        f"worst {worst:+.2f} points (bar -0.50)"
    )


def speed(checkpoint: Path, keep: set[str], windows: int = 8, length: int = 512) -> None:
    from worker.nlp.tagger import ClinicalTagger

    encoder = ClinicalTagger.from_pretrained(checkpoint).eval().encoder
    int8 = Int8Hidden(encoder, keep)
    ids = torch.randint(5, 200_000, (windows, length))
    mask = torch.ones_like(ids)
    compiled_body = torch.compile(int8.body, dynamic=False)

    def compiled() -> Any:
        x = encoder.embeddings(input_ids=ids).reshape(windows * length, int8.hidden)
        return compiled_body(x, torch.zeros(windows, 1, 1, length), windows, length)

    started = time.perf_counter()
    with torch.inference_mode():
        compiled()
    print(f"compiled in {time.perf_counter() - started:.1f} s")

    def bf16() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(input_ids=ids, attention_mask=mask)

    runs = {
        "fp32": lambda: encoder(input_ids=ids, attention_mask=mask),
        "bf16": bf16,
        "int8": lambda: int8(ids, mask),
        "int8 compiled": compiled,
    }
    with torch.inference_mode():
        for name, run in runs.items():
            best = min(_timed(run) for _ in range(3))
            print(f"{name:14s} {windows * length / best:8.0f} tokens/s")


def _timed(run: Any) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default="", help="linear groups left fp32, comma-separated (qkv, out, up, down)")
    parser.add_argument("--speed", action="store_true", help="time the encoder instead of scoring it")
    parser.add_argument(
        "--weight-bits",
        type=int,
        choices=(8, 7),
        default=8,
        help="7: weights in -63..63, which AVX2's u8 x s8 product adds without saturating (bench_int8_products.py)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="a tagger with a bf16 record (its fp32 scores)"
    )
    parser.add_argument(
        "--activation-bits", type=int, choices=(8, 7), default=8, help="7: each token's integers in -63..63"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep = {name.strip() for name in args.keep.split(",") if name.strip()}
    levels = 2 ** (args.weight_bits - 1) - 1
    activation_levels = 2 ** (args.activation_bits - 1) - 1
    speed(args.checkpoint, keep) if args.speed else accuracy(args.checkpoint, keep, levels, activation_levels)


if __name__ == "__main__":
    main()
