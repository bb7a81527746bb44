"""The receiver against real Redis: authentication, bad input as OperationOutcomes, de-duplication."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

NOTE = "Paciente con fiebre y tos."
AUTH = {"Authorization": "Bearer test-token", "Content-Type": "application/fhir+json"}


def document(doc_id: str = "note-1", version: str = "1", **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "meta": {"versionId": version},
        "status": "current",
        "docStatus": "final",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(NOTE.encode()).decode()}}],
    }
    resource.update(changes)
    return resource


def backport(doc: dict[str, Any], event: int = 1) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {
                "resource": {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
                        {"name": "status", "valueCode": "active"},
                        {"name": "type", "valueCode": "event-notification"},
                        {"name": "events-since-subscription-start", "valueString": str(event)},
                    ],
                }
            },
            {"fullUrl": f"DocumentReference/{doc['id']}", "resource": doc},
        ],
    }


@pytest.fixture()
def client(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, list[Any]]]:
    """The API with the enqueue step recorded instead of sent (no worker in these tests)."""
    from adapter.app import create_app
    from adapter.routers import notify

    sent: list[Any] = []
    monkeypatch.setattr(notify, "enqueue_note", lambda doc_id, version: sent.append((doc_id, version)))
    with TestClient(create_app()) as test_client:
        yield test_client, sent


def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/fhir/notify", content=raw, headers=headers or AUTH)


def assert_outcome(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    diagnostics: str = body["issue"][0]["diagnostics"]
    assert NOTE not in response.text  # never echo note text
    return diagnostics


def test_notification_is_queued_once_and_redeliveries_are_ignored(client: tuple[TestClient, list[Any]]) -> None:
    api, sent = client
    assert post(api, backport(document())).status_code == 200
    assert post(api, backport(document())).status_code == 200
    assert sent == [("note-1", "1")]
    # A new version of the note is a new job.
    assert post(api, backport(document(version="2"), event=2)).status_code == 200
    assert sent == [("note-1", "1"), ("note-1", "2")]
    status = api.get("/documents/note-1", headers=AUTH).json()
    assert {v: r["status"] for v, r in status["versions"].items()} == {"1": "queued", "2": "queued"}


def test_second_rotation_token_is_accepted_and_a_wrong_one_refused(client: tuple[TestClient, list[Any]]) -> None:
    api, sent = client
    old = {**AUTH, "Authorization": "Bearer test-token-old"}
    assert post(api, backport(document()), old).status_code == 200
    assert "token" in assert_outcome(post(api, backport(document("n2")), {**AUTH, "Authorization": "Bearer x"}), 401)
    no_auth = {"Content-Type": "application/fhir+json"}
    assert_outcome(post(api, backport(document("n3")), no_auth), 401)
    assert sent == [("note-1", "1")]


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"resourceType": "Patient"}, 400, "expected a notification Bundle"),
        ({"resourceType": "Bundle", "type": "history", "entry": []}, 400, "no status entry"),
        ({"resourceType": "Bundle", "type": "searchset", "entry": []}, 400, "not a subscription notification"),
        ([1, 2, 3], 400, "JSON object"),
    ],
)
def test_bad_input_gets_an_operation_outcome_and_nothing_is_queued(
    client: tuple[TestClient, list[Any]], body: Any, status: int, phrase: str
) -> None:
    api, sent = client
    assert phrase in assert_outcome(post(api, body), status)
    assert sent == []


def test_unknown_notification_type_and_invalid_fhir_are_refused(client: tuple[TestClient, list[Any]]) -> None:
    api, sent = client
    bad_type = backport(document())
    bad_type["entry"][0]["resource"]["parameter"][2]["valueCode"] = "party"
    assert "unknown notification type" in assert_outcome(post(api, bad_type), 400)
    invalid = backport(document(status=42))
    assert "invalid Bundle" in assert_outcome(post(api, invalid), 400)
    assert sent == []


def test_invalid_base64_attachment_is_refused(client: tuple[TestClient, list[Any]]) -> None:
    api, sent = client
    doc = document()
    doc["content"][0]["attachment"]["data"] = "%%%not-base64%%%"
    assert_outcome(post(api, backport(doc)), 400)
    assert sent == []


def test_wrong_content_type_and_oversize_body(
    client: tuple[TestClient, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, sent = client
    assert_outcome(post(api, backport(document()), {**AUTH, "Content-Type": "text/plain"}), 415)
    from adapter.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_body_bytes", 100)
    assert_outcome(post(api, backport(document())), 413)
    assert sent == []


def test_notes_we_do_not_process_are_recorded_as_skipped(client: tuple[TestClient, list[Any]]) -> None:
    api, sent = client
    post(api, backport(document("draft", docStatus="preliminary")))
    pdf = document("pdf")
    pdf["content"][0]["attachment"]["contentType"] = "application/pdf"
    post(api, backport(pdf))
    assert sent == []
    draft = api.get("/documents/draft", headers=AUTH).json()["versions"]["1"]
    assert draft["status"] == "skipped" and "preliminary" in draft["reason"]
    assert "application/pdf" in api.get("/documents/pdf", headers=AUTH).json()["versions"]["1"]["reason"]


def test_broker_failure_answers_503_and_the_retry_is_accepted(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapter.app import create_app
    from adapter.routers import notify

    def broken(doc_id: str, version: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(notify, "enqueue_note", broken)
    with TestClient(create_app()) as api:
        assert post(api, backport(document())).status_code == 503
        sent: list[Any] = []
        monkeypatch.setattr(notify, "enqueue_note", lambda d, v: sent.append((d, v)))
        assert post(api, backport(document())).status_code == 200
    assert sent == [("note-1", "1")]


def test_health_and_readiness(client: tuple[TestClient, list[Any]]) -> None:
    api, _ = client
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json()["redis"] == "ok"
    assert api.get("/documents/unknown", headers=AUTH).status_code == 404
    assert api.get("/documents/unknown").status_code == 401


def test_a_note_over_the_length_limit_is_skipped_not_cut(
    client: tuple[TestClient, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, sent = client
    from adapter.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_note_chars", 10)
    assert post(api, backport(document("long"))).status_code == 200
    assert sent == []
    record = api.get("/documents/long", headers=AUTH).json()["versions"]["1"]
    assert record["status"] == "skipped" and "over the limit of 10" in record["reason"]
