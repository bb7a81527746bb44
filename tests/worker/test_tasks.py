"""The worker's tagging step: mentions from the tagger, assertions from the note's language."""

from __future__ import annotations

from pathlib import Path

from tiny_models import SAMPLE_NOTES

from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
from worker.tasks import tag_note


def test_tag_note_sets_what_the_note_says_about_each_mention(tiny_tagger_path: Path) -> None:
    pipeline = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path))
    text = SAMPLE_NOTES[2]  # "No presenta disnea. Antecedentes de diabetes mellitus. Se programa colecistectomía."
    mentions, model = tag_note(text, pipeline, language="es")
    assertions = {m.text: m.assertion for m in mentions}
    assert assertions == {"disnea": "negated", "diabetes mellitus": "historical", "colecistectomía": "hypothetical"}
    assert model.revision == "tiny-test"
    for mention in mentions:
        assert text[mention.start : mention.end] == mention.text
