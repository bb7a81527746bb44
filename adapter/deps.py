"""Process-wide dependencies (Redis client, note state), built lazily from settings."""

from __future__ import annotations

from functools import lru_cache

import redis

from adapter.settings import get_settings
from adapter.state import NoteState


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=5, socket_connect_timeout=2)


def get_note_state() -> NoteState:
    return NoteState(get_redis(), get_settings().key_prefix)


def reset_dependencies() -> None:
    """Forget cached clients and settings (tests and the demo change the environment between runs)."""
    get_settings.cache_clear()
    get_redis.cache_clear()
