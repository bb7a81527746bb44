"""The receiver on a real port, notified by the real test FHIR server: subscribe, handshake, events, lost events.

No worker runs here: jobs are recorded. The recovery a worker would run (``worker.recovery``) is called
directly, against the same test FHIR server.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from ehr.harness import FhirTestServer
from receiver_helpers import NOTE, LiveApi

from adapter.cli import main
from core.jobs import RecordingJobQueue

pytest_plugins = ["receiver_fixtures"]

pytestmark = pytest.mark.timeout(120)


def note(ehr: FhirTestServer, text: str = NOTE, **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "docStatus": "final",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
        **changes,
    }
    response = httpx.post(f"{ehr.base_url}/DocumentReference", json=resource, timeout=10)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def subscribe(ehr: FhirTestServer, api: LiveApi, payload: str, token: str = "test-token") -> str:
    result = CliRunner().invoke(
        main,
        [
            "subscribe",
            "--ehr",
            ehr.base_url,
            "--endpoint",
            f"{api.url}/fhir/notify",
            "--token",
            token,
            "--payload",
            payload,
            "--heartbeat",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    assert ": active" in result.output, result.output
    return result.output.split()[0]  # Subscription/{id}


def point_at(ehr: FhirTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.deps import reset_dependencies

    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", ehr.base_url)
    reset_dependencies()


def test_subscribe_handshake_then_full_resource_events(
    ehr: FhirTestServer, live_api: LiveApi, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(ehr, monkeypatch)
    subscription = subscribe(ehr, live_api, "full-resource")
    first, second = note(ehr), note(ehr)
    ehr.settle_notifications()
    assert sorted(jobs.of("process_note")) == sorted([(first["id"], "1"), (second["id"], "1")])
    headers = {"Authorization": "Bearer test-token"}
    state = httpx.get(f"{live_api.url}/subscriptions", headers=headers).json()["subscriptions"][subscription]
    assert state["count_handshake"] == 1 and state["watermark"] == 2 and state["heartbeat_period"] == 60
    # The EHR redelivers everything (at least once): nothing new is queued.
    ehr.send_notification(subscription.split("/")[1], "heartbeat")
    ehr.settle_notifications()
    assert len(jobs.of("process_note")) == 2
    status = httpx.get(f"{live_api.url}/documents/{first['id']}", headers=headers).json()
    assert status["versions"]["1"]["status"] == "queued"


def test_a_wrong_token_makes_the_handshake_fail(ehr: FhirTestServer, live_api: LiveApi) -> None:
    result = CliRunner().invoke(
        main,
        ["subscribe", "--ehr", ehr.base_url, "--endpoint", f"{live_api.url}/fhir/notify", "--token", "nope"],
    )
    assert result.exit_code == 1
    assert "handshake failed" in result.output and "not one of FHIR_NER_SUBSCRIPTION_TOKENS" in result.output


def test_id_only_events_are_resolved_from_the_ehr(
    ehr: FhirTestServer, live_api: LiveApi, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(ehr, monkeypatch)
    subscribe(ehr, live_api, "id-only")
    created = note(ehr)
    ehr.settle_notifications()
    assert jobs.of("resolve_note")[0][0] == created["id"]
    # What the worker does for resolve_note: read the note from the EHR and hand it to the intake.
    from worker.recovery import run_resolve_note

    result = run_resolve_note(created["id"], jobs.of("resolve_note")[0][1])  # type: ignore[arg-type]
    assert result["queued"] == [{"document": created["id"], "version": "1", "action": "process"}]
    assert jobs.of("process_note") == [(created["id"], "1")]
    # Resolving again (a retried task) queues nothing new.
    run_resolve_note(created["id"], None)
    assert jobs.of("process_note") == [(created["id"], "1")]


def test_a_lost_notification_is_a_gap_recovered_through_events(
    ehr: FhirTestServer, live_api: LiveApi, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(ehr, monkeypatch)
    monkeypatch.setenv("FHIR_NER_GAP_GRACE_SECONDS", "0")
    from adapter.watch import check_subscriptions
    from core.deps import get_subscription_state, reset_dependencies
    from core.settings import get_settings
    from worker.recovery import run_recover_events

    reset_dependencies()
    subscription = subscribe(ehr, live_api, "full-resource")
    first = note(ehr)
    ehr.drop_next_notifications(1)
    lost = note(ehr)
    third = note(ehr)
    ehr.settle_notifications()
    assert sorted(jobs.of("process_note")) == sorted([(first["id"], "1"), (third["id"], "1")])

    plans = check_subscriptions(get_subscription_state(), jobs, get_settings())
    assert [(p.subscription, p.from_event, p.to_event, p.reason) for p in plans] == [(subscription, 2, 2, "gap")]
    assert check_subscriptions(get_subscription_state(), jobs, get_settings()) == []  # one recovery at a time
    ehr.clear_requests_log()
    report = run_recover_events(*jobs.of("recover_events")[0])  # type: ignore[arg-type]
    assert report["method"] == ["$events"] and report["events_recovered"] == 1 and report["gap_closed"]
    assert (lost["id"], "1") in jobs.of("process_note") and len(jobs.of("process_note")) == 3
    assert any("$events" in r["url"] for r in ehr.requests_log())
    state = get_subscription_state().get(subscription)
    assert state["watermark"] == 3 and state["gaps_detected"] == 1 and state["gaps_recovered"] == 1
    metrics = httpx.get(f"{live_api.url}/metrics").text
    assert "fhir_ner_gaps_detected_total 1.0" in metrics and "fhir_ner_gaps_recovered_total 1.0" in metrics


def test_without_events_operation_recovery_falls_back_to_last_updated(
    ehr: FhirTestServer, live_api: LiveApi, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(ehr, monkeypatch)
    from worker.recovery import run_recover_events

    subscription = subscribe(ehr, live_api, "full-resource")
    ehr.configure_subscriptions(support_events=False)
    ehr.drop_next_notifications(2)
    lost = [note(ehr), note(ehr)]
    ehr.settle_notifications()
    assert jobs.of("process_note") == []
    ehr.clear_requests_log()
    report = run_recover_events(subscription, 1, 2, time.time() - 5)
    assert report["method"] == ["$events", "_lastUpdated"]
    assert sorted(jobs.of("process_note")) == sorted((d["id"], "1") for d in lost)
    urls = [r["url"] for r in ehr.requests_log()]
    assert any("_lastUpdated=ge" in u for u in urls)
    # Running it again (a retried task) finds the same notes and queues nothing new.
    run_recover_events(subscription, 1, 2, time.time() - 5)
    assert len(jobs.of("process_note")) == 2


def test_empty_payloads_are_fetched_by_the_recovery(
    ehr: FhirTestServer, live_api: LiveApi, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(ehr, monkeypatch)
    from worker.recovery import run_recover_events

    subscribe(ehr, live_api, "empty")
    created = note(ehr)
    ehr.settle_notifications()
    assert jobs.of("process_note") == []
    [job] = jobs.of("recover_events")
    assert job[1:3] == (1, 1)
    report = run_recover_events(*job)  # type: ignore[arg-type]
    assert report["method"] == ["$events"]  # asked for full-resource content, the server gave it
    assert jobs.of("process_note") == [(created["id"], "1")]


def test_silence_beyond_the_heartbeat_period_asks_status_then_events(
    ehr: FhirTestServer, live_api: LiveApi, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_at(ehr, monkeypatch)
    from adapter.watch import check_subscriptions
    from core.deps import get_subscription_state
    from core.settings import get_settings
    from worker.recovery import run_recover_events

    subscription = subscribe(ehr, live_api, "full-resource")
    ehr.drop_next_notifications(1)
    lost = note(ehr)
    ehr.settle_notifications()
    state = get_subscription_state()
    assert check_subscriptions(state, jobs, get_settings()) == []  # not silent yet
    plans = check_subscriptions(state, jobs, get_settings(), now=time.time() + 3600)
    assert [(p.reason, p.from_event, p.to_event) for p in plans] == [("silence", 1, None)]
    report = run_recover_events(*jobs.of("recover_events")[0])  # type: ignore[arg-type]
    assert report["method"] == ["$status", "$events"] and report["to_event"] == 1
    assert jobs.of("process_note") == [(lost["id"], "1")]
    assert state.get(subscription)["watermark"] == 1
