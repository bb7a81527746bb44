"""The process's Redis client: built lazily from settings, or a client given by the demo (its in-process Redis).

A leaf module: the note state (:mod:`core.deps`) and the job envelopes (:mod:`core.jobs`) both ask it which
Redis holds the state, without importing each other.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.commands.core import Script
from redis.sentinel import Sentinel

from core.settings import Settings, get_settings

_override: redis.Redis | None = None


@lru_cache(maxsize=1)
def _from_settings() -> redis.Redis:
    return redis_from_settings(get_settings())


def redis_from_settings(settings: Settings) -> redis.Redis:
    """A client of ``redis_url``; with Sentinel, of the master the sentinels name now.

    With Sentinel the URL is Celery's (kombu's ``sentinel://`` transport): sentinels separated by ``;``, the
    master's password and database number in the first. The client asks the sentinels for the master on each
    new connection, so after a failover (the old master's connections fail, and redis-py retries them) it
    follows the new master: the broker and this client always write to the same Redis.
    """
    if not settings.redis_sentinel_master:
        return redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
    first = urlsplit(settings.redis_url.split(";")[0].strip())
    db = int(first.path.strip("/") or 0)
    sentinel_password = settings.redis_sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.redis_sentinels(),
        socket_timeout=5,
        socket_connect_timeout=2,
        sentinel_kwargs={
            "socket_timeout": 2,
            "socket_connect_timeout": 2,
            **({"password": sentinel_password.get_secret_value()} if sentinel_password else {}),
        },
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master,
        db=db,
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
    )
    return client


def get_redis() -> redis.Redis:
    return _override if _override is not None else _from_settings()


def set_redis_override(client: redis.Redis | None) -> None:
    """Use this client instead of the one from settings (None: back to settings)."""
    global _override
    _override = client


def state_redis_is_overridden() -> bool:
    """True while the state lives in a Redis given by :func:`set_redis_override` (the demo's in-process one)."""
    return _override is not None


def forget_redis_client() -> None:
    """Build the client from settings again on next use (tests and the demo change the environment)."""
    _from_settings.cache_clear()


def queue_script(pipe: Any, script: Script, keys: list[Any], args: list[Any]) -> None:
    """Add a call of a registered Lua script to a pipeline as ``EVAL`` with the script's text.

    ``script(keys=..., args=..., client=pipe)`` makes redis-py ask ``SCRIPT EXISTS`` in a round trip of its
    own every time the pipeline runs, before sending it: a second blocking round trip per notification. The
    text costs a few KB on the wire instead, and Redis runs the script it already compiled (scripts are cached
    by their SHA1), so a Redis that lost its script cache (a restart) needs nothing either.
    """
    pipe.eval(script.script, len(keys), *keys, *args)
