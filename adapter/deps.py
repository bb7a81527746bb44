"""Process-wide dependencies (Redis client, note and subscription state, intake), built lazily from settings."""

from __future__ import annotations

from functools import lru_cache

import redis

from adapter.intake import Intake
from adapter.jobs import get_job_queue
from adapter.settings import get_settings
from adapter.state import NoteState
from adapter.subscriptions import SubscriptionState

_redis_override: redis.Redis | None = None


@lru_cache(maxsize=1)
def _redis_from_settings() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=5, socket_connect_timeout=2)


def state_redis_is_overridden() -> bool:
    """True while the state lives in a Redis given by :func:`use_redis_client` (the demo's in-process one)."""
    return _redis_override is not None


def get_redis() -> redis.Redis:
    return _redis_override if _redis_override is not None else _redis_from_settings()


def use_redis_client(client: redis.Redis | None) -> None:
    """Run on a given client (the demo's in-process Redis when no server answers)."""
    global _redis_override
    _redis_override = client
    _states.cache_clear()


@lru_cache(maxsize=1)
def _states() -> tuple[NoteState, SubscriptionState]:
    # Built once per process: each registers its Lua scripts on the client.
    client, prefix = get_redis(), get_settings().key_prefix
    return NoteState(client, prefix), SubscriptionState(client, prefix)


def get_note_state() -> NoteState:
    return _states()[0]


def get_subscription_state() -> SubscriptionState:
    return _states()[1]


def get_intake() -> Intake:
    notes, subscriptions = _states()
    return Intake(notes, subscriptions, get_job_queue(), get_settings())


def reset_dependencies() -> None:
    """Forget cached clients and settings (tests and the demo change the environment between runs)."""
    get_settings.cache_clear()
    _redis_from_settings.cache_clear()
    _states.cache_clear()
