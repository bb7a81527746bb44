"""Process-wide dependencies (note and subscription state, intake), built lazily from settings."""

from __future__ import annotations

from functools import lru_cache

import redis

from core.intake import Intake
from core.jobs import get_job_queue
from core.redis_client import forget_redis_client, get_redis, set_redis_override
from core.review import ReviewStore
from core.settings import get_settings
from core.state import NoteState
from core.subscriptions import SubscriptionState

__all__ = [
    "get_intake",
    "get_note_state",
    "get_redis",
    "get_subscription_state",
    "reset_dependencies",
    "use_redis_client",
]


def use_redis_client(client: redis.Redis | None) -> None:
    """Run on a given client (the demo's in-process Redis when no server answers)."""
    set_redis_override(client)
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


def get_review_store() -> ReviewStore:
    """The review pages' store (sessions, records, actions, feedback) on the deployment's Redis and key prefix."""
    return ReviewStore(get_redis(), get_settings().key_prefix)


def reset_dependencies() -> None:
    """Forget cached clients and settings (tests and the demo change the environment between runs)."""
    get_settings.cache_clear()
    forget_redis_client()
    _states.cache_clear()
