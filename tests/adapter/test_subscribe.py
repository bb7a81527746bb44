"""The Subscription resources `fhir-ner subscribe` creates, validated with fhir.resources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES_DIR

from adapter.subscribe import (
    DSUBM_ALL_EVENTS_TOPIC,
    US_CORE_PATIENT_DATA_FEED_TOPIC,
    SubscribeError,
    SubscriptionRequest,
    build_subscription,
)

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"


def request(**changes: object) -> SubscriptionRequest:
    values: dict[str, object] = {"endpoint": "https://nlp.example/fhir/notify", "token": "secret-token"}
    values.update(changes)
    return SubscriptionRequest(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["r4", "r4b"])
@pytest.mark.parametrize("payload", ["full-resource", "id-only", "empty"])
def test_r4_and_r4b_use_the_backport_profile(version: str, payload: str) -> None:
    from fhir.resources.R4B.subscription import Subscription

    resource = build_subscription(request(fhir_version=version, payload=payload, heartbeat_seconds=120))
    Subscription.model_validate(resource)
    assert resource["meta"]["profile"] == [f"{BACKPORT}/backport-subscription"]
    assert resource["criteria"] == DSUBM_ALL_EVENTS_TOPIC and resource["status"] == "requested"
    channel = resource["channel"]
    assert channel["header"] == ["Authorization: Bearer secret-token"]
    assert channel["_payload"]["extension"][0] == {"url": f"{BACKPORT}/backport-payload-content", "valueCode": payload}
    extensions = {e["url"].rsplit("/", 1)[1]: e for e in channel["extension"]}
    assert extensions["backport-heartbeat-period"]["valueUnsignedInt"] == 120


def test_r5_puts_the_header_in_parameter() -> None:
    from fhir.resources.subscription import Subscription

    resource = build_subscription(
        request(
            fhir_version="r5",
            payload="full-resource",
            topic=US_CORE_PATIENT_DATA_FEED_TOPIC,
            filter_criteria="DocumentReference?category=clinical-note",
        )
    )
    Subscription.model_validate(resource)
    assert resource["topic"] == US_CORE_PATIENT_DATA_FEED_TOPIC and resource["content"] == "full-resource"
    assert resource["parameter"] == [{"name": "Authorization", "value": "Bearer secret-token"}]
    assert resource["filterBy"] == [
        {"resourceType": "DocumentReference", "filterParameter": "category", "value": "clinical-note"}
    ]


def test_the_default_topic_is_a_dsubm_document_reference_topic() -> None:
    folder = FIXTURES_DIR / "fhir-examples/ihe-iti-dsubm"
    topics = {json.loads(Path(p).read_text())["url"]: json.loads(Path(p).read_text()) for p in folder.glob("*.json")}
    topic = topics[DSUBM_ALL_EVENTS_TOPIC]
    assert all(t["resource"].endswith("DocumentReference") for t in topic["resourceTrigger"])


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"endpoint": "nlp.example/notify"}, "absolute http(s) URL"),
        ({"token": "a\nb"}, "single-line"),
        ({"token": ""}, "single-line"),
        ({"filter_criteria": "Patient?x=1"}, "DocumentReference?"),
    ],
)
def test_bad_requests(changes: dict[str, object], phrase: str) -> None:
    with pytest.raises(SubscribeError, match=phrase.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        build_subscription(request(**changes))
