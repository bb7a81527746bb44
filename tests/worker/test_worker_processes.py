"""The two worker pools as separate real processes: notes waiting for the model are tagged in one batch,
and each pool serves its Prometheus metrics."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from conftest import WorkerProcess
from ehr.harness import FhirTestServer
from fastapi.testclient import TestClient
from faults import free_port, metric, note_document, notify, statuses, wait_until
from test_end_to_end import create
from tiny_models import SAMPLE_NOTES

pytestmark = pytest.mark.timeout(300)


def test_waiting_notes_are_tagged_in_one_batch_and_both_pools_report_metrics(
    app_env: dict[str, str],
    ehr: FhirTestServer,
    tiny_tagger_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapter.app import create_app
    from core.deps import reset_dependencies

    env = {
        **app_env,
        "FHIR_NER_EHR_BASE_URL": ehr.base_url,
        "FHIR_NER_TERMINOLOGY": "off",
        "FHIR_NER_MODEL_PATH": str(tiny_tagger_path),
        "FHIR_NER_INFERENCE_MAX_NOTES": "16",  # batching is off by default on a CPU
    }
    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", ehr.base_url)
    reset_dependencies()
    io_port, model_port = free_port(), free_port()
    io_worker = WorkerProcess({**env, "FHIR_NER_WORKER_METRICS_PORT": str(io_port)}, tmp_path / "io.log", "io")
    model_worker = WorkerProcess(
        {**env, "FHIR_NER_WORKER_METRICS_PORT": str(model_port)}, tmp_path / "inference.log", "inference"
    )
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Lote"}]})
    documents = [note_document(ehr, patient["id"], SAMPLE_NOTES[i % 3]) for i in range(6)]
    try:
        io_worker.start()
        with TestClient(create_app()) as client:
            for number, document in enumerate(documents, start=1):
                assert notify(client, document, number) == 200
            # Read by the I/O pool; no model is running yet, so they wait on the inference queue.
            wait_until(
                lambda: all(statuses(client, d["id"])["1"].get("stage") == "waiting for the model" for d in documents),
                60,
                0.1,
                "the notes were not read",
            )
            # The stage is recorded just before the message is queued (worker.tasks._hand_on), so the last
            # message may land a moment after its note reads "waiting for the model".
            wait_until(
                lambda: 'fhir_ner_queue_depth{queue="inference"} 6.0' in client.get("/metrics").text,
                10,
                0.05,
                "the six waiting notes were not counted on the inference queue",
            )
            model_worker.start()
            wait_until(
                lambda: all(statuses(client, d["id"])["1"]["status"] == "done" for d in documents),
                90,
                0.2,
                "the notes were not processed",
            )
            mentions = sum(statuses(client, d["id"])["1"]["mentions"] for d in documents)
        model_metrics = httpx.get(f"http://127.0.0.1:{model_port}/metrics", timeout=5).text
        io_metrics = httpx.get(f"http://127.0.0.1:{io_port}/metrics", timeout=5).text
    finally:
        io_worker.stop()
        model_worker.stop()
    # One pass tagged all six notes.
    assert metric(model_metrics, "fhir_ner_worker_batch_notes_count") == 1
    assert metric(model_metrics, "fhir_ner_worker_batch_notes_sum") == 6
    assert metric(model_metrics, "fhir_ner_worker_tokens_total") > 0
    by_label = re.findall(r"^fhir_ner_worker_mentions_total\{[^}]*\} ([0-9.]+)$", model_metrics, re.MULTILINE)
    assert sum(float(v) for v in by_label) == mentions
    assert metric(model_metrics, "fhir_ner_worker_task_seconds_count", task="tag_notes", outcome="success") == 1
    # The I/O pool read and wrote each note once.
    assert metric(io_metrics, "fhir_ner_worker_notes_total", outcome="done") == 6
    assert metric(io_metrics, "fhir_ner_worker_task_seconds_count", task="process_note", outcome="success") == 6
    assert metric(io_metrics, "fhir_ner_worker_task_seconds_count", task="write_note", outcome="success") == 6
    assert "fhir_ner_worker_batch_notes_count 0.0" in io_metrics  # no model in this pool
