"""The translated tagger data (worker/nlp/data/translated): each translation keeps its Spanish source's mentions,
the BRAT folders the training reads are exactly the markup, and no note gives excerpts to two splits."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.translated_corpus import LANGUAGES, MARKUP, OUT, SPLITS, _file_name, parse_markup, read_markup
from worker.nlp.corpus import read_brat_folder

PRESENT = [split for split in SPLITS if (MARKUP / f"es-{split}.md").is_file()]


def _note(excerpt_id: str) -> str:
    return excerpt_id.rsplit(":", 1)[0]  # corpus/note, without the character range


def test_the_training_and_validation_excerpts_come_from_different_notes() -> None:
    assert {"train", "val"} <= set(PRESENT)
    notes = {split: [_note(k) for k in read_markup(MARKUP / f"es-{split}.md")] for split in PRESENT}
    for split, found in notes.items():
        assert len(found) == len(set(found)), f"{split}: one excerpt per note"
    for first in PRESENT:
        for second in PRESENT:
            if first < second:
                assert not set(notes[first]) & set(notes[second]), (first, second)


@pytest.mark.parametrize("split", PRESENT)
@pytest.mark.parametrize("language", LANGUAGES)
def test_a_translation_keeps_its_spanish_sources_mentions_and_its_brat_is_the_markup(
    language: str, split: str
) -> None:
    path = MARKUP / f"{language}-{split}.md"
    if split not in ("train", "val") and not path.is_file():
        pytest.skip(f"{path.name} is not written yet")
    source = read_markup(MARKUP / f"es-{split}.md")
    blocks = read_markup(path)
    assert list(blocks) == list(source)
    brat = {doc.doc_id: doc for doc in read_brat_folder(OUT / language / split)}
    assert len(brat) == len(blocks)
    for excerpt_id, body in blocks.items():
        text, spans = parse_markup(body, excerpt_id)
        _, spanish = parse_markup(source[excerpt_id], excerpt_id)
        assert Counter(label for *_, label in spans) == Counter(label for *_, label in spanish), excerpt_id
        doc = brat[_file_name(excerpt_id)]
        assert doc.text == text
        assert sorted((s.start, s.end, s.label) for s in doc.spans) == sorted(spans)
        for start, end, _ in spans:
            covered = text[start:end]
            assert covered == covered.strip() and "\n" not in covered, (excerpt_id, covered)
