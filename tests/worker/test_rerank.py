"""The linker's re-ranker: pure and deterministic features, exact matches stay first, real ranking changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mappings.profile import load_profile
from worker.coding import code_mentions
from worker.linker import rerank_weights, shipped_linker_available
from worker.rerank import FEATURES, Detail, NgramIdf, Reranker, Scored, features
from worker.terminology import TerminologyService, terminology_for

TERMS = ["acute pancreatitis", "biliary acute pancreatitis", "pancreatitis aguda biliar", "gallstone pancreatitis"]


def candidates() -> list[Scored]:
    """A fixed list in search order: K85.90 first by cosine, K85.10 (whose strings all agree) second."""
    return [
        Scored("K85.90", 0.82, False, "Acute pancreatitis", Detail((0.82,), ("acute pancreatitis",), "display")),
        Scored(
            "K85.10",
            0.80,
            False,
            "Biliary acute pancreatitis",
            Detail((0.80, 0.79, 0.79), ("pancreatitis aguda biliar", "biliary acute pancreatitis"), "display"),
        ),
        Scored("N28.1", 0.70, False, "Cyst of kidney", Detail((0.70,), ("cyst of kidney",), "display")),
    ]


def weights_on(*names: str) -> list[float]:
    """The score's weight 10, the named features' 1, the others' 0."""
    return [10.0] + [1.0 if name in names else 0.0 for name in FEATURES[1:]]


def test_the_features_are_pure_and_deterministic() -> None:
    idf = NgramIdf(TERMS)
    given = candidates()
    first = features("pancreatitis aguda biliar", given, {"K85.10": 3}, idf)
    again = features("pancreatitis aguda biliar", list(given), {"K85.10": 3}, NgramIdf(reversed(TERMS)))
    assert first == again and given == candidates()
    assert len(first) == 3 and all(len(row) == len(FEATURES) for row in first)
    column = {name: [row[i] for row in first] for i, name in enumerate(FEATURES)}
    assert column["n_close"][1] > column["n_close"][0] > column["n_close"][2] == 0.0  # strings near the best
    assert column["tfidf_max"][1] == pytest.approx(1.0)  # the mention is one of K85.10's strings
    assert column["seen"] == [0.0, 1.0, 0.0]
    assert column["cat_mass"][0] == column["cat_mass"][1] > column["cat_mass"][2]  # K85 holds most of the mass


def random_terms() -> list[str]:
    """60 strings of 1,000 random letters: more than 65,536 distinct n-grams, past 2-byte columns."""
    import random

    generator = random.Random(7)
    return ["".join(generator.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(1000)) for _ in range(60)]


@pytest.mark.parametrize("kind", ["names", "many n-grams"])
def test_the_ngram_table_holds_each_terms_weights_as_defined(kind: str) -> None:
    """The table built in one pass (session 21) holds what its definition says, to the bit: an n-gram's idf is
    log((terms + 1) / terms holding it), each term's row its n-grams' columns (first seen first) and counts (at most
    255 in the compact row), and its norm the square root of its weights' squares summed in its n-grams' order; a
    term with an n-gram 600 times and the empty term included."""
    import math

    import numpy as np

    from worker.rerank import ngrams

    terms = [*TERMS, "a" * 600, "", TERMS[0]] if kind == "names" else random_terms()
    idf = NgramIdf(terms)
    distinct = sorted(set(terms))
    grams = [ngrams(term) for term in distinct]
    frequency: dict[str, int] = {}
    for found in grams:
        for gram in found:
            frequency[gram] = frequency.get(gram, 0) + 1
    assert list(idf.idf) == list(frequency)  # columns in the order first seen
    assert idf.idf == {gram: math.log((len(distinct) + 1) / n) for gram, n in frequency.items()}
    columns = {gram: column for column, gram in enumerate(frequency)}
    for row, (term, found) in enumerate(zip(distinct, grams, strict=True)):
        span = slice(int(idf._starts[row]), int(idf._starts[row + 1]))
        assert idf._row[term] == row
        assert idf._columns[span].tolist() == [columns[gram] for gram in found]
        assert idf._counts[span].tolist() == [min(times, 255) for times in found.values()]
        norm = math.sqrt(sum((times * idf.idf[gram]) ** 2 for gram, times in found.items())) or 1.0
        assert idf._norms[row] == norm
    assert idf._counts.dtype == np.uint8
    if kind == "names":
        assert max(ngrams("a" * 600).values()) > 255 and idf._columns.dtype == np.uint16
    else:
        assert len(idf.idf) > 2**16 and idf._columns.dtype == np.int32


def test_the_compact_cosines_equal_the_dictionary_ones() -> None:
    """``cosines`` reads the strings it was built from as compact rows and builds others' vectors on demand: the
    same values as ``cosine``, for built strings, other strings, repeats and a string without n-grams."""
    idf = NgramIdf([*TERMS, ""])
    strings = [*TERMS, "cyst of kidney", "", TERMS[0], "pancreatitis"]
    for mention in ("pancreatitis aguda", "acute biliary pancreatitis", "zzz", ""):
        fast = idf.cosines(mention, strings)
        slow = [idf.cosine(mention, term) for term in strings]
        assert fast == pytest.approx(slow, abs=1e-12)
        assert idf.cosines(mention, []) == []
    assert idf.cosines("biliary acute pancreatitis", ["biliary acute pancreatitis"]) == pytest.approx([1.0])
    assert idf.cosines("pancreatitis", ["cyst of kidney"]) == [0.0]


