"""Re-ranking the linker's candidates: dump them once, then score cheap re-ranking features on two halves of dev.

    .venv/bin/python benchmarks/rerank_linker.py dump [--data ../shared/data/es/codiesp] [--out /tmp/c-cands.pkl]
    .venv/bin/python benchmarks/rerank_linker.py analyse [--cands /tmp/c-cands.pkl] [--label DISEASE]

``dump``: every CodiEsp dev (never test) gold mention of DISEASE, SYMPTOM and PROCEDURE (the gold of
``calibrate_linker.py``) is looked up as the worker looks it up (the shipped linker, its int8 query encoder, the
default profile's request), but with the top ``--top`` distinct codes instead of 5: each candidate with its score,
its text-match score, and the scores and kinds of every indexed string of the code (so "which string matched",
"how many strings match" and "the mean over strings" can be computed offline). A check compares the dump's top 5
with the production ``lookup``'s.

``analyse``: re-ranks each mention's candidates with a linear score over cheap features, weights fitted on one
half of dev's documents (split by a hash of their name, as ``calibrate_linker.py``'s two-fold check) and scored on
the other half, both ways. Exact text matches stay first (an exact match is final).
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)

from benchmarks.calibrate_linker import LABELS, gold_rows, hash_doc  # noqa: E402

# Nearest strings looked at per mention before grouping them by code (production looks at 64).
WIDE = 3000


def dump(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    from mappings.profile import load_profile
    from mappings.terminology import code_request, normalise
    from worker.terminology import terminology_for

    rows = gold_rows(args.data)
    profile = load_profile()
    service = terminology_for(profile, "auto")
    assert service is not None and service.store is not None
    out: dict[str, Any] = {"gold": rows, "mentions": {}}
    for label, system in LABELS.items():
        options = profile.labels[label].codes
        assert options is not None
        mentions = sorted({row["mention"] for row in rows if row["label"] == label})
        index = service.index(system)
        requests = [code_request(m, label, options, "es") for m in mentions]
        prefixes = tuple(options.prefixes.get(system, ()))
        categories = options.categories
        subset, matrix = index._rows(prefixes, categories)
        row_ids = subset if subset is not None else np.arange(matrix.shape[0])
        row_code = [index.data.billable(index._codes[int(r)], categories) or index._codes[int(r)] for r in row_ids]
        code_rows: dict[str, list[int]] = {}
        for position, code in enumerate(row_code):
            code_rows.setdefault(code, []).append(position)
        lexical = {}
        vectors: dict[str, np.ndarray | None] = {}
        to_encode = []
        for request in requests:
            matches = index.lexical.match(request.text, "es", prefixes, args.top, categories)
            lexical[request.text] = matches
            exact = bool(matches) and matches[0].score >= 1.0
            if exact:
                vectors[request.text] = index.term_vector(request.text)
            else:
                to_encode.append(request.text)
        started = time.process_time()
        encoded = service.store.encoder.encode(to_encode) if to_encode else np.zeros((0, 0))
        print(f"{label}: {len(to_encode)} mentions encoded in {time.process_time() - started:.1f} s CPU", file=sys.stderr)
        vectors.update(dict(zip(to_encode, encoded, strict=True)))
        for request in requests:
            text = request.text
            vector = vectors[text]
            cands: dict[str, dict[str, Any]] = {}
            for match in lexical[text]:
                cands[match.code] = {"code": match.code, "display": match.display, "lex": match.score, "nn": None}
            scores = None
            if vector is not None:
                scores = matrix @ vector
                take = min(WIDE, scores.shape[0])
                top = np.argpartition(-scores, take - 1)[:take]
                best: dict[str, float] = {}
                for position in top:
                    code = row_code[int(position)]
                    score = float(scores[position])
                    if score > best.get(code, -2.0):
                        best[code] = score
                for code, score in sorted(best.items(), key=lambda kv: -kv[1])[: args.top + 10]:
                    entry = cands.setdefault(
                        code, {"code": code, "display": index._display.get(code), "lex": None, "nn": None}
                    )
                    entry["nn"] = max(0.0, min(1.0, score))
            for code, entry in cands.items():
                strings = []
                if scores is not None:
                    for position in code_rows.get(code, []):
                        term = index.entries[int(row_ids[position])]
                        strings.append((float(scores[position]), term.term, term.kind, term.code))
                    strings.sort(key=lambda s: -s[0])
                entry["strings"] = strings[:20]
                entry["n_strings"] = len(strings)
                entry["score"] = max(s for s in (entry["lex"], entry["nn"]) if s is not None)
                entry["preferred"] = code in index.preferred
            ranked = sorted(
                cands.values(), key=lambda c: (-round(c["score"], 6), not c["preferred"], -len(c["code"]), c["code"])
            )[: args.top]
            out["mentions"][(label, text)] = {
                "exact": bool(lexical[text]) and lexical[text][0].score >= 1.0,
                "norm": normalise(text),
                "candidates": ranked,
            }
        # Check: the production lookup's top 5 against the dump's.
        answers = service.lookup(requests)
        same = sum(
            [c.code for c in answer[:5]] == [c["code"] for c in out["mentions"][(label, r.text)]["candidates"][:5]]
            for r, answer in zip(requests, answers, strict=True)
        )
        print(f"{label}: dump's top 5 equals the lookup's for {same} of {len(requests)} mentions", file=sys.stderr)
    with args.out.open("wb") as handle:
        pickle.dump(out, handle)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("dump")
    d.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es" / "codiesp")
    d.add_argument("--out", type=Path, default=Path("/tmp/c-cands.pkl"))
    d.add_argument("--top", type=int, default=50)
    a = commands.add_parser("analyse")
    a.add_argument("--cands", type=Path, default=Path("/tmp/c-cands.pkl"))
    a.add_argument("--label", default="DISEASE")
    a.add_argument("--top", type=int, default=20, help="candidates re-ranked per mention")
    a.add_argument("--l2", type=float, default=1e-3)
    a.add_argument("--features", nargs="*", default=None, help="comma-separated feature sets to try")
    a.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.command == "dump":
        return dump(args)
    return analyse(args)


# --------------------------------------------------------------------------------------------------
# analyse: features, a listwise linear model, two folds
# --------------------------------------------------------------------------------------------------
def ngrams(text: str, sizes: tuple[int, ...] = (3, 4)) -> dict[str, int]:
    padded = f" {text} "
    found: dict[str, int] = {}
    for size in sizes:
        for start in range(len(padded) - size + 1):
            gram = padded[start : start + size]
            found[gram] = found.get(gram, 0) + 1
    return found


class Featuriser:
    """Cheap features of (mention, candidate): everything comes from the dump, the synonyms' counts and the index's
    strings (character n-gram document frequencies)."""

    def __init__(self) -> None:
        from mappings.terminology import normalise
        from worker.linker import read_synonyms
        from worker.terminology import load_icd10cm_linked

        self.normalise = normalise
        self.count: dict[str, int] = {}
        for _, code, _, count in read_synonyms():
            self.count[code] = self.count.get(code, 0) + count
        data = load_icd10cm_linked()
        self.default_leaves = {leaf for leaf in data.unbillable.values() if leaf}
        df: dict[str, int] = {}
        terms = {normalise(e.term) for e in data.entries}
        for term in terms:
            for gram in ngrams(term):
                df[gram] = df.get(gram, 0) + 1
        self.idf = {gram: math.log(len(terms) / n) for gram, n in df.items()}
        self.default_idf = math.log(len(terms))
        self._vec_cache: dict[str, tuple[dict[str, float], float]] = {}

    def vec(self, text: str) -> tuple[dict[str, float], float]:
        if text not in self._vec_cache:
            weights = {g: c * self.idf.get(g, self.default_idf) for g, c in ngrams(text).items()}
            self._vec_cache[text] = (weights, math.sqrt(sum(w * w for w in weights.values())) or 1.0)
        return self._vec_cache[text]

    def tfidf(self, a: str, b: str) -> float:
        va, na = self.vec(a)
        vb, nb = self.vec(b)
        if len(va) > len(vb):
            va, vb = vb, va
        return sum(w * vb.get(g, 0.0) for g, w in va.items()) / (na * nb)

    NAMES = (
        "score",
        "nn",
        "mean3",
        "n_close",
        "tfidf_best",
        "tfidf_max",
        "overlap",
        "log_count",
        "seen",
        "same_cat",
        "cat_share",
        "default_leaf",
        "synonym",
        "length",
        "lex",
    )

    def features(self, mention: dict[str, Any], top: int) -> np.ndarray:
        cands = mention["candidates"][:top]
        norm = mention["norm"]
        words = set(norm.split())
        first_cat = cands[0]["code"][:3] if cands else ""
        top_cats = [c["code"][:3] for c in cands[:5]]
        best = cands[0]["score"] if cands else 0.0
        rows = []
        for cand in cands:
            strings = cand["strings"]
            scores = [s[0] for s in strings]
            nn = cand["nn"] if cand["nn"] is not None else (scores[0] if scores else 0.0)
            mean3 = float(np.mean(scores[:3])) if scores else nn
            close = sum(1 for s in scores if s >= best - 0.05)
            texts = [self.normalise(s[1]) for s in strings[:3]] or [self.normalise(cand["display"] or "")]
            tf = [self.tfidf(norm, t) for t in texts]
            best_words = set(texts[0].split())
            overlap = len(words & best_words) / max(1, len(words | best_words))
            count = self.count.get(cand["code"], 0)
            rows.append(
                [
                    cand["score"],
                    nn,
                    mean3,
                    math.log1p(close),
                    tf[0],
                    max(tf),
                    overlap,
                    math.log1p(count),
                    float(count > 0),
                    float(cand["code"][:3] == first_cat),
                    top_cats.count(cand["code"][:3]) / 5,
                    float(cand["code"] in self.default_leaves),
                    float(bool(strings) and strings[0][2] == "synonym"),
                    len(cand["code"]) / 8,
                    float(cand["lex"] is not None),
                ]
            )
        return np.asarray(rows, dtype=np.float64).reshape(len(cands), len(self.NAMES))


def fit(
    sets: list[tuple[np.ndarray, int]], use: list[int], l2: float = 1e-3, steps: int = 300
) -> np.ndarray:
    """Listwise softmax over each mention's candidates (the gold's index), weights of the chosen features."""
    import torch

    xs = [torch.tensor(x[:, use], dtype=torch.float64) for x, _ in sets]
    gold = [g for _, g in sets]
    w = torch.zeros(len(use), dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        w[0] = 20.0  # start from the cosine ranking
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    lengths = [x.shape[0] for x in xs]
    big = torch.cat(xs)
    offsets = np.cumsum([0, *lengths])

    def closure() -> Any:
        opt.zero_grad()
        logits = big @ w
        loss = torch.zeros((), dtype=torch.float64)
        for k, g in enumerate(gold):
            part = logits[offsets[k] : offsets[k + 1]]
            loss = loss + torch.logsumexp(part, 0) - part[g]
        loss = loss / len(gold) + l2 * (w[1:] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def rerank(mention: dict[str, Any], x: np.ndarray, use: list[int], w: np.ndarray | None) -> list[str]:
    codes = [c["code"] for c in mention["candidates"][: x.shape[0]]]
    if w is None:
        return codes
    score = x[:, use] @ w
    order = sorted(range(len(codes)), key=lambda i: (-score[i], i))
    if mention["exact"]:  # an exact match is final: it stays first
        order = [0] + [i for i in order if i != 0]
    return [codes[i] for i in order]


def analyse(args: argparse.Namespace) -> int:
    with args.cands.open("rb") as handle:
        dumped = pickle.load(handle)
    feat = Featuriser()
    rows = [r for r in dumped["gold"] if r["label"] == args.label]
    mentions = {key: m for key, m in dumped["mentions"].items() if key[0] == args.label}
    x = {key: feat.features(m, args.top) for key, m in mentions.items()}
    folds = [[r for r in rows if hash_doc(r["document"]) == k] for k in (0, 1)]

    def training(part: list[dict[str, str]]) -> list[tuple[np.ndarray, int]]:
        out = []
        for r in part:
            key = (args.label, r["mention"])
            codes = [c["code"] for c in mentions[key]["candidates"][: args.top]]
            if r["code"] in codes and len(codes) > 1 and not (mentions[key]["exact"] and codes[0] == r["code"]):
                out.append((x[key], codes.index(r["code"])))
        return out

    def score(part: list[dict[str, str]], use: list[int], w: np.ndarray | None) -> tuple[float, float]:
        t1 = t5 = 0
        for r in part:
            key = (args.label, r["mention"])
            ranked = rerank(mentions[key], x[key], use, w)
            t1 += bool(ranked) and ranked[0] == r["code"]
            t5 += r["code"] in ranked[:5]
        return t1 / len(part), t5 / len(part)

    names = Featuriser.NAMES
    sets = [[0], *[[0, k] for k in range(1, len(names))], [int(i) for i in range(len(names))]]
    if args.features:
        sets = [[names.index(n) for n in group.split(",")] for group in args.features]
    print(f"{args.label}: halves of {len(folds[0])} and {len(folds[1])} mentions, candidates re-ranked: top {args.top}")
    base = [score(folds[k], [0], None) for k in (0, 1)]
    print(f"  {'baseline':40s} B(fit A) {base[1][0]:.4f}/{base[1][1]:.4f}  A(fit B) {base[0][0]:.4f}/{base[0][1]:.4f}")
    for use in sets:
        results = []
        weights = []
        for k in (0, 1):
            w = fit(training(folds[k]), use, args.l2)
            weights.append(w)
            results.append(score(folds[1 - k], use, w))
        label = "+".join(names[i] for i in use)
        gain = [(results[k][0] - base[1 - k][0], results[k][1] - base[1 - k][1]) for k in (0, 1)]
        print(
            f"  {label[:40]:40s} B(fit A) {results[0][0]:.4f}/{results[0][1]:.4f}  "
            f"A(fit B) {results[1][0]:.4f}/{results[1][1]:.4f}  gain top1 {gain[0][0]:+.4f} {gain[1][0]:+.4f} "
            f"top5 {gain[0][1]:+.4f} {gain[1][1]:+.4f}"
        )
        if args.verbose:
            for w in weights:
                print("     ", " ".join(f"{names[i]}={v:.3g}" for i, v in zip(use, w, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
