"""The Celery application: Redis broker and result store, configured from settings. No model code here.

Two queues, each served by its own pool of workers on as many machines as needed (they share the broker):

* ``<prefix>.io``: reading notes and writing results back. Slow EHRs wait here, never in front of the model;
  a ``threads`` pool with many threads suits it.
* ``<prefix>.inference``: tagging. One process per model copy (``solo`` pool) that takes up to
  ``FHIR_NER_INFERENCE_MAX_NOTES`` waiting notes, or what came within ``FHIR_NER_INFERENCE_MAX_WAIT_MS``,
  and tags them in one length-bucketed pass.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from core.settings import Settings, get_settings

IO_QUEUE = "io"
INFERENCE_QUEUE = "inference"
QUEUES = (IO_QUEUE, INFERENCE_QUEUE)
INFERENCE_TASKS = ("worker.tasks.tag_notes", "worker.review_tasks.try_text")


def queue_name(kind: str) -> str:
    """Queues carry the key prefix so several deployments (or test runs) can share one Redis."""
    return f"{get_settings().key_prefix}.{kind}"


def broker_key_prefix() -> str:
    """Every broker key (queues, unacknowledged messages) lives under the deployment's prefix, so deployments
    sharing a Redis never restore each other's messages."""
    return f"{get_settings().key_prefix}:broker:"


def broker_queue_key(kind: str) -> str:
    """The Redis list holding a queue's waiting messages."""
    return broker_key_prefix() + queue_name(kind)


def route_task(name: str, *_: object, **__: object) -> dict[str, str]:
    """Inference tasks to the model queue, everything else (EHR reads and writes, recovery) to the I/O queue."""
    return {"queue": queue_name(INFERENCE_QUEUE if name in INFERENCE_TASKS else IO_QUEUE)}


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    if not settings.redis_sentinel_master:
        return {}
    options: dict[str, Any] = {"master_name": settings.redis_sentinel_master}
    if settings.redis_sentinel_password:
        options["sentinel_kwargs"] = {"password": settings.redis_sentinel_password.get_secret_value()}
    return options


@lru_cache(maxsize=1)
def get_celery_app() -> Celery:
    settings = get_settings()
    app = Celery(
        "fhir_ner",
        broker=settings.redis_url,
        include=["worker.tasks", "worker.review_tasks", "worker.review_actions"],
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A message is acknowledged only when its task has finished; a worker that dies (kill -9, lost
        # machine) leaves it unacknowledged and the broker delivers it again after the visibility timeout.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes=(route_task,),
        task_default_queue=queue_name(IO_QUEUE),
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        # The note's status record in Redis (core/state.py) is the result; Celery keeps none.
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            "unacked_restore_interval": settings.broker_restore_interval,
            "unacked_restore_throttle": 1,
            # The restore sweep's lock: a worker killed while holding it (kombu's default lock lasts 300 s)
            # delays the restore of everyone's abandoned messages by at most one visibility timeout.
            "unacked_mutex_expire": min(300, settings.broker_visibility_timeout),
            "global_keyprefix": broker_key_prefix(),
            # Sentinel (FHIR_NER_REDIS_URL=sentinel://...;sentinel://...): kombu asks them for this master.
            **_sentinel_options(settings),
        },
        result_backend_transport_options=_sentinel_options(settings),
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app
