"""Every notification Bundle in tests/fixtures/fhir-examples (backport R4 and R4B, R4B and R5 core) is accepted with
the right effect; then the same Bundles re-pointed at DocumentReferences queue, fetch or recover the notes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_DIR
from fastapi.testclient import TestClient
from receiver_helpers import AUTH, EHR_BASE, document, post

from core.jobs import RecordingJobQueue

pytest_plugins = ["receiver_fixtures"]

EXAMPLES_DIR = FIXTURES_DIR / "fhir-examples"


def _is_notification(path: Path) -> bool:
    body = json.loads(path.read_text())
    kinds = ("history", "subscription-notification", "message")
    return body.get("resourceType") == "Bundle" and body.get("type") in kinds


EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*/*.json") if _is_notification(p))


def _id(path: Path) -> str:
    return (
        f"{path.parent.name.split('.')[-2] if path.parent.name.startswith('hl7.fhir') else 'backport'}/{path.name[:60]}"
    )


def notification_of(bundle: dict[str, Any]) -> dict[str, Any]:
    if bundle["type"] == "message":
        return next(e["resource"] for e in bundle["entry"][1:] if e["resource"]["resourceType"] == "Bundle")
    return bundle


def _value(parameter: dict[str, Any]) -> Any:
    return next((v for k, v in parameter.items() if k.startswith("value")), None)


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """(type, status, events as (number, focus)) of a notification, read independently of adapter code."""
    resource = notification_of(bundle)["entry"][0]["resource"]
    if resource["resourceType"] == "Parameters":
        params = resource["parameter"]
        value = {p["name"]: _value(p) for p in params if "part" not in p}
        events = []
        for p in params:
            if p["name"] == "notification-event":
                parts = {x["name"]: _value(x) for x in p["part"]}
                events.append((int(parts["event-number"]), (parts.get("focus") or {}).get("reference")))
        return {"type": value["type"], "status": value["status"], "events": events, "error": "error" in value}
    events = [
        (int(e["eventNumber"]), (e.get("focus") or {}).get("reference")) for e in resource.get("notificationEvent", [])
    ]
    return {
        "type": resource["type"],
        "status": resource["status"],
        "events": events,
        "error": bool(resource.get("error")),
    }


def subscription_record(api: TestClient) -> dict[str, Any]:
    subscriptions = api.get("/subscriptions", headers=AUTH).json()["subscriptions"]
    assert len(subscriptions) == 1, subscriptions
    record: dict[str, Any] = next(iter(subscriptions.values()))
    return record


def test_the_examples_are_there() -> None:
    assert len(EXAMPLES) == 43  # 22 backport (R4, R4B), 10 R4B, 11 R5: tests/fixtures/README.md


@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_every_example_notification_is_accepted(api: TestClient, jobs: RecordingJobQueue, path: Path) -> None:
    bundle = json.loads(path.read_text())
    expected = status_of(bundle)
    response = post(api, bundle)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["issue"][0]["diagnostics"].startswith(f"{expected['type']}: 0 queued")
    record = subscription_record(api)
    assert record[f"count_{expected['type']}"] == 1  # handshake, heartbeat, ... recorded
    assert record["status"] == expected["status"]
    if expected["status"] == "error" or expected["error"]:
        assert "subscription error" in response.text  # surfaced in the answer...
        assert record["error_count"] == 1 and record["last_error"]  # ...and in GET /subscriptions
    if expected["type"] not in ("event-notification", "query-event"):
        assert jobs.jobs == []
        return
    # These examples are about Encounters: recorded as "not a note", nothing queued. Events that name no
    # focus (empty payloads) are recovered by a worker.
    focused = [n for n, focus in expected["events"] if focus]
    unfocused = [n for n, focus in expected["events"] if not focus]
    assert jobs.of("process_note") == [] and jobs.of("resolve_note") == []
    if focused:
        assert f"{len(focused)} not a note" in answer["issue"][0]["diagnostics"]
    if unfocused:
        assert [job[1:3] for job in jobs.of("recover_events")] == [(min(unfocused), max(unfocused))]
    else:
        assert jobs.of("recover_events") == []
    # Delivered twice: no second effect.
    assert post(api, bundle).status_code == 200
    assert len(jobs.jobs) == len(unfocused and [1])


_ENCOUNTER = re.compile(r"^(?:https?://[^\s\"]*/)?Encounter/([A-Za-z0-9\-.]+)$")


def as_notes(value: Any) -> Any:
    """The example with every Encounter turned into one of our notes on the configured EHR."""
    if isinstance(value, dict):
        if value.get("resourceType") == "Encounter":
            return document(value["id"], version="1")
        return {key: as_notes(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_notes(item) for item in value]
    if isinstance(value, str):
        match = _ENCOUNTER.match(value)
        if match:
            return f"{EHR_BASE}/DocumentReference/{match.group(1)}"
        if value == "Encounter":
            return "DocumentReference"
    return value


EVENT_EXAMPLES = [
    p for p in EXAMPLES if status_of(json.loads(p.read_text()))["type"] in ("event-notification", "query-event")
]


@pytest.mark.parametrize("path", EVENT_EXAMPLES, ids=_id)
def test_every_event_example_about_notes_queues_fetches_or_recovers_them(
    api: TestClient, jobs: RecordingJobQueue, path: Path
) -> None:
    bundle = as_notes(json.loads(path.read_text()))
    expected = status_of(bundle)
    notification = notification_of(bundle)
    in_bundle = {
        e["resource"]["id"]
        for e in notification["entry"][1:]
        if e.get("resource", {}).get("resourceType") == "DocumentReference"
    }
    response = post(api, copy.deepcopy(bundle))
    assert response.status_code == 200, response.text
    focused = [focus.rsplit("/", 1)[1] for _, focus in expected["events"] if focus]
    assert sorted(job[0] for job in jobs.of("process_note")) == sorted(in_bundle)  # full-resource: queued
    assert sorted(job[0] for job in jobs.of("resolve_note")) == sorted(set(focused) - in_bundle)  # id-only: fetched
    assert len(jobs.of("recover_events")) == (1 if any(not f for _, f in expected["events"]) else 0)  # empty
    before = list(jobs.jobs)
    assert post(api, bundle).status_code == 200  # replayed
    assert jobs.jobs == before
