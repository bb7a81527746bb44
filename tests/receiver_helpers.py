"""Helpers for the receiver tests: notes, notifications, posting, and the API on a real port."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import uvicorn
from fastapi.testclient import TestClient

NOTE = "Paciente con fiebre y tos."
EHR_BASE = "http://ehr.test/fhir"
AUTH = {"Authorization": "Bearer test-token", "Content-Type": "application/fhir+json"}


def document(doc_id: str = "note-1", version: str | None = "1", text: str = NOTE, **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "status": "current",
        "docStatus": "final",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
    }
    if version is not None:
        resource["meta"] = {"versionId": version}
    resource.update(changes)
    return resource


def backport(
    docs: list[dict[str, Any]] | dict[str, Any] | None = None,
    event: int | list[int] = 1,
    *,
    subscription: str = "Subscription/s1",
    notification_type: str = "event-notification",
    focus: list[str | None] | None = None,
    since: int | None = None,
) -> dict[str, Any]:
    """An R4 backport notification (history + Parameters) with full resources, or focus-only events."""
    doc_list = [docs] if isinstance(docs, dict) else list(docs or [])
    numbers = [event] if isinstance(event, int) else list(event)
    if focus is None:
        focus = [f"{EHR_BASE}/DocumentReference/{d.get('id')}" for d in doc_list] or [None] * len(numbers)
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription}},
        {"name": "topic", "valueCanonical": "http://example.org/topic/notes"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": notification_type},
        {"name": "events-since-subscription-start", "valueString": str(since if since is not None else max(numbers))},
    ]
    if notification_type in ("event-notification", "query-event"):
        for number, reference in zip(numbers, focus, strict=False):
            parts: list[dict[str, Any]] = [
                {"name": "event-number", "valueString": str(number)},
                {"name": "timestamp", "valueInstant": "2026-11-20T09:30:00Z"},
            ]
            if reference:
                parts.append({"name": "focus", "valueReference": {"reference": reference}})
            parameters.append({"name": "notification-event", "part": parts})
    entries: list[dict[str, Any]] = [{"resource": {"resourceType": "Parameters", "parameter": parameters}}]
    for doc in doc_list:
        entries.append({"fullUrl": f"{EHR_BASE}/DocumentReference/{doc.get('id')}", "resource": doc})
    if not doc_list:
        for reference in focus:
            if reference:
                entries.append({"fullUrl": reference})
    return {"resourceType": "Bundle", "type": "history", "entry": entries}


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


class LiveApi:
    """The API on a real loopback port (uvicorn in a thread), so that a real EHR can call it."""

    def __init__(self) -> None:
        from adapter.app import create_app

        config = uvicorn.Config(create_app(), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-api", daemon=True)

    def start(self) -> LiveApi:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
