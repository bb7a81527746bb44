"""Re-ranking the linker's candidates: dump them once, score re-ranking features on two halves of dev, fit weights.

    .venv/bin/python benchmarks/rerank_linker.py dump [--data ../shared/data/es/codiesp] [--out /tmp/c-cands.pkl]
    .venv/bin/python benchmarks/rerank_linker.py analyse [--cands /tmp/c-cands.pkl] [--labels DISEASE] [--top 20]
    .venv/bin/python benchmarks/rerank_linker.py fit --labels DISEASE SYMPTOM [--top 20] [--write]

``dump``: every CodiEsp dev (never test) gold mention of DISEASE, SYMPTOM and PROCEDURE (the gold of
``calibrate_linker.py``) is looked up through the worker's path (``TerminologyService.lookup``: the shipped linker,
its int8 query encoder, the default profile's requests, labels in calibrate_linker's order), and the candidates the
re-ranker would receive are kept, before re-ranking, with the re-ranker's top raised to ``--top``: each candidate's
code, score, whether a text match found it, and the scores and text of its strings among the nearest neighbours.

A candidate is right as ``calibrate_linker.py`` counts it (:func:`worker.coding.same_code`).

``analyse``: re-ranks each mention's candidates with a linear score over the features of :mod:`worker.rerank`,
weights fitted (listwise softmax) on one half of dev's documents (split by a hash of their name, as
``calibrate_linker.py``'s two-fold check) and scored on the other half, both ways. An exact text match stays first.

``fit``: the same weights on all of dev, per label; ``--write`` ships them in ``worker/linker/rerank.json``. What
ships: DISEASE and SYMPTOM, every feature, the top 20 (PROCEDURE's re-ranking gained top-5 on both halves but cut
the written share from 0.514 to 0.472, so it is not fitted).
"""

from __future__ import annotations

import argparse
import json
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
from worker.coding import same_code  # noqa: E402  (a gold code without its 7th character: its extensions)

Found = dict[str, tuple[np.ndarray, list[str], bool]]  # mention -> (feature rows, codes, exact match)


def dump(args: argparse.Namespace) -> int:
    """The production path's candidates before re-ranking, with what the re-ranker reads."""
    import torch

    torch.set_num_threads(1)
    from mappings.profile import load_profile
    from mappings.terminology import code_request
    from worker.rerank import FEATURES
    from worker.terminology import terminology_for

    rows = gold_rows(args.data)
    profile = load_profile()
    service = terminology_for(profile, "auto", rerank=False)
    assert service is not None
    # Placeholder weights (the score alone) so that the search gathers the re-ranker's candidates and details.
    identity = [1.0] + [0.0] * (len(FEATURES) - 1)
    weights: dict[str, dict[str, list[float]]] = {}
    for label, system in LABELS.items():
        weights.setdefault(system, {})[label] = identity
    service.rerank = {"top": args.top, "weights": weights}
    captured: dict[tuple[str, str], list[tuple[Any, ...]]] = {}

    def capture(request: Any, ranked: list[Any], details: dict[Any, Any], texts: set[Any]) -> list[Any]:
        captured[(request.label, request.text)] = [
            (c.code, c.score, (c.source, c.code) in texts, c.display or "", details.get((c.source, c.code)))
            for c in ranked
        ]
        return ranked

    service._reranked = capture  # type: ignore[method-assign]
    out: dict[str, Any] = {"gold": rows, "top": args.top, "mentions": {}}
    for label in LABELS:
        options = profile.labels[label].codes
        assert options is not None
        mentions = sorted({row["mention"] for row in rows if row["label"] == label})
        started = time.process_time()
        service.lookup([code_request(m, label, options, "es") for m in mentions])
        spent = time.process_time() - started
        print(f"{label}: {len(mentions)} mentions looked up in {spent:.1f} s CPU", file=sys.stderr)
        for mention in mentions:
            out["mentions"][(label, mention)] = captured[(label, mention)]
    with args.out.open("wb") as handle:
        pickle.dump(out, handle)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, int]]]:
    """The dump, the re-ranker's n-gram IDF per system and the codes CodiEsp train coded, as the worker builds them."""
    from worker.linker import coded_counts, load_icd10pcs
    from worker.terminology import SourceIndex, load_icd10cm_linked

    with path.open("rb") as handle:
        dumped = pickle.load(handle)
    idf = {
        name: SourceIndex(loader()).ngram_idf()
        for name, loader in (("icd-10-cm", load_icd10cm_linked), ("icd-10-pcs", load_icd10pcs))
    }
    return dumped, idf, coded_counts()


