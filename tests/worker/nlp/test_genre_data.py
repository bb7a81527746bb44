"""The genre passages (worker/nlp/data/genres): every language has training and validation passages in each genre,
they parse, no topic is in both splits, and the BRAT folders training and evaluation read are exactly the markup."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.genre_corpus import GENRES, LANGUAGES, MARKUP, OUT, SPLITS, _file_name, check, topic
from benchmarks.translated_corpus import parse_markup, read_markup
from worker.nlp.corpus import read_brat_folder
from worker.nlp.training import _folder_key


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_languages_passages_parse_cover_every_genre_and_keep_validation_topics_apart(language: str) -> None:
    problems, counts = check(language, write=False)
    assert problems == []
    for split in SPLITS:
        blocks = read_markup(MARKUP / f"{language}-{split}.md")
        assert Counter(k.split("/", 1)[0] for k in blocks).keys() == set(GENRES), split
        assert {"DISEASE", "SYMPTOM", "PROCEDURE"} <= counts[split].keys(), split
    train, val = ({topic(k) for k in read_markup(MARKUP / f"{language}-{split}.md")} for split in ("train", "val"))
    assert not train & val


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("language", LANGUAGES)
def test_the_brat_folders_are_the_markup(language: str, split: str) -> None:
    blocks = read_markup(MARKUP / f"{language}-{split}.md")
    brat = {doc.doc_id: doc for doc in read_brat_folder(OUT / language / split)}
    assert set(brat) == {_file_name(k) for k in blocks}
    for passage_id, body in blocks.items():
        text, spans = parse_markup(body, passage_id)
        doc = brat[_file_name(passage_id)]
        assert doc.text == text
        assert sorted((s.start, s.end, s.label) for s in doc.spans) == sorted(spans)


def test_genre_folders_get_ids_apart_from_the_translated_excerpts_of_the_same_language() -> None:
    translated = OUT.parent / "translated"
    assert _folder_key(OUT / "sv" / "train") == "sv-genres-train"
    assert _folder_key(translated / "sv" / "train") == "sv-train"
    assert _folder_key(translated / "sv" / "train2") == "sv-train2"
