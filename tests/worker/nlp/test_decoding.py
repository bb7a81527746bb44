"""Windows, BIO decoding and offsets: pure functions checked against hand-made cases and real tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.nlp.decoding import (
    TAG_B,
    TAG_I,
    TAG_O,
    best_tag_paths,
    decode_spans,
    merge_windows,
    plan_windows,
    refine_span,
    spans_to_tags,
)

LABELS = ["DISEASE", "SYMPTOM", "PROCEDURE"]


def one_hot(tags: np.ndarray) -> np.ndarray:
    probs = np.full((*tags.shape, 3), 0.01, dtype=np.float32)
    for index in np.ndindex(tags.shape):
        probs[index + (int(tags[index]),)] = 0.98
    return probs


def test_plan_windows_covers_every_token_with_the_requested_overlap() -> None:
    assert plan_windows(10, 16, 4) == [(0, 10)]
    windows = plan_windows(100, 32, 8)
    assert windows[0] == (0, 32) and windows[-1][1] == 100
    assert all(end - start == 32 for start, end in windows)
    covered = set().union(*(range(s, e) for s, e in windows))
    assert covered == set(range(100))
    for (_, e1), (s2, _) in zip(windows, windows[1:], strict=False):
        assert e1 - s2 >= 8


def test_merge_takes_each_token_from_its_most_central_window() -> None:
    windows = [(0, 6), (3, 9)]
    first = np.zeros((6, 1, 3), dtype=np.float32)
    first[..., 0] = 1.0
    second = np.zeros((6, 1, 3), dtype=np.float32)
    second[..., 1] = 1.0
    merged = merge_windows(9, windows, [first, second])
    # token 3: centrality 2 in window 0 (min(3, 2)) vs 0 in window 1 → window 0
    # token 4: centrality 1 in window 0 vs 1 in window 1 → the first window seen keeps it
    # token 5: centrality 0 in window 0 vs 2 in window 1 → window 1
    assert merged[:, 0].argmax(-1).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_a_mention_tagged_from_i_is_kept_and_types_may_overlap() -> None:
    text = "dolor torácico agudo"
    offsets = np.array([[0, 5], [6, 14], [15, 20]])
    tags = np.zeros((3, 3), dtype=np.int64)
    tags[:, 1] = [TAG_I, TAG_I, TAG_O]  # SYMPTOM "dolor torácico" starting with I
    tags[:, 0] = [TAG_B, TAG_I, TAG_I]  # DISEASE over the whole phrase
    tags[2, 2] = TAG_B  # PROCEDURE "agudo" (nonsense, but a separate type)
    spans = decode_spans(text, offsets, one_hot(tags), LABELS)
    found = {(s.label, text[s.start : s.end]) for s in spans}
    assert found == {("DISEASE", "dolor torácico agudo"), ("SYMPTOM", "dolor torácico"), ("PROCEDURE", "agudo")}
    assert all(0.9 < s.score <= 1.0 for s in spans)


def test_one_token_leaning_o_does_not_split_a_confident_mention() -> None:
    """Token-wise argmax would give "linfoma" and "Hodgkin" apart; the best valid path keeps one mention."""
    text = "linfoma de Hodgkin"
    offsets = np.array([[0, 7], [8, 10], [11, 18]])
    probs = np.zeros((3, 3, 3), dtype=np.float32)
    probs[:, :, TAG_O] = 1.0
    probs[:, 0] = [[0.05, 0.9, 0.05], [0.4, 0.25, 0.35], [0.05, 0.05, 0.9]]  # DISEASE: B, (O?), I
    assert probs[1, 0].argmax() == TAG_O
    spans = decode_spans(text, offsets, probs, LABELS)
    assert [(s.label, text[s.start : s.end]) for s in spans] == [("DISEASE", "linfoma de Hodgkin")]
    assert spans[0].score == pytest.approx((0.95 + 0.6 + 0.95) / 3, abs=1e-4)


def test_a_confident_o_still_ends_a_mention() -> None:
    text = "fiebre y tos"
    offsets = np.array([[0, 6], [7, 8], [9, 12]])
    probs = np.zeros((3, 3, 3), dtype=np.float32)
    probs[:, :, TAG_O] = 1.0
    probs[:, 1] = [[0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.05, 0.15, 0.8]]  # SYMPTOM: B, O, I
    spans = decode_spans(text, offsets, probs, LABELS)
    # "tos" leans I, but I cannot follow O: it opens its own mention as B
    assert [text[s.start : s.end] for s in spans] == ["fiebre", "tos"]


def test_best_tag_paths_equal_exhaustive_search_over_valid_sequences() -> None:
    """The split-at-B shortcut gives the most probable valid sequence, checked against all 3^n sequences."""
    import itertools

    rng = np.random.default_rng(7)
    for _ in range(150):
        n_tokens = int(rng.integers(1, 7))
        probs = rng.dirichlet([0.6, 0.6, 0.6], size=(n_tokens, 2))
        tags = best_tag_paths(probs)
        for label in range(2):
            log_probs = np.log(probs[:, label])

            def valid(seq: tuple[int, ...]) -> bool:
                return all(t != TAG_I or (i > 0 and seq[i - 1] != TAG_O) for i, t in enumerate(seq))

            best = max(
                (seq for seq in itertools.product(range(3), repeat=n_tokens) if valid(seq)),
                key=lambda seq: sum(log_probs[i, t] for i, t in enumerate(seq)),
            )
            found = tuple(int(t) for t in tags[:, label])
            assert valid(found)
            score = sum(log_probs[i, t] for i, t in enumerate(found))
            assert score == pytest.approx(sum(log_probs[i, t] for i, t in enumerate(best)))


def test_b_after_b_splits_and_o_closes() -> None:
    text = "fiebre tos"
    offsets = np.array([[0, 6], [7, 10]])
    tags = np.zeros((2, 3), dtype=np.int64)
    tags[:, 1] = [TAG_B, TAG_B]
    assert [(s.start, s.end) for s in decode_spans(text, offsets, one_hot(tags), LABELS)] == [(0, 6), (7, 10)]


@pytest.mark.parametrize(
    ("text", "start", "end", "expected"),
    [
        ("(fiebre), tos", 0, 9, "fiebre"),
        ("la neumonía.", 2, 12, "neumonía"),
        ("hipertensión arterial", 2, 10, "hipertensión"),  # snapped out to the whole word
        ("EPOC (grave)", 0, 12, "EPOC (grave)"),  # balanced parentheses stay
        ("  ,.;  ", 0, 7, None),
    ],
)
def test_refine_span_trims_edges_and_snaps_to_words(text: str, start: int, end: int, expected: str | None) -> None:
    refined = refine_span(text, start, end)
    assert (text[refined[0] : refined[1]] if refined else None) == expected


MULTILINGUAL_CASES = [
    ("Paciente con neumonía y dolor torácico; se realizó ecografía.", ["neumonía", "dolor torácico", "ecografía"]),
    (
        "Pacientka s hypertenzí a bolestí hlavy, provedena koronarografie.",
        ["hypertenzí", "bolestí hlavy", "koronarografie"],
    ),
    (
        "Pacient cu insuficiență cardiacă și tuse; s-a efectuat ecografie.",
        ["insuficiență cardiacă", "tuse", "ecografie"],
    ),
    ("Ασθενής με πυρετό και βήχα, έγινε ακτινογραφία θώρακος.", ["πυρετό", "βήχα", "ακτινογραφία θώρακος"]),
    ("Больной с лихорадкой и кашлем.", ["лихорадкой", "кашлем"]),
    ("Patiënt met koorts en hoofdpijn; coloscopie gepland.", ["koorts", "hoofdpijn", "coloscopie"]),
    ("Patienten har feber och huvudvärk, genomgick gastroskopi.", ["feber", "huvudvärk", "gastroskopi"]),
]


def _round_trip(tokenizer: Any, text: str, surfaces: list[str]) -> None:
    spans = []
    for index, surface in enumerate(surfaces):
        start = text.index(surface)
        spans.append((LABELS[index % 3], start, start + len(surface)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(encoded["offset_mapping"]).reshape(-1, 2)
    assert offsets.max() <= len(text)
    decoded = decode_spans(text, offsets, one_hot(spans_to_tags(offsets, spans, LABELS)), LABELS)
    assert sorted((s.label, s.start, s.end) for s in decoded) == sorted(spans)
    for span in decoded:
        assert text[span.start : span.end] in surfaces


@pytest.mark.parametrize(("text", "surfaces"), MULTILINGUAL_CASES)
def test_offsets_round_trip_with_the_e5_tokenizer(e5_encoder_dir: Path, text: str, surfaces: list[str]) -> None:
    """Gold spans → token tags → decoded spans gives back exactly the gold character offsets."""
    from transformers import AutoTokenizer

    _round_trip(AutoTokenizer.from_pretrained(e5_encoder_dir), text, surfaces)


@pytest.mark.parametrize(("text", "surfaces"), MULTILINGUAL_CASES[:2])
def test_offsets_round_trip_with_a_wordpiece_tokenizer(tiny_encoder: Path, text: str, surfaces: list[str]) -> None:
    from transformers import AutoTokenizer

    _round_trip(AutoTokenizer.from_pretrained(tiny_encoder), text, surfaces)


def test_nested_spans_of_one_label_keep_the_outer_and_other_labels_overlap() -> None:
    offsets = np.array([[0, 5], [6, 14], [15, 20]])
    tags = spans_to_tags(offsets, [("DISEASE", 0, 20), ("DISEASE", 6, 14), ("SYMPTOM", 0, 14)], LABELS)
    assert tags[:, 0].tolist() == [TAG_B, TAG_I, TAG_I]
    assert tags[:, 1].tolist() == [TAG_B, TAG_I, TAG_O]


def test_spans_below_the_minimum_score_are_dropped() -> None:
    text = "fiebre tos"
    offsets = np.array([[0, 6], [7, 10]])
    probs = np.full((2, 3, 3), 0.0, dtype=np.float32)
    probs[:, :, TAG_O] = 1.0
    probs[0, 1] = [0.1, 0.9, 0.0]  # SYMPTOM "fiebre", score 0.9
    probs[1, 1] = [0.4, 0.6, 0.0]  # SYMPTOM "tos", score 0.6
    assert [text[s.start : s.end] for s in decode_spans(text, offsets, probs, LABELS)] == ["fiebre", "tos"]
    kept = decode_spans(text, offsets, probs, LABELS, min_score=0.7)
    assert [(text[s.start : s.end], s.score) for s in kept] == [("fiebre", 0.9)]
