"""Lost messages (worker/reconcile.py): a note stuck in flight with its stage's message nowhere gets it sent again;
one whose message waits in a queue, or that finished, does not."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

DOCUMENT = {
    "resourceType": "DocumentReference",
    "status": "current",
    "subject": {"reference": "Patient/p"},
    "content": [{"attachment": {"contentType": "text/plain", "data": "RmllYnJlLg=="}}],
}


@pytest.fixture()
def lost_after_30s(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("FHIR_NER_LOST_MESSAGE_SECONDS", "30")
    get_settings.cache_clear()


def test_a_note_whose_message_was_lost_gets_its_stage_again_once(
    lost_after_30s: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.deps import get_note_state, get_redis
    from worker import tasks
    from worker.reconcile import _messages_in_flight, resend_lost

    state = get_note_state()
    real_send = tasks._send
    lost: list[tuple[str, ...]] = []
    monkeypatch.setattr(tasks, "_send", lambda *job: lost.append(job))  # the message never reaches Redis
    for document_id in ("doc-lost", "doc-queued"):
        state.store_note(document_id, "1", {**DOCUMENT, "id": document_id})
    tasks.process_note.run("doc-lost", "1")  # read, its text kept, "waiting for the model"; the tag message lost
    assert lost == [(tasks.TAG_NOTES, "doc-lost", "1")]
    monkeypatch.setattr(tasks, "_send", real_send)
    tasks._send(tasks.TAG_NOTES, "doc-queued", "1")  # this one's message waits in the inference queue
    state.set_status("doc-queued", "1", "processing", stage="waiting for the model")
    state.set_status("doc-done", "1", "done", mentions=0)

    assert resend_lost() == []  # not stuck long enough yet
    later = time.time() + 60
    assert resend_lost(now=later) == [("doc-lost", "1", tasks.TAG_NOTES)]
    assert _messages_in_flight(get_redis()) == {("doc-lost", "1"), ("doc-queued", "1")}
    record = state.get_status("doc-lost")["1"]
    assert record["status"] == "processing" and record["resent"] == tasks.TAG_NOTES
    assert resend_lost(now=later + 60) == []  # its message is queued now: nothing twice


def test_the_stage_sent_again_is_where_the_note_stopped(lost_after_30s: None) -> None:
    from core.deps import get_note_state
    from worker import tasks
    from worker.reconcile import resend_lost

    state = get_note_state()
    state.claim_and_queue("doc-new", "1", {**DOCUMENT, "id": "doc-new"})  # claimed, its message lost
    state.set_status("doc-tagged", "1", "processing", stage="writing")
    tasks.work_store().put_outputs({("doc-tagged", "1"): ([], tasks.ModelInfo("m", "r"))})
    sent = resend_lost(now=time.time() + 60)
    assert sorted(sent) == [("doc-new", "1", tasks.PROCESS_NOTE), ("doc-tagged", "1", tasks.WRITE_NOTE)]


def test_a_long_queue_is_a_backlog_not_a_loss(lost_after_30s: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.reconcile as reconcile
    from core.deps import get_note_state
    from worker import tasks

    monkeypatch.setattr(reconcile, "MAX_QUEUE_SCAN", 1)
    for number in range(2):
        tasks._send(tasks.TAG_NOTES, f"doc-{number}", "1")
    get_note_state().set_status("doc-stuck", "1", "processing", stage="waiting for the model")
    assert reconcile.resend_lost(now=time.time() + 60) == []


def test_undecodable_messages_are_skipped() -> None:
    from worker.reconcile import _note_jobs

    envelope: dict[str, Any] = {"headers": {"task": "worker.tasks.write_note"}, "body": '[["d", "2"], {}, {}]'}
    assert _note_jobs([b"not json", json.dumps({"headers": {"task": "other"}}), json.dumps([envelope, "", "io"])]) == {
        ("d", "2")
    }
