"""Event accounting: replays and out-of-order deliveries queue each note once; gaps, silences, restarts."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from receiver_helpers import AUTH, backport, document, post

from core.jobs import RecordingJobQueue
from core.notifications import parse_notification

pytest_plugins = ["receiver_fixtures"]


def state(api: TestClient, subscription: str = "Subscription/s1") -> dict[str, Any]:
    record: dict[str, Any] = api.get("/subscriptions", headers=AUTH).json()["subscriptions"][subscription]
    return record


def check(now: float | None = None) -> list[Any]:
    from adapter.watch import check_subscriptions
    from core.deps import get_subscription_state
    from core.jobs import get_job_queue
    from core.settings import get_settings

    return check_subscriptions(get_subscription_state(), get_job_queue(), get_settings(), now)


def test_replays_and_out_of_order_deliveries_queue_each_note_once(api: TestClient, jobs: RecordingJobQueue) -> None:
    notifications = [backport(document(f"n{i}"), event=i) for i in range(1, 21)]
    deliveries = notifications * 3  # at least once: everything three times...
    random.Random(5).shuffle(deliveries)  # ...in any order
    for bundle in deliveries:
        assert post(api, bundle).status_code == 200
    assert sorted(jobs.of("process_note")) == sorted((f"n{i}", "1") for i in range(1, 21))
    record = state(api)
    assert record["watermark"] == 20 and record["max_event"] == 20 and "gap_since" not in record
    assert check() == []


def test_id_only_replays_and_out_of_order(api: TestClient, jobs: RecordingJobQueue) -> None:
    deliveries = [backport(None, i, focus=[f"DocumentReference/d{i}"]) for i in (3, 1, 2, 3, 1, 2)]
    for bundle in deliveries:
        post(api, bundle)
    assert sorted(jobs.of("resolve_note")) == [(f"d{i}", "Subscription/s1") for i in (1, 2, 3)]


def test_concurrent_duplicate_deliveries_create_one_job(receiver_env: dict[str, str], jobs: RecordingJobQueue) -> None:
    from core.deps import get_intake

    raw = json.dumps(backport([document(f"c{i}") for i in range(5)], event=[1, 2, 3, 4, 5]))

    def deliver(_: int) -> None:
        get_intake().accept(parse_notification(json.loads(raw)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(deliver, range(16)))
    assert sorted(jobs.of("process_note")) == [(f"c{i}", "1") for i in range(5)]


def test_a_gap_within_the_grace_period_is_just_out_of_order(
    api: TestClient, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "gap_grace_seconds", 30.0)
    post(api, backport(document("a"), event=1))
    post(api, backport(document("c"), event=3))
    record = state(api)
    assert record["watermark"] == 1 and record["max_event"] == 3 and record["pending_events"] == [3]
    assert check() == []  # still within the grace period
    plans = check(now=time.time() + 31)
    assert [(p.from_event, p.to_event, p.reason) for p in plans] == [(2, 2, "gap")]
    assert jobs.of("recover_events")[0][:3] == ("Subscription/s1", 2, 2)
    assert state(api)["gaps_detected"] == 1
    # The late event arrives after all: the gap closes and nothing more is asked.
    post(api, backport(document("b"), event=2))
    assert state(api)["watermark"] == 3 and "gap_since" not in state(api)


def test_a_heartbeat_announcing_more_events_than_seen_is_a_gap(
    api: TestClient, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "gap_grace_seconds", 0.0)
    post(api, backport(document("a"), event=1))
    post(api, backport(None, 1, notification_type="heartbeat", since=4))
    [plan] = check()
    assert (plan.from_event, plan.to_event) == (2, 4)
    assert plan.since is not None  # the time of event 1, for the _lastUpdated fallback


def test_silence_after_the_heartbeat_period(api: TestClient, jobs: RecordingJobQueue) -> None:
    from core.deps import get_subscription_state

    post(api, backport(None, 0, notification_type="handshake", since=0))
    assert check(now=time.time() + 10_000) == []  # no heartbeat period known: not watched
    get_subscription_state().set_heartbeat("Subscription/s1", 60)
    assert check(now=time.time() + 30) == []
    [plan] = check(now=time.time() + 120)
    assert (plan.reason, plan.from_event, plan.to_event) == ("silence", 1, None)
    assert state(api)["silences_detected"] == 1
    # A heartbeat arrives: not silent any more.
    from core.deps import get_redis

    get_redis().delete(f"{get_subscription_state().prefix}:sub:Subscription/s1:recovering")
    post(api, backport(None, 0, notification_type="heartbeat", since=0))
    assert check(now=time.time() + 30) == []


def test_default_heartbeat_setting_applies_to_unknown_subscriptions(
    api: TestClient, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "heartbeat_seconds", 60)
    post(api, backport(None, 0, notification_type="heartbeat", since=0, subscription="Subscription/other"))
    [plan] = check(now=time.time() + 120)
    assert plan.subscription == "Subscription/other" and plan.reason == "silence"


def test_counters_survive_a_restart(receiver_env: dict[str, str], jobs: RecordingJobQueue) -> None:
    from adapter.app import create_app
    from core.deps import reset_dependencies

    with TestClient(create_app()) as first:
        post(first, backport(document("a"), event=1))
        post(first, backport(document("c"), event=3))
    reset_dependencies()  # a new process: nothing cached
    with TestClient(create_app()) as second:
        post(second, backport(document("a"), event=1))  # replayed after the restart
        post(second, backport(document("b"), event=2))
        record = state(second)
    assert record["watermark"] == 3
    assert sorted(jobs.of("process_note")) == [("a", "1"), ("b", "1"), ("c", "1")]


def test_a_handshake_restarting_the_numbering_is_not_taken_for_replays(
    api: TestClient, jobs: RecordingJobQueue
) -> None:
    for number in (1, 2):
        post(api, backport(None, number, focus=[None]))
    assert len(jobs.of("recover_events")) == 2
    # The EHR recreated the subscription under the same id: numbering starts again.
    post(api, backport(None, 0, notification_type="handshake", since=0))
    post(api, backport(None, 1, focus=[None]))
    assert len(jobs.of("recover_events")) == 3
    assert state(api)["watermark"] == 1


def test_reused_event_number_with_another_focus_is_processed(api: TestClient, jobs: RecordingJobQueue) -> None:
    post(api, backport(None, 1, focus=["DocumentReference/x"]))
    post(api, backport(None, 1, focus=["DocumentReference/y"]))
    assert [j[0] for j in jobs.of("resolve_note")] == ["x", "y"]


def test_subscription_references_are_normalised(api: TestClient, jobs: RecordingJobQueue) -> None:
    post(api, backport(document("a"), 1, subscription="http://ehr.test/fhir/Subscription/s1"))
    post(api, backport(document("b"), 2, subscription="Subscription/s1/_history/3"))
    subscriptions = api.get("/subscriptions", headers=AUTH).json()["subscriptions"]
    assert list(subscriptions) == ["Subscription/s1"] and subscriptions["Subscription/s1"]["watermark"] == 2


def test_recovery_of_a_range_moves_the_watermark(api: TestClient, jobs: RecordingJobQueue) -> None:
    from core.deps import get_subscription_state

    post(api, backport(document("a"), event=1))
    post(api, backport(document("e"), event=5))
    subscriptions = get_subscription_state()
    assert subscriptions.mark_recovered("Subscription/s1", 4, events_recovered=3, covered_until=time.time())
    record = state(api)
    assert record["watermark"] == 5 and record["recoveries"] == 1 and record["events_recovered"] == 3
    assert subscriptions.totals()["gaps_recovered"] == 1
