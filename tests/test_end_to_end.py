"""The whole path once, with real parts: notification → API → Redis → Celery worker → tagger → EHR."""

from __future__ import annotations

import base64
import copy
import json
import time
from typing import Any

import httpx
import pytest
from conftest import FIXTURES_DIR, WorkerProcess
from ehr.harness import FhirTestServer
from fastapi.testclient import TestClient
from tiny_models import SAMPLE_NOTES

BACKPORT_EXAMPLE = (
    FIXTURES_DIR / "fhir-examples/hl7-subscriptions-backport-ig-sushi/Bundle-r4-notification-full-resource.json"
)
DERIVATION = "http://hl7.org/fhir/StructureDefinition/derivation-reference"
AUTH = {"Authorization": "Bearer test-token", "Content-Type": "application/fhir+json"}


def backport_notification(document: dict[str, Any], event_number: int = 2) -> dict[str, Any]:
    """The HL7 backport IG's full-resource example, re-pointed at our DocumentReference.

    Senders call this from threads (tests/faults.py), so it never skips: a missing example is an error."""
    bundle = json.loads(BACKPORT_EXAMPLE.read_text())
    status = copy.deepcopy(bundle["entry"][0])
    for parameter in status["resource"]["parameter"]:
        if parameter["name"] == "events-since-subscription-start":
            parameter["valueString"] = str(event_number)
        if parameter["name"] == "notification-event":
            for part in parameter["part"]:
                if part["name"] == "event-number":
                    part["valueString"] = str(event_number)
                if part["name"] == "focus":
                    part["valueReference"] = {"reference": f"DocumentReference/{document['id']}"}
    bundle["entry"] = [
        status,
        {
            "fullUrl": f"http://ehr.example/fhir/DocumentReference/{document['id']}",
            "resource": document,
            "request": {"method": "POST", "url": "DocumentReference"},
            "response": {"status": "201"},
        },
    ]
    return bundle


def create(ehr: FhirTestServer, resource: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{ehr.base_url}/{resource['resourceType']}", json=resource, timeout=10)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def search(ehr: FhirTestServer, query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{ehr.base_url}/{query}", timeout=10)
    assert response.status_code == 200, response.text
    return [entry["resource"] for entry in response.json().get("entry", [])]


def wait_for_status(client: TestClient, document_id: str, wanted: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/documents/{document_id}", headers=AUTH)
        if response.status_code == 200:
            last = response.json()
            statuses = {v["status"] for v in last["versions"].values()}
            if wanted in statuses or "failed" in statuses:
                return last
        time.sleep(0.25)
    raise AssertionError(f"document {document_id} never reached {wanted}: {last}")


@pytest.mark.timeout(300)
def test_backport_notification_becomes_resources_in_the_ehr(
    ehr: FhirTestServer, app_env: dict[str, str], worker_process: WorkerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", ehr.base_url)
    worker_process.env["FHIR_NER_EHR_BASE_URL"] = ehr.base_url
    from adapter.app import create_app
    from core.deps import reset_dependencies

    reset_dependencies()
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba", "given": ["Ana"]}]})
    note = SAMPLE_NOTES[0]
    document = create(
        ehr,
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "docStatus": "final",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "date": "2026-11-20T09:30:00Z",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "language": "es",
                        "data": base64.b64encode(note.encode()).decode(),
                    }
                }
            ],
        },
    )
    version = document["meta"]["versionId"]
    worker_process.env.pop("OMP_WAIT_POLICY", None)
    worker_process.start()
    # PyTorch's OpenMP threads sleep between operations (FHIR_NER_THREAD_WAIT's default) instead of spinning.
    assert "OpenMP threads wait: passive" in worker_process.log_path.read_text()

    with TestClient(create_app()) as client:
        started = time.perf_counter()
        response = client.post("/fhir/notify", content=json.dumps(backport_notification(document)), headers=AUTH)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        assert elapsed < 2.0  # answered without doing NLP or EHR calls in the request

        status = wait_for_status(client, document["id"], "done")
        record = status["versions"][version]
        assert record["status"] == "done", record
        assert record["mentions"] == 4

        subject = f"Patient/{patient['id']}"
        conditions = search(ehr, f"Condition?subject={subject}")
        observations = search(ehr, f"Observation?subject={subject}")
        procedures = search(ehr, f"Procedure?subject={subject}")
        assert sorted(c["code"]["text"] for c in conditions) == ["neumonía"]
        assert sorted(o["code"]["text"] for o in observations) == ["fiebre", "tos"]
        assert sorted(p["code"]["text"] for p in procedures) == ["radiografía de tórax"]
        for resource in conditions + observations + procedures:
            derivation = next(e for e in resource["extension"] if e["url"] == DERIVATION)
            parts = {p["url"]: p for p in derivation["extension"]}
            assert parts["reference"]["valueReference"]["reference"] == (
                f"DocumentReference/{document['id']}/_history/{version}"
            )
            offset, length = parts["offset"]["valueInteger"], parts["length"]["valueInteger"]
            assert note[offset : offset + length] == resource["code"]["text"]
        provenances = search(ehr, f"Provenance?entity=DocumentReference/{document['id']}/_history/{version}")
        assert len(provenances) == 1
        assert len(provenances[0]["target"]) == 4

        # A redelivery of the same notification creates no second job and no second set of resources.
        replay = client.post("/fhir/notify", content=json.dumps(backport_notification(document)), headers=AUTH)
        assert replay.status_code == 200
        assert "0 queued" in replay.json()["issue"][0]["diagnostics"]
        time.sleep(1.0)
        assert len(search(ehr, f"Condition?subject={subject}")) == 1
        assert len(search(ehr, f"Observation?subject={subject}")) == 2
