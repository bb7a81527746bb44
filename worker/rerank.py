"""A cheap re-ranking of the linker's candidates: a linear score over features of each (mention, candidate) pair.

The nearest-neighbour search ranks codes by the cosine of their single closest string. On CodiEsp dev a few
more signals move the right code up (``benchmarks/rerank_linker.py`` fits the weights on one half of the
documents and scores the other, both ways): how close the code's other strings are (mean of its three best,
how many are near the best candidate's score), how much of the mention's character 3-4-grams its strings share
(TF-IDF cosine), how much of the top candidates' score mass its 3-character category holds, whether CodiEsp
train coded it, and its specificity. No encoder pass: a few dictionary lookups per candidate.

Pure (no I/O, no torch): the worker builds a :class:`Reranker` from ``worker/linker/rerank.json`` and the code
system's strings. An exact text match (score 1.0) stays the first candidate whatever the features say. Only the
order changes: each candidate keeps its score (its cosine, or 1.0/0.97 for a text match), which the written
code's threshold is compared with, so the thresholds mean the same in every language.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FEATURES = (
    "score",
    "mean3",
    "n_close",
    "tfidf_max",
    "cat_mass",
    "same_cat",
    "seen",
    "synonym",
    "length",
    "overlap",
    "lex",
)
_CLOSE = 0.05  # a string within this of the best candidate's score counts as close
_MASS_SHARPNESS = 20.0  # exp(20 * (score - best)): the category mass of the top candidates


@dataclass(frozen=True)
class Detail:
    """What the search saw of one code: its strings among the nearest neighbours, best first.

    ``scores`` are their cosines, ``terms`` the normalised text of the first three, ``kind`` the first one's kind
    (``synonym`` for the shipped Spanish names)."""

    scores: tuple[float, ...]
    terms: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class Scored:
    """A candidate to re-rank: its code, its score (text match or cosine), whether a text match found it."""

    code: str
    score: float
    text_match: bool
    display: str = ""
    detail: Detail | None = None


def ngrams(text: str, sizes: tuple[int, ...] = (3, 4)) -> dict[str, int]:
    """Character n-gram counts of `` text `` (padded, so word edges count)."""
    padded = f" {text} "
    found: dict[str, int] = {}
    for size in sizes:
        for start in range(len(padded) - size + 1):
            gram = padded[start : start + size]
            found[gram] = found.get(gram, 0) + 1
    return found


class NgramIdf:
    """Inverse document frequencies of character 3-4-grams over a code system's (normalised) strings.

    The weighted vectors of the strings it was built from are kept compact (one sparse row each, ~0.3 KB), so
    that a mention's cosines with its candidates' strings are one gather and one sum instead of a dictionary
    per string (the re-ranker's cost was a third of coding's, less the encoder's). Other strings' vectors
    (a display text) are built when asked, and the last ``cache`` of them remembered.
    """

    def __init__(self, terms: Iterable[str], cache: int = 4096) -> None:
        distinct = sorted(set(terms))
        count = len(distinct)
        # One pass over the terms' n-grams (each term's were counted twice until session 21: half of a worker's
        # ICD-10-CM load, 5 of 11 s). A column per n-gram in the order first seen; per term, its n-grams' columns
        # and counts in ``ngrams`` order, kept in compact arrays (a list of every n-gram of every term would stay
        # in the process's memory after it is freed): 3 bytes an n-gram, ~11 MB for ICD-10-CM's 46,000 names.
        self._column: dict[str, int] = {}
        frequency: list[int] = []
        columns = array("H")  # 2 bytes a column while there are fewer than 65,536 n-grams (ICD-10-CM: 36,708)
        counts = array("B")  # at most 255; a term's counts as counted, for its norm, where one was more
        whole: dict[int, list[int]] = {}
        starts = [0]
        for row, term in enumerate(distinct):
            found = ngrams(term)
            for gram in found:
                column = self._column.get(gram)
                if column is None:
                    column = self._column[gram] = len(frequency)
                    frequency.append(0)
                    if column == 2**16 and columns.typecode == "H":
                        columns = array("I", columns)
                frequency[column] += 1
                columns.append(column)
            before = len(counts)
            try:
                counts.extend(found.values())
            except OverflowError:  # an n-gram more than 255 times (none in ICD-10-CM)
                del counts[before:]
                counts.extend(min(times, 255) for times in found.values())
                whole[row] = list(found.values())
            starts.append(len(columns))
        self.unseen = math.log(max(count, 1) + 1)
        weights = [math.log((count + 1) / n) for n in frequency]
        self.idf = dict(zip(self._column, weights, strict=True))
        self._idf = np.asarray(weights, dtype=np.float64)
        self._row = {term: row for row, term in enumerate(distinct)}
        self._starts = np.asarray(starts, dtype=np.int64)
        if columns.typecode == "H":
            self._columns = np.frombuffer(columns, dtype=np.uint16).copy()
        else:
            self._columns = np.frombuffer(columns, dtype=np.uint32).astype(np.int32)
        self._counts = np.frombuffer(counts, dtype=np.uint8).copy()
        # Each term's norm summed in its n-grams' order, in Python floats, as a term's vector() sums it.
        self._norms = np.ones(count, dtype=np.float64)
        for row in range(count):
            first, last = starts[row], starts[row + 1]
            if row in whole:
                total = sum((times * weights[columns[first + i]]) ** 2 for i, times in enumerate(whole[row]))
            else:
                total = sum((counts[at] * weights[columns[at]]) ** 2 for at in range(first, last))
            self._norms[row] = math.sqrt(total) or 1.0
        self._vectors: dict[str, tuple[dict[str, float], float]] = {}
        self._cache = cache

    def vector(self, text: str) -> tuple[dict[str, float], float]:
        found = self._vectors.get(text)
        if found is None:
            weights = {g: c * self.idf.get(g, self.unseen) for g, c in ngrams(text).items()}
            found = (weights, math.sqrt(sum(w * w for w in weights.values())) or 1.0)
            if len(self._vectors) >= self._cache:
                self._vectors.pop(next(iter(self._vectors)))
            self._vectors[text] = found
        return found

    def cosine(self, a: str, b: str) -> float:
        va, na = self.vector(a)
        vb, nb = self.vector(b)
        return sum(va[g] * vb[g] for g in va.keys() & vb.keys()) / (na * nb)

    def cosines(self, mention: str, terms: Sequence[str]) -> list[float]:
        """``cosine(mention, term)`` for each term (the strings it was built from read from their compact rows)."""
        rows = [self._row.get(term, -1) for term in terms]
        # A string without n-grams (empty) shares none with the mention: cosine 0, as cosine() gives.
        known = [row for row in rows if row >= 0 and self._starts[row + 1] > self._starts[row]]
        value: dict[int, float] = {}
        if known:
            weights, norm = self.vector(mention)
            dense = np.zeros(len(self._idf), dtype=np.float64)  # the mention's weights; per call: threads share none
            for gram, weight in weights.items():
                if gram in self._column:
                    dense[self._column[gram]] = weight
            starts, ends = self._starts[known], self._starts[np.asarray(known) + 1]
            spans = [slice(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]
            picked = np.concatenate([self._columns[span] for span in spans])
            counts = np.concatenate([self._counts[span] for span in spans])
            products = dense[picked] * (counts * self._idf[picked])
            offsets = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
            values = np.add.reduceat(products, offsets) / (norm * self._norms[known])
            value = dict(zip(known, values.tolist(), strict=True))
        return [
            value.get(row, 0.0) if row >= 0 else self.cosine(mention, term)
            for row, term in zip(rows, terms, strict=True)
        ]


def features(mention: str, candidates: Sequence[Scored], seen: Mapping[str, int], idf: NgramIdf) -> list[list[float]]:
    """One row of :data:`FEATURES` per candidate (``mention`` normalised, candidates in their search order)."""
    if not candidates:
        return []
    words = set(mention.split())
    best = candidates[0].score
    first_category = candidates[0].code[:3]
    mass: dict[str, float] = {}
    for candidate in candidates:
        category = candidate.code[:3]
        mass[category] = mass.get(category, 0.0) + math.exp(_MASS_SHARPNESS * (candidate.score - best))
    total = sum(mass.values()) or 1.0
    strings = [c.detail.terms if c.detail and c.detail.terms else (c.display,) for c in candidates]
    flat = iter(idf.cosines(mention, [term for terms in strings for term in terms]))
    rows = []
    for candidate, terms in zip(candidates, strings, strict=True):
        detail = candidate.detail
        scores = detail.scores if detail else ()
        nn = scores[0] if scores else candidate.score
        cosines = [next(flat) for _ in terms]
        first = set(terms[0].split())
        rows.append(
            [
                candidate.score,
                sum(scores[:3]) / len(scores[:3]) if scores else nn,
                math.log1p(sum(1 for s in scores if s >= best - _CLOSE)),
                max(cosines),
                mass[candidate.code[:3]] / total,
                float(candidate.code[:3] == first_category),
                float(seen.get(candidate.code, 0) > 0),
                float(detail is not None and detail.kind == "synonym"),
                len(candidate.code) / 8,
                len(words & first) / max(1, len(words | first)),
                float(candidate.text_match),
            ]
        )
    return rows


@dataclass(frozen=True)
class Reranker:
    """Weights per label (over :data:`FEATURES`) and the data the features need.

    ``top``: how many of a mention's candidates (in search order) are re-ranked; the rest keep their place after
    them."""

    weights: Mapping[str, Sequence[float]]
    seen: Mapping[str, int]
    idf: NgramIdf
    top: int = 30
    # The notes' languages it was fitted on (None: any). On the seven-language check set the Spanish weights moved
    # near-tied codes both ways (Czech and Swedish +2 of 39, Dutch and Romanian -2): other languages keep the
    # search's order.
    languages: frozenset[str] | None = None

    def applies(self, label: str, language: str | None = None) -> bool:
        if label not in self.weights:
            return False
        primary = language.split("-")[0].lower() if language else None
        return self.languages is None or primary in self.languages

    def rerank(self, label: str, mention: str, candidates: Sequence[Scored]) -> list[Scored]:
        """``candidates`` (in search order) reordered by the linear score; an exact match (1.0) stays first, the
        candidates past ``top`` stay last in their order."""
        weights = self.weights.get(label)
        head, tail = list(candidates[: self.top]), list(candidates[self.top :])
        if weights is None or len(head) < 2:
            return list(candidates)
        value = [
            math.inf if c.score >= 1.0 else sum(w * x for w, x in zip(weights, row, strict=True))
            for c, row in zip(head, features(mention, head, self.seen, self.idf), strict=True)
        ]
        order = sorted(range(len(head)), key=lambda i: (-value[i], i))
        return [head[i] for i in order] + tail
