"""The EHR side of recovery: origin checks, hints, filters, and what is refused (worker/recovery.py)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from ehr.harness import FhirTestServer
from receiver_helpers import document

from adapter.subscribe import SubscriptionRequest, build_subscription
from core.jobs import RecordingJobQueue
from core.origin import EhrBase, OutsideEhrError, parse_reference
from worker.recovery import (
    EhrReader,
    EhrRefusedError,
    EhrUnavailableError,
    Recovery,
    changed_documents,
    fetch_events,
    subscription_filters,
)

pytest_plugins = ["receiver_fixtures"]

BASE = "http://ehr.test/fhir"


def hostile_ehr(handler: Any) -> EhrReader:
    """An EHR that misbehaves, played by an httpx transport (the real test server behaves)."""
    return EhrReader(BASE, token="our-token", client=httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize(
    ("url", "inside"),
    [
        ("DocumentReference/1", True),
        (f"{BASE}/DocumentReference/1/_history/2", True),
        ("http://EHR.test:80/fhir/Binary/1", True),
        ("http://ehr.test/fhir-other/Binary/1", False),
        ("http://ehr.test/fhir/../admin", False),
        ("http://ehr.test/fhir/%2e%2e/admin", False),
        ("../admin", False),
        ("https://ehr.test/fhir/Binary/1", False),
        ("http://ehr.test:8080/fhir/Binary/1", False),
        ("http://user@ehr.test/fhir/Binary/1", False),
        ("//evil.example/fhir/Binary/1", False),
        ("file:///etc/passwd", False),
        ("javascript:alert(1)", False),
        ("http://evil.example/fhir/Binary/1", False),
    ],
)
def test_only_urls_under_the_ehr_base(url: str, inside: bool) -> None:
    assert EhrBase(BASE).contains(url) is inside


def test_references() -> None:
    ehr = EhrBase(BASE)
    assert parse_reference(f"{BASE}/DocumentReference/a/_history/2", ehr).versioned == "DocumentReference/a/_history/2"  # type: ignore[union-attr]
    assert parse_reference("DocumentReference/a") is not None
    assert parse_reference("urn:uuid:123") is None and parse_reference("#contained") is None
    assert parse_reference("DocumentReference/a b") is None
    with pytest.raises(OutsideEhrError):
        parse_reference("http://evil.example/fhir/DocumentReference/a", ehr)


def test_next_links_outside_the_ehr_are_not_followed() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        page = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": document("a")}],
            "link": [{"relation": "next", "url": "http://evil.example/fhir/DocumentReference?page=2"}],
        }
        return httpx.Response(200, json=page)

    reader = hostile_ehr(handler)
    found = []
    with pytest.raises(OutsideEhrError):
        for doc in changed_documents(reader, time.time()):
            found.append(doc["id"])
    assert found == ["a"] and len(seen) == 1 and seen[0].startswith(f"{BASE}/DocumentReference?_lastUpdated=ge")


def test_redirects_are_not_followed_and_errors_are_classified() -> None:
    answers = iter(
        [
            httpx.Response(302, headers={"Location": "http://evil.example/x"}),
            httpx.Response(503),
            httpx.Response(429),
            httpx.Response(403),
            httpx.Response(200, content=b"not json"),
        ]
    )
    reader = hostile_ehr(lambda request: next(answers))
    with pytest.raises(EhrRefusedError):
        reader.read_json("DocumentReference/a")
    for _ in range(2):
        with pytest.raises(EhrUnavailableError):
            reader.read_json("DocumentReference/a")
    with pytest.raises(EhrRefusedError):
        reader.read_json("DocumentReference/a")
    with pytest.raises(EhrRefusedError):
        reader.read_json("DocumentReference/a")


def test_unreachable_ehr_is_transient() -> None:
    reader = EhrReader("http://127.0.0.1:9/fhir", timeout=2)
    with pytest.raises(EhrUnavailableError):
        reader.read_json("DocumentReference/a")


def test_the_authorization_hint_is_used_then_our_own_credentials(
    receiver_env: dict[str, str], jobs: RecordingJobQueue
) -> None:
    from core.deps import get_intake, get_note_state

    tokens: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tokens.append(request.headers.get("authorization"))
        if request.headers.get("authorization") == "Bearer hint-token":
            return httpx.Response(401)
        return httpx.Response(200, json=document("b", version="7"))

    get_note_state().store_hint("b", "authorization_base", "hint-token")
    recovery = Recovery(get_intake(), hostile_ehr(handler))
    result = recovery.resolve_note("b", "Subscription/s1")
    assert tokens == ["Bearer hint-token", "Bearer our-token"]
    assert result["queued"] == [{"document": "b", "version": "7", "action": "process"}]
    assert jobs.of("process_note") == [("b", "7")]


def test_a_resolved_note_that_is_not_the_one_asked_for_is_refused(
    receiver_env: dict[str, str], jobs: RecordingJobQueue
) -> None:
    from core.deps import get_intake

    recovery = Recovery(get_intake(), hostile_ehr(lambda request: httpx.Response(200, json=document("other"))))
    with pytest.raises(EhrRefusedError):
        recovery.resolve_note("b")
    gone = Recovery(get_intake(), hostile_ehr(lambda request: httpx.Response(404)))
    assert gone.resolve_note("b")["status"] == "gone"
    assert jobs.jobs == []


def test_events_unsupported_and_filters_from_the_subscription(ehr: FhirTestServer) -> None:
    reader = EhrReader(ehr.base_url)
    subscription = build_subscription(
        SubscriptionRequest(
            endpoint="http://127.0.0.1:9/fhir/notify",
            token="t",
            filter_criteria="DocumentReference?status=current&category=clinical-note",
        )
    )
    created = httpx.post(f"{ehr.base_url}/Subscription", json=subscription, timeout=10).json()
    assert subscription_filters(reader, created["id"]) == [("status", "current"), ("category", "clinical-note")]
    assert subscription_filters(reader, "missing") == []
    ehr.configure_subscriptions(support_events=False)
    assert fetch_events(reader, created["id"], 1, 2) is None
    reader.close()


def test_filters_narrow_the_last_updated_search(ehr: FhirTestServer) -> None:
    reader = EhrReader(ehr.base_url)
    for status in ("current", "superseded"):
        resource = {**document(status), "status": status}
        resource.pop("id")
        resource.pop("meta")
        assert httpx.post(f"{ehr.base_url}/DocumentReference", json=resource, timeout=10).status_code == 201
    everything = list(changed_documents(reader, time.time() - 60))
    current = list(changed_documents(reader, time.time() - 60, [("status", "current")]))
    later = list(changed_documents(reader, time.time() + 60))
    assert len(everything) == 2 and [d["status"] for d in current] == ["current"] and later == []
    reader.close()
