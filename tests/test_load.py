"""Load: 500 notifications through the API while the workers are restarted (one killed outright) mid-run.
Every note is processed and the EHR holds exactly the resources expected, none twice."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import WorkerProcess
from ehr.harness import FhirTestServer
from fastapi.testclient import TestClient
from faults import DERIVED_TYPES, all_of, derived_by_document, duplicate_identifiers, note_document, notify, wait_until
from test_end_to_end import create
from test_faults import FAST_REDELIVERY, NAMESPACE
from tiny_models import SAMPLE_NOTES

pytestmark = [pytest.mark.load, pytest.mark.timeout(900)]

NOTES = 500


def expected_resources(tiny_tagger_path: Path) -> dict[str, int]:
    """Derived resources each sample note should produce, computed in this process with the same model."""
    from mappings.bundle import plan_transaction
    from mappings.context import context_from_document_reference
    from mappings.profile import load_profile
    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
    from worker.tasks import tag_note

    pipeline = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path))
    counts = {}
    for text in SAMPLE_NOTES:
        mentions, model = tag_note(text, pipeline, language="es")
        document = {"resourceType": "DocumentReference", "id": "d", "subject": {"reference": "Patient/p"}}
        plan = plan_transaction(
            context_from_document_reference(document),
            mentions,
            load_profile(),
            model,
            NAMESPACE,
            "2026-11-25T00:00:00Z",
        )
        counts[text] = sum(1 for e in plan.bundle["entry"] if e["resource"]["resourceType"] in DERIVED_TYPES)
    return counts


def test_500_notifications_with_worker_restarts_are_each_processed_once(
    app_env: dict[str, str],
    ehr: FhirTestServer,
    tiny_tagger_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapter.app import create_app
    from core.deps import get_note_state, reset_dependencies

    expected_by_text = expected_resources(tiny_tagger_path)
    env = {**app_env, "FHIR_NER_EHR_BASE_URL": ehr.base_url, "FHIR_NER_TERMINOLOGY": "off", **FAST_REDELIVERY}
    env["FHIR_NER_MODEL_PATH"] = str(tiny_tagger_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_dependencies()
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Carga"}]})
    texts = [SAMPLE_NOTES[i % len(SAMPLE_NOTES)] for i in range(NOTES)]
    documents = [note_document(ehr, patient["id"], text) for text in texts]

    workers: list[WorkerProcess] = []

    def start(queues: str, name: str) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"{name}.log", queues=queues).start()
        workers.append(worker)
        return worker

    io_worker = start("io", "io-1")
    model_worker = start("inference", "inference-1")
    accepted: list[str] = []
    try:
        with TestClient(create_app()) as client:

            def send_all() -> None:
                for number, document in enumerate(documents, start=1):
                    assert notify(client, document, number) == 200
                    accepted.append(document["id"])

            sender = threading.Thread(target=send_all)
            sender.start()
            state = get_note_state()

            def finished() -> int:
                return sum(
                    1 for d in list(accepted) if state.get_status(d).get("1", {}).get("status") in ("done", "skipped")
                )

            def unfinished() -> str:
                """What the notes still open are doing, and what the workers logged, for a failure message."""
                records = {d: state.get_status(d).get("1", {}) for d in list(accepted)}
                open_records = {d: r for d, r in records.items() if r.get("status") not in ("done", "skipped")}
                by_status = Counter(r.get("status", "none") for r in records.values())
                logs = "\n".join(
                    f"--- {w.log_path.name}\n"
                    + "\n".join(
                        line
                        for line in w.log_path.read_text(errors="replace").splitlines()
                        if "ERROR" in line or "WARNING" in line or "Traceback" in line
                    )[-3000:]
                    for w in workers
                )
                sample = dict(list(open_records.items())[:5])
                return f"{len(accepted)} accepted, statuses {dict(by_status)}; open: {sample}\n{logs}"

            wait_until(lambda: finished() >= 100, 300, 0.2, unfinished)
            model_worker.kill()  # kill -9 in the middle of the run
            model_worker = start("inference", "inference-2")
            wait_until(lambda: finished() >= 250, 300, 0.2, unfinished)
            io_worker.stop()  # a warm restart of the I/O worker
            io_worker = start("io", "io-2")
            sender.join(timeout=300)
            assert not sender.is_alive() and len(accepted) == NOTES
            wait_until(lambda: finished() == NOTES, 400, 0.5, unfinished)
            records = {d: state.get_status(d)["1"] for d in accepted}
    finally:
        for worker in workers:
            worker.stop()
    assert {r["status"] for r in records.values()} == {"done"}
    held = derived_by_document(ehr, NAMESPACE)
    for document, text in zip(documents, texts, strict=True):
        counts = held.get(document["id"])
        assert counts is not None, f"nothing in the EHR from note {document['id']}"
        assert sum(counts[t] for t in DERIVED_TYPES) == expected_by_text[text], (document["id"], counts)
        assert counts["Provenance"] == 1
    assert duplicate_identifiers(ehr, NAMESPACE) == []
    assert len(all_of(ehr, "Device")) == 1
