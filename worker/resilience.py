"""Retries with exponential backoff and jitter, and a circuit breaker shared by all workers via Redis.

The breaker pauses write-back while the EHR is down: instead of every task burning its retries against
a dead server, tasks see the open breaker and are rescheduled for when it half-opens.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import redis


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.5

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based); ``Retry-After`` wins when given."""
        hinted = parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, self.max_delay)
        backoff = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return backoff * (1 - self.jitter + self.jitter * random.random())  # noqa: S311 - jitter, not crypto


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class CircuitOpenError(RuntimeError):
    """The EHR is considered down; ``retry_in`` says when to try again."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"EHR circuit open; retry in {retry_in:.0f} s")
        self.retry_in = retry_in


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures, for ``cooldown`` seconds; state lives in Redis."""

    def __init__(self, client: redis.Redis, key: str, threshold: int = 5, cooldown: float = 30.0) -> None:
        self.client = client
        self.key = key
        self.threshold = threshold
        self.cooldown = cooldown

    def check(self) -> None:
        """Raise CircuitOpenError while open; after the cooldown one caller may probe (half-open)."""
        ttl = self.client.pttl(f"{self.key}:open")
        if ttl and ttl > 0:
            raise CircuitOpenError(ttl / 1000)

    def record_success(self) -> None:
        self.client.delete(f"{self.key}:failures", f"{self.key}:open")

    def record_failure(self) -> None:
        failures = int(self.client.incr(f"{self.key}:failures"))
        self.client.expire(f"{self.key}:failures", int(self.cooldown * 10))
        if failures >= self.threshold:
            self.client.set(f"{self.key}:open", "1", px=int(self.cooldown * 1000))
            self.client.delete(f"{self.key}:failures")

    @property
    def is_open(self) -> bool:
        ttl = self.client.pttl(f"{self.key}:open")
        return bool(ttl and ttl > 0)
