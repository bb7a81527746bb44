"""Distil the linker's query encoder into a shallower student (issue 14's cost target).

    .venv/bin/python benchmarks/distill_linker_queries.py --layers 0,1,10,11 --epochs 3 --lr 2e-4 --out /tmp/student
    .venv/bin/python benchmarks/distill_linker_queries.py --install /tmp/student   # ship it in worker/linker/

The shipped index stays the teacher's (the 12-layer linker of ``worker/linker/``); only mentions are encoded by
the student, which is trained to put a string where the teacher puts it among the index's rows:
- strings: every indexed name (their teacher vectors are the index's rows: no teacher pass), and the mentions of
  the Spanish training corpora (CodiEsp train, SpaCCC train, CardioCCC train) and of the translated training
  excerpts (``train``, ``train2``), which the teacher encodes once. Never CodiEsp dev or a validation split.
- loss: 1 - cosine to the teacher's vector, plus the KL divergence between the teacher's and the student's
  softmax scores over the string's 48 nearest index rows (the teacher's) and 16 random ones: the student learns
  the neighbourhood the search reads, not only the point.
- the student: the teacher's embeddings (frozen) and the layers ``--layers`` (copied, trained), mean pooling and
  L2 norm like the teacher, and no ``query: `` prefix (two tokens fewer per mention).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore")


def brat_mentions(folder: Path) -> list[str]:
    out = []
    for ann in sorted(folder.rglob("*.ann")):
        for line in ann.read_text(encoding="utf-8").splitlines():
            if line.startswith("T") and "\t" in line:
                parts = line.split("\t")
                if len(parts) >= 3:
                    out.append(" ".join(parts[2].split()))
    return out


def training_mentions(data: Path) -> list[str]:
    texts = []
    for line in (data / "codiesp" / "train" / "trainX.tsv").read_text(encoding="utf-8").splitlines():
        texts.append(" ".join(line.split("\t")[3].split()))
    for corpus in ("spaccc-train", "cardioccc-train"):
        texts += brat_mentions(data / corpus)
    translated = ROOT / "worker" / "nlp" / "data" / "translated"
    for language in ("en", "it", "nl", "ro", "sv", "cs"):
        for split in ("train", "train2"):
            if (translated / language / split).is_dir():
                texts += brat_mentions(translated / language / split)
    return [t for t in texts if t]


def student_from(teacher, layers: list[int]):  # type: ignore[no-untyped-def]
    """A copy of ``teacher`` with only ``layers`` (the query encoder's shape), its embeddings frozen."""
    from worker.linker import keep_layers

    student = keep_layers(copy.deepcopy(teacher), layers)
    for parameter in student.embeddings.parameters():
        parameter.requires_grad = False
    return student


def pooled(model, tokenizer, texts: list[str]):  # type: ignore[no-untyped-def]
    import torch

    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    states = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es")
    parser.add_argument("--layers", default="0,4,8,11")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fhir-ner-distill"))
    parser.add_argument("--out", type=Path, help="folder for the trained student (student.safetensors, .json)")
    parser.add_argument("--install", type=Path, help="copy a trained student (--out of a run) into worker/linker/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    if args.install is not None:
        return install(args.install)
    if args.out is None:
        parser.error("--out is required (or --install)")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    from mappings.profile import load_profile
    from worker.terminology import terminology_for

    service = terminology_for(load_profile(), "auto", cache_root=args.work / "empty-cache")
    assert service is not None and service.store is not None
    rows: dict[str, np.ndarray] = {}
    matrices = []
    for name in ("icd-10-cm", "icd-10-pcs"):
        index = service.index(name)
        assert index.matrix is not None
        dense = np.asarray(index.matrix, dtype=np.float32)  # float32 rows (the shipped index keeps them int8)
        matrices.append(dense)
        for entry, vector in zip(index.entries, dense, strict=True):
            rows.setdefault(entry.term, vector)
    bank = torch.from_numpy(np.concatenate(matrices)).float()
    args.work.mkdir(parents=True, exist_ok=True)
    cached = args.work / "teacher-mentions.npz"
    extra = sorted({t for t in training_mentions(args.data) if t not in rows})
    if cached.is_file() and json.loads(bytes(np.load(cached)["texts"]).decode()) == extra:
        extra_vectors = np.load(cached)["vectors"]
    else:
        start = time.time()
        extra_vectors = service.store.encoder.encode(extra)
        np.savez(cached, texts=np.frombuffer(json.dumps(extra).encode(), dtype=np.uint8), vectors=extra_vectors)
        print(f"teacher: {len(extra)} mentions in {time.time() - start:.0f} s", file=sys.stderr)
    texts = list(rows) + extra
    targets = torch.from_numpy(np.concatenate([np.stack(list(rows.values())), extra_vectors])).float()
    print(f"{len(texts)} strings ({len(extra)} mentions), bank {tuple(bank.shape)}", file=sys.stderr)
    neighbours_file = args.work / f"neighbours-{len(texts)}.pt"
    if neighbours_file.is_file():
        neighbours = torch.load(neighbours_file)
    else:
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), 2048):
                chunks.append((targets[i : i + 2048] @ bank.T).topk(48, dim=1).indices)
        neighbours = torch.cat(chunks)
        torch.save(neighbours, neighbours_file)

    teacher, tokenizer = service.store.encoder._torch_model()
    layers = [int(x) for x in args.layers.split(",")]
    student = student_from(teacher, layers)
    del teacher
    student.train()
    trained = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    steps = int(len(batches) * args.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / max(1, steps))
    )
    start = time.time()
    step = 0
    while step < steps:
        random.shuffle(batches)
        for batch in batches:
            if step >= steps:
                break
            vectors = pooled(student, tokenizer, [texts[i] for i in batch])
            wanted = targets[batch]
            near = torch.cat([neighbours[batch], torch.randint(0, bank.shape[0], (len(batch), 16))], dim=1)
            candidates = bank[near]  # (b, 64, d)
            student_scores = torch.einsum("bd,bkd->bk", vectors, candidates) / args.tau
            teacher_scores = torch.einsum("bd,bkd->bk", wanted, candidates) / args.tau
            kl = torch.nn.functional.kl_div(
                student_scores.log_softmax(-1), teacher_scores.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            cosine = (1 - (vectors * wanted).sum(-1)).mean()
            loss = kl + 10 * cosine
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            if step % 200 == 0 or step == 1:
                print(
                    f"step {step}/{steps} kl {kl.item():.4f} cos {1 - cosine.item():.4f} {time.time() - start:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    student.eval()
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("embeddings.")}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(args.out / "student.safetensors"))
    recipe = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("install", "out")}
    meta = {"layers": layers, "prefix": "", "pooling": "mean", "strings": len(texts), "mentions": len(extra)}
    (args.out / "student.json").write_text(json.dumps({**meta, "recipe": recipe}, indent=2) + "\n")
    print(f"saved {args.out} in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


def install(folder: Path) -> int:
    """Ship a trained student: its layers as float16 ``worker/linker/queries.safetensors``, its description as
    ``linker.json``'s ``queries``."""
    import torch
    from safetensors.torch import load_file, save_file

    from worker.linker import LINKER_DIR

    state = load_file(str(folder / "student.safetensors"))
    save_file(
        {k: v.to(torch.float16).contiguous() for k, v in sorted(state.items())}, str(LINKER_DIR / "queries.safetensors")
    )
    (LINKER_DIR / "queries.safetensors").chmod(0o644)
    config_path = LINKER_DIR / "linker.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["queries"] = json.loads((folder / "student.json").read_text(encoding="utf-8"))
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"installed {folder} into {LINKER_DIR} (queries.safetensors, linker.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