def matrices(dumped: dict[str, Any], label: str, top: int, idf: dict[str, Any], seen: dict[str, Any]) -> Found:
    """Per mention: the feature rows of its first ``top`` candidates, their codes, whether it matched exactly."""
    from mappings.terminology import normalise
    from worker.rerank import Scored, features

    system = LABELS[label]
    found: Found = {}
    for (lab, mention), cands in dumped["mentions"].items():
        if lab != label:
            continue
        scored = [Scored(*c) for c in cands[:top]]
        rows = features(normalise(mention), scored, seen.get(system, {}), idf[system])
        exact = bool(scored) and scored[0].score >= 1.0
        found[mention] = (np.asarray(rows, dtype=np.float64).reshape(len(scored), -1), [c.code for c in scored], exact)
    return found


def fit(sets: list[tuple[np.ndarray, int]], use: list[int], l2: float = 1e-3, steps: int = 300) -> np.ndarray:
    """Listwise softmax over each mention's candidates (target: the gold's index), weights of the chosen features."""
    import torch

    torch.set_num_threads(1)
    width = max(x.shape[0] for x, _ in sets)
    padded = torch.zeros(len(sets), width, len(use), dtype=torch.float64)
    mask = torch.full((len(sets), width), -1e9, dtype=torch.float64)
    for k, (x, _) in enumerate(sets):
        padded[k, : x.shape[0]] = torch.tensor(x[:, use])
        mask[k, : x.shape[0]] = 0.0
    gold = torch.tensor([g for _, g in sets])
    w = torch.zeros(len(use), dtype=torch.float64)
    w[0] = 20.0  # start from the cosine ranking
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        logits = padded @ w + mask
        loss = (torch.logsumexp(logits, 1) - logits[torch.arange(len(sets)), gold]).mean()
        loss = loss + l2 * (w[1:] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def rerank_codes(x: np.ndarray, codes: list[str], exact: bool, use: list[int], w: np.ndarray | None) -> list[str]:
    if w is None or len(codes) < 2:
        return codes
    score = x[:, use] @ w
    order = sorted(range(len(codes)), key=lambda i: (-score[i], i))
    if exact:  # an exact match is final: it stays first
        order = [0] + [i for i in order if i != 0]
    return [codes[i] for i in order]


def training(part: list[dict[str, str]], found: Found) -> list[tuple[np.ndarray, int]]:
    """Mentions whose gold is among the candidates (and not already an exact first): the listwise targets."""
    out = []
    for r in part:
        x, codes, exact = found[r["mention"]]
        right = next((i for i, code in enumerate(codes) if same_code(r["code"], code)), None)
        if right is not None and len(codes) > 1 and not (exact and right == 0):
            out.append((x, right))
    return out


def score(part: list[dict[str, str]], found: Found, use: list[int], w: np.ndarray | None) -> tuple[float, float]:
    t1 = t5 = 0
    for r in part:
        x, codes, exact = found[r["mention"]]
        ranked = rerank_codes(x, codes, exact, use, w)
        t1 += bool(ranked) and same_code(r["code"], ranked[0])
        t5 += any(same_code(r["code"], code) for code in ranked[:5])
    return t1 / len(part), t5 / len(part)


def analyse(args: argparse.Namespace) -> int:
    from worker.rerank import FEATURES

    dumped, idf, seen = load(args.cands)
    for label in args.labels:
        rows = [r for r in dumped["gold"] if r["label"] == label]
        found = matrices(dumped, label, args.top, idf, seen)
        folds = [[r for r in rows if hash_doc(r["document"]) == k] for k in (0, 1)]
        sets = [[0], *[[0, k] for k in range(1, len(FEATURES))], list(range(len(FEATURES)))]
        if args.features:
            sets = [[FEATURES.index(n) for n in group.split(",")] for group in args.features]
        print(f"{label}: halves of {len(folds[0])} and {len(folds[1])} mentions, top {args.top} re-ranked")
        base = [score(folds[k], found, [0], None) for k in (0, 1)]
        line = f"B {base[1][0]:.4f}/{base[1][1]:.4f}  A {base[0][0]:.4f}/{base[0][1]:.4f}"
        print(f"  {'baseline (top-1/top-5)':40s} {line}")
        for use in sets:
            results, weights = [], []
            for k in (0, 1):
                w = fit(training(folds[k], found), use, args.l2)
                weights.append(w)
                results.append(score(folds[1 - k], found, use, w))
            name = "+".join(FEATURES[i] for i in use)
            gain = [(results[k][0] - base[1 - k][0], results[k][1] - base[1 - k][1]) for k in (0, 1)]
            print(
                f"  {name[:40]:40s} B(fit A) {results[0][0]:.4f}/{results[0][1]:.4f}  "
                f"A(fit B) {results[1][0]:.4f}/{results[1][1]:.4f}  top-1 {gain[0][0]:+.4f} {gain[1][0]:+.4f}  "
                f"top-5 {gain[0][1]:+.4f} {gain[1][1]:+.4f}"
            )
            if args.verbose:
                for w in weights:
                    print("     ", " ".join(f"{FEATURES[i]}={v:.3g}" for i, v in zip(use, w, strict=True)))
    return 0


def fit_all(args: argparse.Namespace) -> int:
    """Weights on all of dev, per label, every feature; ``--write`` ships them in ``worker/linker/rerank.json``."""
    from worker.linker import LINKER_DIR, rerank_weights
    from worker.rerank import FEATURES

    dumped, idf, seen = load(args.cands)
    weights: dict[str, dict[str, list[float]]] = {}
    # One feature set (--features a,b,c; default all): the others' weights are 0.
    use = [FEATURES.index(n) for n in args.features[0].split(",")] if args.features else list(range(len(FEATURES)))
    assert use[0] == 0, "the first feature must be the score"
    for label in args.labels:
        rows = [r for r in dumped["gold"] if r["label"] == label]
        found = matrices(dumped, label, args.top, idf, seen)
        fitted = fit(training(rows, found), use, args.l2)
        w = np.zeros(len(FEATURES))
        w[use] = fitted
        weights.setdefault(LABELS[label], {})[label] = [round(float(v), 5) for v in w]
        before, after = score(rows, found, [0], None), score(rows, found, use, fitted)
        print(f"{label}: all of dev, top-1/top-5 {before[0]:.4f}/{before[1]:.4f} -> {after[0]:.4f}/{after[1]:.4f}")
    data = {
        "top": args.top,
        "features": list(FEATURES),
        "weights": weights,
        "languages": ["es"],  # fitted on Spanish only; see worker.rerank.Reranker.languages
        "fitted_on": f"CodiEsp dev, every {'/'.join(args.labels)} gold mention (benchmarks/rerank_linker.py fit)",
    }
    print(json.dumps(data, indent=1))
    if args.write:
        (LINKER_DIR / "rerank.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        rerank_weights.cache_clear()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("dump")
    d.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es" / "codiesp")
    d.add_argument("--out", type=Path, default=Path("/tmp/c-cands.pkl"))
    d.add_argument("--top", type=int, default=50)
    for command in ("analyse", "fit"):
        a = commands.add_parser(command)
        a.add_argument("--cands", type=Path, default=Path("/tmp/c-cands.pkl"))
        a.add_argument("--labels", nargs="*", default=list(LABELS))
        a.add_argument("--top", type=int, default=20, help="candidates re-ranked per mention")
        a.add_argument("--l2", type=float, default=1e-3)
        a.add_argument(
            "--features", nargs="*", default=None, help="comma-separated feature sets to try (fit: the first only)"
        )
        a.add_argument("--verbose", action="store_true")
        a.add_argument("--write", action="store_true", help="fit: write worker/linker/rerank.json")
    args = parser.parse_args()
    if args.command == "dump":
        return dump(args)
    if args.command == "fit":
        return fit_all(args)
    return analyse(args)


if __name__ == "__main__":
    sys.exit(main())
