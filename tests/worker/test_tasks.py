"""The worker's tagging step: mentions from the tagger, assertions from the note's language."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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


def test_a_stage_that_loses_redis_gives_its_message_back_instead_of_failing(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing the next stage fails (the broker is down): the message is rejected with requeue, so it
    comes back, rather than failed and acknowledged (lost)."""
    from celery.exceptions import Reject
    from kombu.exceptions import OperationalError

    from core.deps import get_note_state
    from worker import tasks

    def broker_down(*_: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(tasks, "_send", broker_down)
    monkeypatch.setattr(tasks.time, "sleep", lambda _: None)
    document = {
        "resourceType": "DocumentReference",
        "id": "doc-r",
        "status": "current",
        "subject": {"reference": "Patient/p"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "RmllYnJlLg=="}}],
    }
    state = get_note_state()
    state.store_note("doc-r", "1", document)
    with pytest.raises(Reject) as rejected:
        tasks.process_note.run("doc-r", "1")
    assert rejected.value.requeue
    assert tasks.dead_letter_store().count() == 0  # not dead-lettered: it was never the note's fault

    class Request:
        id = "message-1"
        args = ["doc-r", "1"]

    assert tasks.tag_notes.run([Request()]) == []  # its text is waiting, but handing on fails: not acknowledged
