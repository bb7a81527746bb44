"""The review pages' worker jobs (issue 16): the playground's tagging and the queue page's dead-letter retry."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import SAMPLE_NOTES


@pytest.fixture()
def worker_env(app_env: dict[str, str], tiny_tagger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.deps import reset_dependencies
    from worker.runtime import reset_pipeline

    monkeypatch.setenv("FHIR_NER_MODEL_PATH", str(tiny_tagger_path))
    monkeypatch.setenv("FHIR_NER_TERMINOLOGY", "off")
    reset_dependencies()
    reset_pipeline()


def test_the_playground_job_tags_maps_and_validates_without_writing(worker_env: None) -> None:
    from core.celery_app import broker_queue_key
    from core.deps import get_redis
    from worker.review_tasks import review_store, try_text

    text = SAMPLE_NOTES[0]
    store = review_store()
    request_id = store.put_try({"text": text, "language": "es", "profile_yaml": None})
    try_text.run(request_id)
    result = store.take_try_result(request_id)
    assert result is not None
    assert result["valid"] is True
    assert result["validation"] == "valid FHIR R4 transaction Bundle"
    assert {m["text"] for m in result["mentions"]} == {"fiebre", "tos", "neumonía", "radiografía de tórax"}
    for mention in result["mentions"]:
        assert text[mention["start"] : mention["end"]] == mention["text"]
    types = sorted(e["resource"]["resourceType"] for e in result["bundle"]["entry"])
    assert types == ["Condition", "Device", "Observation", "Observation", "Procedure", "Provenance"]
    assert store.take_try(request_id) is None  # the text was taken once and is gone
    assert get_redis().llen(broker_queue_key("io")) == 0  # nothing queued for writing


def test_the_playground_job_maps_with_an_uploaded_profile_or_says_what_is_wrong_with_it(worker_env: None) -> None:
    from worker.review_tasks import run_try

    profile = "name: mine\nlabels:\n  DISEASE: {mapper: condition}\n"
    result = run_try({"text": SAMPLE_NOTES[0], "language": "es", "profile_yaml": profile})
    assert result["profile"] == "mine"
    written = [m for m in result["mentions"] if m["resource_type"]]
    assert [m["text"] for m in written] == ["neumonía"]
    assert "label SYMPTOM is not in profile mine" in next(m["reason"] for m in result["mentions"] if m["text"] == "tos")
    broken = run_try({"text": "fiebre", "profile_yaml": "name: x\nlabels: {DISEASE: {mapper: nope}}\n"})
    assert broken["profile_error"].startswith("uploaded profile: invalid mapping profile: ")
    assert "unknown mapper 'nope'" in broken["profile_error"]


def test_retrying_a_dead_letter_sends_it_back_like_the_cli(app_env: dict[str, str]) -> None:
    import json

    from core.celery_app import broker_queue_key
    from core.deps import get_note_state, get_redis
    from worker.dlq import DeadLetter
    from worker.review_tasks import retry_dead_letter
    from worker.tasks import PROCESS_NOTE, dead_letter_store

    dead_letter_store().add(DeadLetter(id="process_note:n-1:2", task=PROCESS_NOTE, args=["n-1", "2"], error="x"))
    get_note_state().set_status("n-1", "2", "dead-lettered", dead_letter="process_note:n-1:2")
    assert retry_dead_letter.run("process_note:n-1:2") is True
    assert dead_letter_store().count() == 0
    assert get_note_state().get_status("n-1")["2"]["status"] == "queued"
    message = json.loads(get_redis().lrange(broker_queue_key("io"), 0, -1)[0])
    assert message["headers"]["task"] == PROCESS_NOTE
    assert retry_dead_letter.run("process_note:n-1:2") is False  # retried already: nothing twice