def test_a_code_whose_strings_agree_with_the_mention_moves_up() -> None:
    reranker = Reranker({"DISEASE": weights_on("tfidf_max", "n_close")}, {}, NgramIdf(TERMS))
    ranked = reranker.rerank("DISEASE", "pancreatitis aguda biliar", candidates())
    assert [c.code for c in ranked] == ["K85.10", "K85.90", "N28.1"]
    assert sorted(ranked, key=lambda c: c.code) == sorted(candidates(), key=lambda c: c.code)  # scores unchanged
    assert ranked == reranker.rerank("DISEASE", "pancreatitis aguda biliar", candidates())  # deterministic
    # Without those features (the score alone) the search order stands; an unknown label is left alone.
    alone = Reranker({"DISEASE": weights_on()}, {}, NgramIdf(TERMS))
    assert alone.rerank("DISEASE", "pancreatitis aguda biliar", candidates()) == candidates()
    assert reranker.rerank("SYMPTOM", "x", candidates()) == candidates()
    # Fitted on Spanish: other languages keep the search's order.
    spanish = Reranker({"DISEASE": weights_on("tfidf_max")}, {}, NgramIdf(TERMS), languages=frozenset({"es"}))
    assert spanish.applies("DISEASE", "es-ES") and not spanish.applies("DISEASE", "en")
    assert not spanish.applies("DISEASE", None) and not spanish.applies("SYMPTOM", "es")


def test_an_exact_match_stays_first() -> None:
    exact = [Scored("K85.90", 1.0, True, "Acute pancreatitis", None), *candidates()[1:]]
    reranker = Reranker({"DISEASE": weights_on("tfidf_max", "n_close")}, {}, NgramIdf(TERMS))
    ranked = reranker.rerank("DISEASE", "pancreatitis aguda biliar", exact)
    assert ranked[0] == exact[0] and ranked[1].code == "K85.10"


def test_candidates_past_the_top_keep_their_order_below() -> None:
    many = [*candidates(), Scored("Z00.00", 0.65, False, "General exam", None)]
    reranker = Reranker({"DISEASE": weights_on("tfidf_max")}, {}, NgramIdf(TERMS), top=3)
    ranked = reranker.rerank("DISEASE", "pancreatitis aguda biliar", many)
    assert [c.code for c in ranked] == ["K85.10", "K85.90", "N28.1", "Z00.00"]


# --------------------------------------------------------------------------------------------------
# The shipped weights, through the worker's lookup
# --------------------------------------------------------------------------------------------------
shipped = pytest.mark.skipif(
    not shipped_linker_available() or not rerank_weights(), reason="worker/linker/ has no linker or re-ranker"
)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TerminologyService, TerminologyService]]:
    cache = tmp_path_factory.mktemp("empty-cache")
    on = terminology_for(load_profile(), "auto", cache_root=cache, rerank=True)
    off = terminology_for(load_profile(), "auto", cache_root=cache, rerank=False)
    assert on is not None and off is not None
    yield on, off


def first_codes(service: TerminologyService, texts: list[str], label: str = "DISEASE") -> list[str]:
    return [r.candidates[0][1] for r in code_mentions(texts, label, "es", 5, load_profile(), service)]


@shipped
def test_the_shipped_reranker_corrects_codiesp_dev_mentions(
    services: tuple[TerminologyService, TerminologyService],
) -> None:
    # CodiEsp dev's gold, which the search alone ranks second or lower: heart failure (I50.9, not a congenital heart
    # malformation Q24.9), pulmonary emphysema (J43.9, not interstitial lung disease J84.10), cervical cancer (C53.9,
    # not carcinoma in situ D06.9).
    on, off = services
    texts = ["fallo cardíaco", "enfisema pulmonar", "cáncer de cervix"]
    assert first_codes(on, texts) == ["I50.9", "J43.9", "C53.9"]
    assert all(a != b for a, b in zip(first_codes(off, texts), ["I50.9", "J43.9", "C53.9"], strict=True))


@shipped
def test_exact_matches_stay_first_with_the_shipped_reranker(
    services: tuple[TerminologyService, TerminologyService],
) -> None:
    on, off = services
    texts = ["neumonía", "diabetes mellitus tipo 2", "hipertensión arterial"]
    assert first_codes(on, texts) == first_codes(off, texts) == ["J18.9", "E11.9", "I10"]
    (result,) = code_mentions(["neumonía"], "DISEASE", "es", 5, load_profile(), on)
    assert result.candidates[0][3] == 1.0 and all(c[3] < 1.0 for c in result.candidates[1:])
    assert len(result.candidates) == 5


@shipped
def test_a_shipped_weights_file_for_other_features_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "rerank.json").write_text('{"top": 30, "features": ["score"], "weights": {}}', encoding="utf-8")
    assert rerank_weights(tmp_path) == {}
