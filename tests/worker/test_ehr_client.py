"""The EHR client against the test FHIR server: retries, Retry-After, the circuit breaker, origin checks."""

from __future__ import annotations

import ssl
import time

import httpx
import pytest
import redis
from ehr.harness import FhirTestServer

from worker.ehr import EhrClient, EhrError
from worker.resilience import CircuitBreaker, RetryPolicy


def client_for(ehr: FhirTestServer, redis_url: str, key_prefix: str, attempts: int = 3) -> EhrClient:
    breaker = CircuitBreaker(redis.Redis.from_url(redis_url), f"{key_prefix}:breaker", threshold=3, cooldown=30)
    return EhrClient(ehr.base_url, retry=RetryPolicy(attempts=attempts, base_delay=0.05), breaker=breaker)


def test_503_twice_then_200_succeeds(ehr: FhirTestServer, redis_url: str, key_prefix: str) -> None:
    patient = httpx.post(f"{ehr.base_url}/Patient", json={"resourceType": "Patient"}, timeout=10).json()
    ehr.clear_requests_log()
    ehr.fail_next(2, 503)
    client = client_for(ehr, redis_url, key_prefix)
    assert client.read(f"Patient/{patient['id']}")["id"] == patient["id"]
    assert [r["status"] for r in ehr.requests_log()] == [503, 503, 200]
    assert not client.breaker.is_open  # type: ignore[union-attr]


def test_retry_after_is_honoured(ehr: FhirTestServer, redis_url: str, key_prefix: str) -> None:
    ehr.fail_next(1, 429, retry_after=1)
    client = client_for(ehr, redis_url, key_prefix)
    started = time.monotonic()
    client.read("Patient?_count=1")
    assert time.monotonic() - started >= 0.9


def test_a_dead_ehr_opens_the_breaker_and_later_calls_do_not_reach_it(
    ehr: FhirTestServer, redis_url: str, key_prefix: str
) -> None:
    ehr.fail_next(10, 503)
    client = client_for(ehr, redis_url, key_prefix)
    with pytest.raises(EhrError, match="HTTP 503") as error:
        client.read("Patient?_count=1")
    assert error.value.transient
    seen = len(ehr.requests_log())
    with pytest.raises(EhrError, match="circuit open") as error:
        client.read("Patient?_count=1")
    assert error.value.transient
    assert len(ehr.requests_log()) == seen  # paused, not burning retries against the EHR


def test_client_errors_are_not_retried_and_other_hosts_are_refused(
    ehr: FhirTestServer, redis_url: str, key_prefix: str
) -> None:
    ehr.clear_requests_log()
    ehr.fail_next(1, 400)
    client = client_for(ehr, redis_url, key_prefix)
    with pytest.raises(EhrError, match="HTTP 400") as error:
        client.read("Patient?_count=1")
    assert not error.value.transient
    assert len(ehr.requests_log()) == 1
    with pytest.raises(EhrError, match="outside the configured EHR base URL"):
        client.read("http://elsewhere.example/fhir/Patient/1")


def test_every_ehr_client_of_a_process_shares_one_tls_context() -> None:
    # httpx reads the CA bundle for each client it builds (~18 ms of CPU): the worker builds one client a note.
    from worker.ehr_auth import shared_tls_context
    from worker.recovery import EhrReader

    clients = [EhrClient("https://ehr.example/fhir"), EhrClient("http://other.example/fhir")]
    reader = EhrReader("https://ehr.example/fhir")
    try:
        contexts = {id(c._client._transport._pool._ssl_context) for c in clients}  # type: ignore[attr-defined]
        contexts.add(id(reader._client._transport._pool._ssl_context))  # type: ignore[attr-defined]
        assert contexts == {id(shared_tls_context())}
        assert shared_tls_context().verify_mode == ssl.CERT_REQUIRED and shared_tls_context().check_hostname
    finally:
        for client in clients:
            client.close()
        reader.close()
