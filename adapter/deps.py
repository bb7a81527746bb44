"""Process-wide dependencies (Redis client, note state), built lazily from settings."""

from __future__ import annotations

from functools import lru_cache

import redis

from adapter.settings import get_settings
from adapter.state import NoteState

_redis_override: redis.Redis | None = None


@lru_cache(maxsize=1)
def _redis_from_settings() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=5, socket_connect_timeout=2)


def get_redis() -> redis.Redis:
    return _redis_override if _redis_override is not None else _redis_from_settings()


def use_redis_client(client: redis.Redis | None) -> None:
    """Run on a given client (the demo's in-process Redis when no server answers)."""
    global _redis_override
    _redis_override = client


def get_note_state() -> NoteState:
    return NoteState(get_redis(), get_settings().key_prefix)


def reset_dependencies() -> None:
    """Forget cached clients and settings (tests and the demo change the environment between runs)."""
    get_settings.cache_clear()
    _redis_from_settings.cache_clear()
