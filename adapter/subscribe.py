"""``fhir-ner subscribe``: create the Subscription on the EHR that makes it notify us about notes.

* ``r4`` and ``r4b``: a Subscription with the Subscriptions Backport profile: ``criteria`` is the topic
  canonical, the channel carries the backport extensions (heartbeat period, timeout, max count, payload
  content) and the ``Authorization`` header in ``channel.header`` (R4B core keeps the R4 Subscription shape);
* ``r5``: a topic-based R5 Subscription, with the header in ``parameter``.

The default topic is IHE DSUBm's "DocumentReference, all events, any patient" topic; the US Core
patient-data-feed topic or any DocumentReference topic the EHR offers can be named instead. After the
EHR accepts it, the EHR sends a handshake to the endpoint; :func:`wait_for_status` follows the
Subscription until it leaves ``requested``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlsplit

import httpx

FhirVersionName = Literal["r4", "r4b", "r5"]
PayloadContent = Literal["full-resource", "id-only", "empty"]

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
DSUBM_ALL_EVENTS_TOPIC = (
    "https://profiles.ihe.net/ITI/DSUBm/SubscriptionTopic/DSUBm-SubscriptionTopic-DocReference-MultiPatient-AllEvents"
)
US_CORE_PATIENT_DATA_FEED_TOPIC = "http://hl7.org/fhir/us/core/SubscriptionTopic/patient-data-feed"
DEFAULT_TOPIC = DSUBM_ALL_EVENTS_TOPIC
MIME_VERSION = {"r4": "4.0", "r4b": "4.3", "r5": "5.0"}
REASON = "Clinical NLP: derive coded Conditions, Observations and Procedures from new and amended notes"


class SubscribeError(RuntimeError):
    """The Subscription could not be created; the message is one line for the command line."""


@dataclass(frozen=True)
class SubscriptionRequest:
    endpoint: str
    token: str
    fhir_version: FhirVersionName = "r4"
    payload: PayloadContent = "id-only"
    heartbeat_seconds: int = 300
    topic: str = DEFAULT_TOPIC
    filter_criteria: str | None = None  # e.g. "DocumentReference?category=clinical-note"
    timeout_seconds: int = 60
    max_count: int = 20


def _check(request: SubscriptionRequest) -> None:
    parts = urlsplit(request.endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SubscribeError(f"--endpoint must be an absolute http(s) URL, not {request.endpoint!r}")
    if not request.token or any(ch in request.token for ch in "\r\n"):
        raise SubscribeError("--token must be a non-empty single-line token")
    if request.heartbeat_seconds < 0:
        raise SubscribeError("--heartbeat must be zero or more seconds")
    if request.filter_criteria is not None and not request.filter_criteria.startswith("DocumentReference?"):
        raise SubscribeError("--filter must look like DocumentReference?param=value")


def build_subscription(request: SubscriptionRequest) -> dict[str, Any]:
    """The Subscription resource for the EHR, in the shape of the FHIR version asked for."""
    _check(request)
    if request.fhir_version == "r5":
        subscription: dict[str, Any] = {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": REASON,
            "topic": request.topic,
            "channelType": {
                "system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type",
                "code": "rest-hook",
            },
            "endpoint": request.endpoint,
            "parameter": [{"name": "Authorization", "value": f"Bearer {request.token}"}],
            "timeout": request.timeout_seconds,
            "maxCount": request.max_count,
            "contentType": "application/fhir+json",
            "content": request.payload,
        }
        if request.heartbeat_seconds:
            subscription["heartbeatPeriod"] = request.heartbeat_seconds
        if request.filter_criteria:
            subscription["filterBy"] = [
                {"resourceType": "DocumentReference", "filterParameter": name, "value": value}
                for name, value in _query_pairs(request.filter_criteria)
            ]
        return subscription
    channel_extensions: list[dict[str, Any]] = []
    if request.heartbeat_seconds:
        channel_extensions.append(
            {"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": request.heartbeat_seconds}
        )
    channel_extensions += [
        {"url": f"{BACKPORT}/backport-timeout", "valueUnsignedInt": request.timeout_seconds},
        {"url": f"{BACKPORT}/backport-max-count", "valuePositiveInt": request.max_count},
    ]
    subscription = {
        "resourceType": "Subscription",
        "meta": {"profile": [f"{BACKPORT}/backport-subscription"]},
        "status": "requested",
        "reason": REASON,
        "criteria": request.topic,
        "channel": {
            "extension": channel_extensions,
            "type": "rest-hook",
            "endpoint": request.endpoint,
            "payload": "application/fhir+json",
            "_payload": {
                "extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": request.payload}]
            },
            "header": [f"Authorization: Bearer {request.token}"],
        },
    }
    if request.filter_criteria:
        subscription["_criteria"] = {
            "extension": [{"url": f"{BACKPORT}/backport-filter-criteria", "valueString": request.filter_criteria}]
        }
    return subscription


def _query_pairs(criteria: str) -> list[tuple[str, str]]:
    return parse_qsl(criteria.partition("?")[2])


def _headers(fhir_version: FhirVersionName, ehr_token: str | None) -> dict[str, str]:
    media = f"application/fhir+json; fhirVersion={MIME_VERSION[fhir_version]}"
    headers = {"Content-Type": media, "Accept": media}
    if ehr_token:
        headers["Authorization"] = f"Bearer {ehr_token}"
    return headers


def create_subscription(
    ehr_base_url: str,
    subscription: dict[str, Any],
    fhir_version: FhirVersionName,
    client: httpx.Client,
    ehr_token: str | None = None,
) -> dict[str, Any]:
    """POST the Subscription to the EHR; returns what the EHR stored (with its id)."""
    url = ehr_base_url.rstrip("/") + "/Subscription"
    try:
        response = client.post(url, json=subscription, headers=_headers(fhir_version, ehr_token))
    except httpx.HTTPError as error:
        raise SubscribeError(f"could not reach the EHR at {ehr_base_url} ({type(error).__name__})") from None
    if response.status_code >= 300:
        raise SubscribeError(f"the EHR refused the Subscription: HTTP {response.status_code} {_diagnostics(response)}")
    try:
        created = response.json()
    except ValueError:
        created = {}
    if not isinstance(created, dict) or not created.get("id"):
        location = response.headers.get("location", "")
        resource_id = location.split("/Subscription/", 1)[-1].split("/")[0] if "/Subscription/" in location else ""
        if not resource_id:
            raise SubscribeError("the EHR accepted the Subscription but did not say its id")
        created = {**subscription, "id": resource_id}
    return created


def _diagnostics(response: httpx.Response) -> str:
    try:
        body = response.json()
        issue = (body.get("issue") or [{}])[0]
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
    except (ValueError, AttributeError, IndexError, TypeError):
        text = ""
    return str(text)[:300]


def wait_for_status(
    ehr_base_url: str,
    subscription_id: str,
    fhir_version: FhirVersionName,
    client: httpx.Client,
    wait_seconds: float,
    ehr_token: str | None = None,
) -> str:
    """Follow the Subscription until its status leaves ``requested`` (the handshake) or time runs out."""
    url = f"{ehr_base_url.rstrip('/')}/Subscription/{subscription_id}"
    deadline = time.monotonic() + wait_seconds
    status = "requested"
    while True:
        try:
            response = client.get(url, headers=_headers(fhir_version, ehr_token))
            if response.status_code == 200:
                status = str(response.json().get("status") or status)
        except (httpx.HTTPError, ValueError):
            pass
        if status != "requested" or time.monotonic() >= deadline:
            return status
        time.sleep(0.25)


def run_subscribe(
    ehr_url: str,
    endpoint: str,
    token: str,
    fhir_version: str,
    payload: str,
    heartbeat: int,
    topic: str | None,
    filter_criteria: str | None,
    wait: float,
    warn: Callable[[str], None] = print,
) -> str:
    """The ``subscribe`` verb: build, create, remember the heartbeat period, follow the handshake."""
    import redis

    from core.deps import get_subscription_state
    from core.origin import EhrBase
    from core.settings import get_settings

    settings = get_settings()
    version = cast(FhirVersionName, fhir_version)
    request = SubscriptionRequest(
        endpoint=endpoint,
        token=token,
        fhir_version=version,
        payload=cast(PayloadContent, payload),
        heartbeat_seconds=heartbeat,
        topic=topic or DEFAULT_TOPIC,
        filter_criteria=filter_criteria,
    )
    subscription = build_subscription(request)
    accepted = settings.accepted_tokens()
    if accepted and token not in accepted:
        warn("warning: --token is not one of FHIR_NER_SUBSCRIPTION_TOKENS, so this API will refuse the handshake")
    # Our EHR credentials go only to the configured EHR, never to another --ehr.
    ehr_token = None
    if settings.ehr_bearer_token is not None and EhrBase(settings.ehr_base_url).contains(ehr_url):
        ehr_token = settings.ehr_bearer_token.get_secret_value()
    with httpx.Client(timeout=settings.ehr_timeout_seconds) as client:
        created = create_subscription(ehr_url, subscription, version, client, ehr_token)
        subscription_id = str(created["id"])
        try:
            get_subscription_state().set_heartbeat(f"Subscription/{subscription_id}", heartbeat)
        except redis.RedisError:
            warn("warning: Redis unreachable: heartbeat period not recorded (FHIR_NER_HEARTBEAT_SECONDS applies)")
        status = str(created.get("status") or "requested")
        if wait > 0 and status == "requested":
            status = wait_for_status(ehr_url, subscription_id, version, client, wait, ehr_token)
    if status == "error":
        raise SubscribeError(
            f"Subscription/{subscription_id} was created but its handshake failed (status error): "
            "check that --endpoint reaches this API and that --token is accepted"
        )
    return (
        f"Subscription/{subscription_id} on {ehr_url}: {status} "
        f"({fhir_version}, {payload}, heartbeat {heartbeat} s, topic {request.topic})"
    )
