"""Property-based tests: no input makes the parser crash or the receiver answer 5xx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import FIXTURES_DIR
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from receiver_helpers import AUTH, backport, document

from core.documents import markup_to_text
from core.jobs import RecordingJobQueue
from core.notifications import Notification, NotificationError, parse_notification

pytest_plugins = ["receiver_fixtures"]

EXAMPLES = sorted(
    p
    for p in (FIXTURES_DIR / "fhir-examples").glob("*/*.json")
    if json.loads(p.read_text()).get("resourceType") == "Bundle"
)
SEEDS: list[Any] = [json.loads(p.read_text()) for p in EXAMPLES] + [
    backport(document()),
    backport(None, [1, 2], focus=["DocumentReference/a/_history/2", None]),
    document(),
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(
        ["Bundle", "history", "subscription-notification", "message", "Parameters", "SubscriptionStatus",
         "DocumentReference", "event-notification", "handshake", "heartbeat", "query-event", "1", "-1",
         "99999999999999999999", "DocumentReference/x", "http://evil/DocumentReference/x", "urn:uuid:1"]
    ),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _paths(item, (*prefix, index))
    return paths


@st.composite
def mutated_notifications(draw: st.DrawFn) -> Any:
    """A real notification with a few values replaced, deleted or retyped."""
    body = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return body


def _parse(body: Any) -> Notification | None:
    try:
        return parse_notification(body)
    except NotificationError as error:
        assert str(error)  # a message for the OperationOutcome
        return None


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parser_never_crashes_on_arbitrary_json(body: Any) -> None:
    _parse(body)


@settings(max_examples=300, deadline=None)
@given(mutated_notifications())
def test_parser_never_crashes_on_mutated_notifications(body: Any) -> None:
    notification = _parse(body)
    if notification is not None:
        for event in notification.events:
            assert event.event_number is None or 0 <= event.event_number < 2**53


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(mutated_notifications(), json_values))
def test_receiver_never_answers_5xx(api: TestClient, jobs: RecordingJobQueue, body: Any) -> None:
    response = api.post("/fhir/notify", content=json.dumps(body), headers=AUTH)
    assert response.status_code < 500, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=300),
    content_type=st.sampled_from(["application/fhir+json", "application/json; fhirVersion=5.0", "text/plain", ""]),
    authorization=st.sampled_from(["Bearer test-token", "Bearer", "", "bearer test-token", "Bearer test-token "]),
)
def test_receiver_never_answers_5xx_on_raw_bytes(
    api: TestClient, jobs: RecordingJobQueue, raw: bytes, content_type: str, authorization: str
) -> None:
    headers = {"Content-Type": content_type, "Authorization": authorization}
    response = api.post("/fhir/notify", content=raw, headers=headers)
    assert 400 <= response.status_code < 500
    put = api.put("/fhir/notify/DocumentReference/x", content=raw, headers=headers)
    assert 400 <= put.status_code < 500


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/&;#x0123abcpdiv \n\"'=!-?[]éAMP")), max_size=200))
def test_markup_to_text_keeps_every_offset(markup: str) -> None:
    text = markup_to_text(markup)
    assert len(text) == len(markup)
    assert text.count("\n") >= markup.count("\n")


def test_markup_to_text_reads_like_text() -> None:
    markup = '<div xmlns="http://www.w3.org/1999/xhtml"><p>Fiebre &amp; tos</p><script>x()</script>disnea</div>'
    text = markup_to_text(markup)
    assert len(text) == len(markup)
    assert text.split() == ["Fiebre", "&", "tos", "disnea"]
    start = markup.index("tos")
    assert text[start : start + 3] == "tos"  # offsets point at the same characters in the attachment


def test_examples_are_seeds() -> None:
    assert len(EXAMPLES) >= 40 and all(isinstance(p, Path) for p in EXAMPLES)
