"""A job the EHR refuses for good is dead-lettered with its error, shown by `fhir-ner dlq`, and completes on retry."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from conftest import WorkerProcess
from ehr.harness import FhirTestServer
from fastapi.testclient import TestClient
from faults import note_document
from test_end_to_end import AUTH, backport_notification, create, search, wait_for_status
from tiny_models import SAMPLE_NOTES

from adapter.cli import main


@pytest.mark.timeout(300)
def test_a_refused_job_is_dead_lettered_and_dlq_retry_completes_it(
    ehr: FhirTestServer, app_env: dict[str, str], worker_process: WorkerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", ehr.base_url)
    worker_process.env["FHIR_NER_EHR_BASE_URL"] = ehr.base_url
    from adapter.app import create_app
    from core.deps import reset_dependencies

    reset_dependencies()
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba"}]})
    document = note_document(ehr, patient["id"], SAMPLE_NOTES[1], language="en")
    version = document["meta"]["versionId"]
    worker_process.start()
    ehr.fail_next(1, 400)  # the EHR refuses the worker's first request: not retryable
    runner = CliRunner()
    with TestClient(create_app()) as client:
        assert (
            client.post("/fhir/notify", content=json.dumps(backport_notification(document)), headers=AUTH).status_code
            == 200
        )
        record = wait_for_status(client, document["id"], "dead-lettered")["versions"][version]
        assert record["status"] == "dead-lettered" and "HTTP 400" in record["reason"]
        letter_id = record["dead_letter"]

        listed = runner.invoke(main, ["dlq", "list"])
        assert listed.exit_code == 0 and letter_id in listed.output and "HTTP 400" in listed.output
        shown = json.loads(runner.invoke(main, ["dlq", "show", letter_id]).output)
        assert shown["task"] == "worker.tasks.write_note" and shown["args"] == [document["id"], version]
        assert search(ehr, f"Condition?subject=Patient/{patient['id']}") == []

        retried = runner.invoke(main, ["dlq", "retry", letter_id])
        assert retried.exit_code == 0, retried.output
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = client.get(f"/documents/{document['id']}", headers=AUTH).json()["versions"][version]["status"]
            if status == "done":
                break
            time.sleep(0.25)
        assert status == "done"
    assert [c["code"]["text"] for c in search(ehr, f"Condition?subject=Patient/{patient['id']}")] == ["pneumonia"]
    assert "0 dead-lettered" in runner.invoke(main, ["dlq", "list"]).output
    missing = runner.invoke(main, ["dlq", "show", "nope"])
    assert missing.exit_code == 1 and "no dead-lettered job" in missing.output
    assert runner.invoke(main, ["dlq", "retry"]).exit_code == 1


def test_a_recovery_job_out_of_retries_is_dead_lettered_not_dropped(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.celery_app import get_celery_app
    from core.deps import get_note_state, reset_dependencies
    from worker.tasks import dead_letter_store, resolve_note

    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", "http://127.0.0.1:9/fhir")  # nothing listens there
    monkeypatch.setenv("FHIR_NER_EHR_RETRY_ATTEMPTS", "1")
    monkeypatch.setenv("FHIR_NER_TASK_MAX_RETRIES", "2")
    monkeypatch.setenv("FHIR_NER_TASK_RETRY_MAX_DELAY", "0")
    reset_dependencies()
    get_celery_app()
    result = resolve_note.apply(args=["doc-1", "Subscription/s1"])  # eager: the retries run in place
    assert result.failed()
    letter = dead_letter_store().get("resolve_note:doc-1:Subscription/s1")
    assert letter is not None and letter.task == "worker.tasks.resolve_note"
    assert letter.args == ["doc-1", "Subscription/s1"] and letter.attempts == 3
    assert letter.error == "GET DocumentReference/doc-1: ConnectError"
    requeued = CliRunner().invoke(main, ["dlq", "retry", letter.id])
    assert requeued.exit_code == 0, requeued.output
    assert get_note_state().get_status("doc-1") == {}  # a recovery job has no note version to mark
