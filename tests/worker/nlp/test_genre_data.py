"""The genre passages (worker/nlp/data/genres): every language has training and validation passages in each genre,
they parse, no topic is in both splits, and the BRAT folders training and evaluation read are exactly the markup."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.genre_corpus import LANGUAGES, MARKUP, OUT, SPLITS, _file_name, check, genres_of, topic
from benchmarks.translated_corpus import parse_markup, read_markup
from worker.nlp.corpus import read_brat_folder
from worker.nlp.training import _folder_key

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_languages_passages_parse_cover_every_genre_and_keep_validation_topics_apart(language: str) -> None:
    problems, counts = check(language, write=False)
    assert problems == []
    for split in SPLITS:
        blocks = read_markup(MARKUP / f"{language}-{split}.md")
        assert Counter(k.split("/", 1)[0] for k in blocks).keys() == set(genres_of(language)), split
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


def test_no_check_sentence_is_in_a_passage() -> None:
    """The one-line check notes (benchmarks/short_notes) measure what the `brief` training notes are for, so none of
    them may be a sentence of a genre passage or a translated excerpt of any language or split (a common phrase
    inside a longer sentence, "..., geen koorts.", is not one)."""
    check_files = [REPO / "benchmarks" / "short_notes" / name for name in ("sentences.tsv", "abbreviations.tsv")]
    sentences = [row["sentence"] for path in check_files for row in csv.DictReader(path.open(), delimiter="\t")]
    assert len(sentences) == 56 + 70
    markup = sorted(MARKUP.glob("*.md")) + sorted(
        (REPO / "worker" / "nlp" / "data" / "translated" / "markup").glob("*.md")
    )
    assert len(markup) >= 2 * len(LANGUAGES) + 6
    texts = [parse_markup(body, passage_id)[0] for path in markup for passage_id, body in read_markup(path).items()]
    written = {part.strip().casefold() for text in texts for part in re.split(r"(?<=[.!?])\s+|\n", text)}
    assert len(written) > 5000
    assert [s for s in sentences if s.casefold() in written] == []
