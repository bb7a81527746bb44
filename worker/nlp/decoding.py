"""Pure NumPy pieces of tagging: windows over long notes, BIO → character spans, spans → BIO targets.

Offsets always come from the tokenizer's offset mapping into the original text; nothing is rebuilt
from decoded tokens.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TAG_O, TAG_B, TAG_I = 0, 1, 2
# Characters trimmed from the edges of a span: they are never part of a clinical mention's surface.
EDGE_PUNCTUATION = set(".,;:!?¿¡\"'`«»“”‘’·•*_/\\|-–—")


@dataclass(frozen=True)
class TaggedSpan:
    label: str
    start: int
    end: int
    score: float


def plan_windows(n_tokens: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges covering ``n_tokens``: one window when it fits, else overlapping windows."""
    if window <= 0:
        raise ValueError("window must be positive")
    if n_tokens <= window:
        return [(0, n_tokens)]
    overlap = max(0, min(overlap, window - 1))
    step = window - overlap
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + window, n_tokens)
        windows.append((max(0, end - window), end))
        if end >= n_tokens:
            break
        start += step
    return windows


def merge_windows(n_tokens: int, windows: Sequence[tuple[int, int]], window_probs: Sequence[np.ndarray]) -> np.ndarray:
    """Take each token's prediction from the window where it sits most centrally."""
    if not windows:
        raise ValueError("no windows")
    shape = window_probs[0].shape[1:]
    merged = np.zeros((n_tokens, *shape), dtype=np.float32)
    best = np.full(n_tokens, -1, dtype=np.int64)
    for (start, end), probs in zip(windows, window_probs, strict=True):
        positions = np.arange(start, end)
        centrality = np.minimum(positions - start, end - 1 - positions)
        better = centrality > best[start:end]
        merged[start:end][better] = probs[: end - start][better]
        best[start:end] = np.where(better, centrality, best[start:end])
    return merged


def _is_word_char(char: str) -> bool:
    return char.isalnum() or unicodedata.category(char).startswith("M")


def _balanced(segment: str, opening: str, closing: str) -> bool:
    depth = 0
    for char in segment:
        depth += (char == opening) - (char == closing)
        if depth < 0:
            return False
    return depth == 0


def refine_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Snap a span to whole words, then trim whitespace and edge punctuation; None if nothing is left."""
    start = max(0, min(start, len(text)))
    end = max(start, min(end, len(text)))
    while start > 0 and start < len(text) and _is_word_char(text[start]) and _is_word_char(text[start - 1]):
        start -= 1
    while 0 < end < len(text) and _is_word_char(text[end - 1]) and _is_word_char(text[end]):
        end += 1
    changed = True
    while changed and start < end:
        changed = False
        while start < end and (text[start].isspace() or text[start] in EDGE_PUNCTUATION):
            start += 1
            changed = True
        while end > start and (text[end - 1].isspace() or text[end - 1] in EDGE_PUNCTUATION):
            end -= 1
            changed = True
        segment = text[start:end]
        for opening, closing in (("(", ")"), ("[", "]")):
            if segment.startswith(opening) and segment.endswith(closing) and _balanced(segment[1:-1], opening, closing):
                start, end = start + 1, end - 1
                changed = True
                break
            if segment.startswith(opening) and segment.count(opening) > segment.count(closing):
                start += 1
                changed = True
                break
            if segment.endswith(closing) and segment.count(closing) > segment.count(opening):
                end -= 1
                changed = True
                break
    if start >= end:
        return None
    return start, end


def _best_path(log_probs: np.ndarray, starts_after_b: bool) -> list[int]:
    """Viterbi over one label's [n, 3] log-probabilities where I only follows B or I."""
    score = [float(v) for v in log_probs[0]]
    if not starts_after_b:
        score[TAG_I] = -math.inf  # a note cannot start inside a mention
    back: list[tuple[int, int]] = []  # per token: best predecessor of O/B, best predecessor of I
    for row in log_probs[1:]:
        best_any = max(range(3), key=score.__getitem__)
        best_inside = TAG_B if score[TAG_B] >= score[TAG_I] else TAG_I
        back.append((best_any, best_inside))
        score = [
            score[best_any] + float(row[TAG_O]),
            score[best_any] + float(row[TAG_B]),
            score[best_inside] + float(row[TAG_I]),
        ]
    path = [max(range(3), key=score.__getitem__)]
    for best_any, best_inside in reversed(back):
        path.append(best_inside if path[-1] == TAG_I else best_any)
    return path[::-1]


