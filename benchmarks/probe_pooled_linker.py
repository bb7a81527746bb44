"""Probe: could the tagger's own hidden states replace the linker's second encoder pass? (issue 14, cost)

    .venv/bin/python benchmarks/probe_pooled_linker.py [--data ../shared/data/es/codiesp] [--lam 100]

For every CodiEsp train and dev mention (gold spans, never test), the shipped tagger's encoder reads the whole
note (its windows) and its layer-6 input (e5-small's frozen lower layers) and final states are mean-pooled over
the mention's tokens. A ridge projection (closed form) is fitted on train to the shipped linker's vector of the
mention text; on dev, each DISEASE mention is coded through the worker's lookup with the projected vector in
place of the encoder's, against the worker's own path. Top-1/top-5 per half of dev (documents split as in
calibrate_linker.py). About 9 minutes on one busy core (the tagger reads 745 notes).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)


def half(document: str) -> int:
    return hashlib.sha256(document.encode()).digest()[0] % 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es" / "codiesp")
    parser.add_argument("--lam", type=float, default=100.0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from mappings.profile import load_profile
    from mappings.terminology import code_request
    from worker.nlp.decoding import plan_windows
    from worker.predict import load_pipeline
    from worker.terminology import terminology_for

    pipe = load_pipeline(None, 8, 1)
    tokenizer, encoder = pipe.tokenizer, pipe.tagger.encoder
    features: dict[str, list[tuple[str, str, str, str, np.ndarray]]] = {}
    started = time.time()
    for split in ("train", "dev"):
        mentions: dict[str, list[tuple[str, str, str, int, int]]] = collections.defaultdict(list)
        for line in (args.data / split / f"{split}X.tsv").read_text(encoding="utf-8").splitlines():
            doc, kind, code, mention, positions = line.split("\t")[:5]
            spans = [tuple(map(int, p.split())) for p in positions.split(";")]
            mentions[doc].append((kind, code.upper(), " ".join(mention.split()), spans[0][0], spans[-1][1]))
        rows = []
        for doc, found in sorted(mentions.items()):
            text = (args.data / split / "text_files" / f"{doc}.txt").read_text(encoding="utf-8")
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], np.asarray(encoded["offset_mapping"]).reshape(-1, 2)
            states = np.zeros((len(ids), 768), np.float32)
            seen = np.zeros((len(ids), 1), np.float32)
            with torch.inference_mode():
                for start, end in plan_windows(len(ids), pipe.window, pipe.overlap):
                    window = torch.tensor([pipe.prefix_ids + ids[start:end] + pipe.suffix_ids])
                    out = encoder(input_ids=window, attention_mask=torch.ones_like(window), output_hidden_states=True)
                    k = len(pipe.prefix_ids)
                    both = torch.cat([out.hidden_states[6], out.hidden_states[12]], dim=-1)[0, k : k + end - start]
                    states[start:end] += both.numpy()
                    seen[start:end] += 1
            states /= np.maximum(seen, 1)
            for kind, code, mention, a, b in found:
                tokens = np.flatnonzero((offsets[:, 0] < b) & (offsets[:, 1] > a))
                if len(tokens):
                    rows.append((doc, kind, code, mention, states[tokens].mean(0)))
        features[split] = rows
        print(f"{split}: {len(rows)} mentions, {time.time() - started:.0f}s", file=sys.stderr)

    profile = load_profile()
    service = terminology_for(profile, "auto")
    assert service is not None and service.store is not None
    options = profile.labels["DISEASE"].codes
    train = features["train"]
    texts = sorted({row[3] for row in train})
    target = dict(zip(texts, service.store.encoder.encode(texts), strict=True))
    x = np.stack([row[4] for row in train])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / scale
    y = np.stack([target[row[3]] for row in train])
    weights = np.linalg.solve(xs.T @ xs + args.lam * np.eye(xs.shape[1]), xs.T @ y)
    dev = [row for row in features["dev"] if row[1] == "DIAGNOSTICO"]
    projected = ((np.stack([row[4] for row in dev]) - mean) / scale) @ weights
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    report: dict[str, dict[str, float]] = {}
    for name in ("linker", "pooled"):
        hits = {k: [0, 0, 0] for k in (0, 1)}
        for row, vector in zip(dev, projected, strict=True):
            request = code_request(row[3], "DISEASE", options, "es")
            encode = (lambda _texts, v=vector: v[None, :]) if name == "pooled" else None
            ranked = [c.code for c in service.lookup([request], encode=encode)[0]]
            h = hits[half(row[0])]
            h[0] += ranked[:1] == [row[2]]
            h[1] += row[2] in ranked[:5]
            h[2] += 1
        report[name] = {f"half{k}_top{n}": round(h[i] / h[2], 4) for k, h in hits.items() for i, n in ((0, 1), (1, 5))}
        print(name, report[name], file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
