"""Tests for the in-memory FHIR R4 test server (tests/ehr/server.mjs) and its Python harness."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from ehr.harness import FhirTestServer

FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
ID_SYSTEM = "urn:fhir-ner-adapter:test"


@pytest.fixture(scope="module")
def server() -> Iterator[FhirTestServer]:
    with FhirTestServer() as srv:
        yield srv


@pytest.fixture
def client(server: FhirTestServer) -> Iterator[httpx.Client]:
    server.reset()
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=10) as c:
        yield c


@pytest.fixture
def patient(client: httpx.Client) -> dict[str, Any]:
    resp = client.post(
        "/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-12345"}],
            "name": [{"family": "Chalmers", "given": ["Peter"]}],
            "gender": "male",
            "birthDate": "1974-12-25",
        },
    )
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


def _search(client: httpx.Client, path: str, **params: str) -> dict[str, Any]:
    resp = client.get(path, params=params)
    assert resp.status_code == 200, resp.text
    bundle: dict[str, Any] = resp.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    return bundle


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _clinical_bundle(patient_ref: str, suffix: str = "1") -> dict[str, Any]:
    """A transaction like the adapter writes: Condition + Observation + Procedure, conditional creates."""
    entries = []
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "Condition",
            "identifier": [{"system": ID_SYSTEM, "value": f"cond-{suffix}"}],
            "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
            "verificationStatus": _cc(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
            ),
            "category": [
                _cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")
            ],
            "code": _cc("http://snomed.info/sct", "44054006", "Diabetes mellitus type 2"),
            "subject": {"reference": patient_ref},
        },
        {
            "resourceType": "Observation",
            "identifier": [{"system": ID_SYSTEM, "value": f"obs-{suffix}"}],
            "status": "final",
            "code": _cc("http://loinc.org", "4548-4", "Hemoglobin A1c"),
            "subject": {"reference": patient_ref},
            "valueQuantity": {"value": 7.2, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        },
        {
            "resourceType": "Procedure",
            "identifier": [{"system": ID_SYSTEM, "value": f"proc-{suffix}"}],
            "status": "completed",
            "code": _cc("http://snomed.info/sct", "80146002", "Appendectomy"),
            "subject": {"reference": patient_ref},
        },
    ]
    for res in resources:
        ident = res["identifier"][0]
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": res,
                "request": {
                    "method": "POST",
                    "url": res["resourceType"],
                    "ifNoneExist": f"identifier={ident['system']}|{ident['value']}",
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# --------------------------------------------------------------------------------------------------


def test_harness_basics(server: FhirTestServer) -> None:
    assert server.running
    assert server.base_url == f"http://127.0.0.1:{server.port}/fhir/R4"
    assert server.startup_seconds is not None and server.startup_seconds < 60
    resp = httpx.get(f"{server.base_url}/metadata")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith(FHIR_JSON)
    assert resp.json()["fhirVersion"] == "4.0.1"


def test_create_read_vread_update_patient(client: httpx.Client, patient: dict[str, Any]) -> None:
    pid = patient["id"]
    assert patient["meta"]["versionId"] == "1"

    resp = client.get(f"/Patient/{pid}")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith(FHIR_JSON)
    assert resp.headers["etag"] == 'W/"1"'
    assert resp.json()["name"][0]["family"] == "Chalmers"

    updated = {**resp.json(), "active": True}
    resp = client.put(f"/Patient/{pid}", json=updated)
    assert resp.status_code == 200, resp.text
    assert resp.json()["meta"]["versionId"] == "2"

    assert client.get(f"/Patient/{pid}/_history/1").json().get("active") is None
    history = client.get(f"/Patient/{pid}/_history").json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]

    found = _search(client, "/Patient", identifier="urn:oid:1.2.36.146.595.217.0.1|MRN-12345")
    assert found["total"] == 1
    assert found["entry"][0]["fullUrl"].endswith(f"/Patient/{pid}")

    assert client.get("/Patient/does-not-exist").status_code == 404


def test_create_accepts_plain_json_and_sets_location(server: FhirTestServer) -> None:
    resp = httpx.post(
        f"{server.base_url}/Device",
        json={
            "resourceType": "Device",
            "identifier": [{"system": ID_SYSTEM, "value": "ner-model-v1"}],
            "deviceName": [{"name": "clinical NER", "type": "model-name"}],
        },
    )  # httpx sends Content-Type: application/json
    assert resp.status_code == 201, resp.text
    device = resp.json()
    assert resp.headers["location"] == f"{server.base_url}/Device/{device['id']}/_history/1"
    found = httpx.get(f"{server.base_url}/Device", params={"identifier": f"{ID_SYSTEM}|ner-model-v1"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [device["id"]]


@pytest.mark.parametrize(
    ("mutate", "expected_expr"),
    [
        (lambda c: c.update(clinicalStatus="active"), "Condition.clinicalStatus"),
        (lambda c: c.update(severityLevel="high"), "Condition.severityLevel"),
        (lambda c: c.pop("subject"), "Condition.subject"),
        (lambda c: c.update(onsetDateTime="yesterday"), "Condition.onset[x]"),
    ],
    ids=["string-for-CodeableConcept", "unknown-property", "missing-required", "bad-dateTime"],
)
def test_invalid_condition_is_refused(
    client: httpx.Client, patient: dict[str, Any], mutate: Any, expected_expr: str
) -> None:
    condition = {
        "resourceType": "Condition",
        "code": {"text": "diabetes"},
        "subject": {"reference": f"Patient/{patient['id']}"},
    }
    mutate(condition)
    resp = client.post("/Condition", json=condition)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith(FHIR_JSON)
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"], outcome
    assert all(i["severity"] == "error" for i in outcome["issue"])
    assert any(expected_expr in i.get("expression", []) for i in outcome["issue"]), outcome
    assert _search(client, "/Condition")["total"] == 0

    # the same refusal applies to updates
    resp = client.put("/Condition/abc", json={**condition, "id": "abc"})
    assert resp.status_code == 400


def test_valid_us_core_condition_with_extensions_is_accepted(
    client: httpx.Client, patient: dict[str, Any]
) -> None:
    condition = {
        "resourceType": "Condition",
        "meta": {
            "profile": [
                "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition-problems-health-concerns"
            ]
        },
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/condition-assertedDate",
                "valueDateTime": "2024-03-01",
            },
            {
                "url": "http://example.org/fhir/StructureDefinition/nlp-confidence",
                "valueDecimal": 0.93,
            },
        ],
        "identifier": [{"system": ID_SYSTEM, "value": "us-core-1"}],
        "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
        "verificationStatus": _cc(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", "unconfirmed"
        ),
        "category": [
            _cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item"),
            _cc("http://hl7.org/fhir/us/core/CodeSystem/us-core-category", "health-concern"),
        ],
        "code": {
            "coding": [
                {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes type 2"}
            ],
            "text": "type 2 diabetes",
        },
        "subject": {"reference": f"Patient/{patient['id']}"},
        "recordedDate": "2024-03-01T10:00:00Z",
        "note": [{"text": "extracted by NLP"}],
    }
    resp = client.post("/Condition", json=condition)
    assert resp.status_code == 201, resp.text
    assert resp.json()["extension"] == condition["extension"]


def test_transaction_with_conditional_create_is_idempotent(
    client: httpx.Client, patient: dict[str, Any]
) -> None:
    patient_ref = f"Patient/{patient['id']}"
    bundle = _clinical_bundle(patient_ref)

    resp = client.post("", json=copy.deepcopy(bundle))
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["type"] == "transaction-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201", "201", "201"]
    created = {e["resource"]["resourceType"]: e["resource"]["id"] for e in result["entry"]}
    assert set(created) == {"Condition", "Observation", "Procedure"}
    for entry in result["entry"]:
        res = entry["resource"]
        assert entry["response"]["location"].startswith(f"{res['resourceType']}/{res['id']}")

    # Replaying the identical transaction matches the existing resources and creates nothing.
    resp = client.post("", json=copy.deepcopy(bundle))
    assert resp.status_code == 200, resp.text
    replay = resp.json()
    assert [e["response"]["status"] for e in replay["entry"]] == ["200", "200", "200"]
    assert {e["resource"]["resourceType"]: e["resource"]["id"] for e in replay["entry"]} == created

    for rtype, rid in created.items():
        by_subject = _search(client, f"/{rtype}", subject=patient_ref)
        assert by_subject["total"] == 1
        assert by_subject["entry"][0]["resource"]["id"] == rid
        assert _search(client, f"/{rtype}")["total"] == 1
    suffix_ids = {"Condition": "cond-1", "Observation": "obs-1", "Procedure": "proc-1"}
    for rtype, value in suffix_ids.items():
        assert _search(client, f"/{rtype}", identifier=f"{ID_SYSTEM}|{value}")["total"] == 1
        assert _search(client, f"/{rtype}", identifier=f"{ID_SYSTEM}|nope")["total"] == 0
    assert _search(client, "/Condition", subject="Patient/someone-else")["total"] == 0


def test_transaction_resolves_urn_uuid_references(client: httpx.Client, patient: dict[str, Any]) -> None:
    doc_url = f"urn:uuid:{uuid.uuid4()}"
    cond_url = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": cond_url,
                "resource": {
                    "resourceType": "Condition",
                    "code": {"text": "asthma"},
                    "subject": {"reference": f"Patient/{patient['id']}"},
                    "evidence": [{"detail": [{"reference": doc_url}]}],
                },
                "request": {"method": "POST", "url": "Condition"},
            },
            {
                "fullUrl": doc_url,
                "resource": {
                    "resourceType": "DocumentReference",
                    "status": "current",
                    "subject": {"reference": f"Patient/{patient['id']}"},
                    "content": [
                        {"attachment": {"contentType": "text/plain", "data": "UGF0aWVudCBoYXMgYXN0aG1hLg=="}}
                    ],
                },
                "request": {"method": "POST", "url": "DocumentReference"},
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Provenance",
                    "target": [{"reference": cond_url}],
                    "recorded": "2024-03-01T10:00:00Z",
                    "agent": [{"who": {"display": "fhir-ner-adapter"}}],
                    "entity": [{"role": "source", "what": {"reference": doc_url}}],
                },
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }
    resp = client.post("", json=bundle)
    assert resp.status_code == 200, resp.text
    ids = {e["resource"]["resourceType"]: e["resource"]["id"] for e in resp.json()["entry"]}

    condition = client.get(f"/Condition/{ids['Condition']}").json()
    assert (
        condition["evidence"][0]["detail"][0]["reference"] == f"DocumentReference/{ids['DocumentReference']}"
    )
    prov = _search(client, "/Provenance", target=f"Condition/{ids['Condition']}")
    assert prov["total"] == 1
    assert prov["entry"][0]["resource"]["entity"][0]["what"]["reference"] == (
        f"DocumentReference/{ids['DocumentReference']}"
    )


def test_invalid_transaction_entry_writes_nothing(client: httpx.Client, patient: dict[str, Any]) -> None:
    bundle = _clinical_bundle(f"Patient/{patient['id']}")
    bundle["entry"][1]["resource"]["status"] = {"text": "final"}  # code given as an object
    resp = client.post("", json=bundle)
    assert resp.status_code == 400, resp.text
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert any(i.get("expression", [""])[0].startswith("Bundle.entry[1].resource") for i in outcome["issue"])
    for rtype in ("Condition", "Observation", "Procedure"):
        assert _search(client, f"/{rtype}")["total"] == 0


def test_batch_entries_are_validated_individually(client: httpx.Client, patient: dict[str, Any]) -> None:
    bundle = _clinical_bundle(f"Patient/{patient['id']}")
    bundle["type"] = "batch"
    bundle["entry"][0]["resource"]["clinicalStatus"] = "active"
    resp = client.post("", json=bundle)
    assert resp.status_code == 200, resp.text
    statuses = [e["response"]["status"] for e in resp.json()["entry"]]
    assert statuses == ["400", "201", "201"]
    assert _search(client, "/Condition")["total"] == 0
    assert _search(client, "/Observation")["total"] == 1


def test_last_updated_search(client: httpx.Client, patient: dict[str, Any]) -> None:
    def make_doc(text: str) -> str:
        resp = client.post(
            "/DocumentReference",
            json={
                "resourceType": "DocumentReference",
                "status": "current",
                "subject": {"reference": f"Patient/{patient['id']}"},
                "content": [{"attachment": {"contentType": "text/plain", "title": text}}],
            },
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    old = make_doc("old note")
    time.sleep(0.01)
    cutoff = datetime.now(UTC).isoformat(timespec="milliseconds")
    time.sleep(0.01)
    new = make_doc("new note")

    since = _search(client, "/DocumentReference", _lastUpdated=f"gt{cutoff}")
    assert [e["resource"]["id"] for e in since.get("entry", [])] == [new]
    before = _search(client, "/DocumentReference", _lastUpdated=f"lt{cutoff}")
    assert [e["resource"]["id"] for e in before.get("entry", [])] == [old]


def test_fail_next_injects_errors_then_recovers(server: FhirTestServer, client: httpx.Client) -> None:
    server.fail_next(2, 503, retry_after=1)
    for _ in range(2):
        resp = client.get("/Patient")
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.headers["content-type"].startswith(FHIR_JSON)
        assert resp.json()["resourceType"] == "OperationOutcome"
    resp = client.get("/Patient")
    assert resp.status_code == 200

    log = server.requests_log()
    assert [(r["method"], r["path"], r["status"]) for r in log] == [
        ("GET", "/fhir/R4/Patient", s) for s in (503, 503, 200)
    ]
    assert [r["injected"] for r in log] == [True, True, False]

    server.fail_next(1, 429)
    resp = client.post("/Patient", json={"resourceType": "Patient"})
    assert resp.status_code == 429
    assert "retry-after" not in resp.headers
    assert _search(client, "/Patient")["total"] == 0  # the injected failure wrote nothing


def test_reset_clears_everything(
    server: FhirTestServer, client: httpx.Client, patient: dict[str, Any]
) -> None:
    server.fail_next(5, 500)
    server.reset()
    assert server.requests_log() == []
    assert client.get(f"/Patient/{patient['id']}").status_code == 404
    assert _search(client, "/Patient")["total"] == 0
    assert len(server.requests_log()) == 2