def best_tag_paths(probs: np.ndarray) -> np.ndarray:
    """Per label, the most probable O/B/I sequence in which I only follows B or I (Viterbi).

    Taking each token's most probable tag on its own breaks long mentions wherever one token inside them
    leans towards O, leaving fragments; the best *valid* path keeps such a mention whole when the tokens
    around it are confident. ``probs`` is [n_tokens, n_labels, 3]; returns [n_tokens, n_labels] tags.

    Exact and cheap: a token whose own best tag is B keeps it on the best path (B may follow and precede
    anything), so the sequence splits at those tokens, and only the pieces where the token-wise tags are
    invalid (an I after an O) need the dynamic programme.
    """
    tags = probs.argmax(axis=-1).astype(np.int64)
    n_tokens = tags.shape[0]
    for label in range(tags.shape[1]):
        column = tags[:, label]
        previous = np.concatenate(([TAG_O], column[:-1]))
        invalid = np.nonzero((column == TAG_I) & (previous == TAG_O))[0]
        if invalid.size == 0:
            continue
        begins = np.nonzero(column == TAG_B)[0]
        log_probs: np.ndarray | None = None
        done_until = -1
        for position in invalid:
            if position < done_until:
                continue
            before = begins[begins < position]
            after = begins[begins > position]
            first = int(before[-1]) if before.size else 0
            last = int(after[0]) if after.size else n_tokens  # exclusive: the next B stays B
            if log_probs is None:
                log_probs = np.log(np.clip(probs[:, label].astype(np.float64), 1e-12, 1.0))
            starts_after_b = bool(before.size)
            if starts_after_b:  # the B itself is fixed; the piece starts right after it
                first += 1
            column[first:last] = _best_path(log_probs[first:last], starts_after_b)
            done_until = last
    return tags


def decode_spans(
    text: str, offsets: np.ndarray, probs: np.ndarray, labels: Sequence[str], min_score: float = 0.0
) -> list[TaggedSpan]:
    """BIO (one O/B/I sequence per label) to character spans, along each label's best valid tag path.

    A span's score is the mean probability of its tokens not being O for its label; spans scoring below
    ``min_score`` are dropped.

    ``offsets`` is [n_tokens, 2] character offsets; ``probs`` is [n_tokens, n_labels, 3].
    """
    spans: list[TaggedSpan] = []
    tags = best_tag_paths(probs)
    inside = 1.0 - probs[..., TAG_O]
    for label_index, label in enumerate(labels):
        current: list[int] = []

        def close(tokens: list[int], label: str = label, label_index: int = label_index) -> None:
            real = [t for t in tokens if offsets[t, 1] > offsets[t, 0]]
            if not real:
                return
            refined = refine_span(text, int(offsets[real[0], 0]), int(offsets[real[-1], 1]))
            if refined is None:
                return
            score = float(inside[real, label_index].mean())
            if score < min_score:
                return
            spans.append(TaggedSpan(label, refined[0], refined[1], round(score, 4)))

        for token, tag in enumerate(tags[:, label_index]):
            if tag == TAG_B:
                if current:
                    close(current)
                current = [token]
            elif tag == TAG_I:
                current.append(token)
            elif current:
                close(current)
                current = []
        if current:
            close(current)
    unique = {(s.label, s.start, s.end): s for s in spans}
    return sorted(unique.values(), key=lambda s: (s.start, s.end, s.label))


def spans_to_tags(offsets: np.ndarray, spans: Sequence[tuple[str, int, int]], labels: Sequence[str]) -> np.ndarray:
    """Training targets: [n_tokens, n_labels] with O/B/I per label, from character spans."""
    label_index = {label: i for i, label in enumerate(labels)}
    tags = np.zeros((len(offsets), len(labels)), dtype=np.int64)
    starts = offsets[:, 0]
    ends = offsets[:, 1]
    real = ends > starts
    for label, start, end in sorted(spans, key=lambda s: (s[1], -s[2])):
        column = label_index.get(label)
        if column is None:
            continue
        covered = np.nonzero(real & (starts < end) & (ends > start))[0]
        if covered.size == 0:
            continue
        if tags[covered, column].any():
            continue  # a nested span of the same label: the outer one wins
        tags[covered[0], column] = TAG_B
        tags[covered[1:], column] = TAG_I
    return tags
