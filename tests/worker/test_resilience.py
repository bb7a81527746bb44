"""Backoff, Retry-After and the Redis-backed circuit breaker."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
import redis

from worker.resilience import CircuitBreaker, CircuitOpenError, RetryPolicy, parse_retry_after


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, jitter=0.5)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 10.0)):
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_retry_after_wins_in_seconds_or_as_a_date() -> None:
    policy = RetryPolicy(max_delay=30.0)
    assert policy.delay(1, "7") == 7.0
    assert policy.delay(1, "3600") == 30.0
    in_five = formatdate(time.time() + 5, usegmt=True)
    assert 3.0 <= (parse_retry_after(in_five) or 0) <= 5.0
    assert parse_retry_after("soon") is None


def test_breaker_opens_after_consecutive_failures_and_closes_on_success(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    breaker = CircuitBreaker(client, f"{key_prefix}:breaker", threshold=3, cooldown=0.5)
    breaker.check()
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success resets the count
    breaker.record_failure()
    breaker.record_failure()
    breaker.check()
    breaker.record_failure()
    assert breaker.is_open
    with pytest.raises(CircuitOpenError) as error:
        breaker.check()
    assert 0 < error.value.retry_in <= 0.5
    # Another worker process sees the same state.
    assert CircuitBreaker(redis.Redis.from_url(redis_url), f"{key_prefix}:breaker").is_open
    time.sleep(0.6)
    breaker.check()  # half-open: a probe may go through
