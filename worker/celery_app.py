"""The Celery application: Redis broker and result store, configured from settings. No model code here."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from adapter.settings import get_settings


def queue_name(kind: str) -> str:
    """Queues carry the key prefix so several deployments (or test runs) can share one Redis."""
    return f"{get_settings().key_prefix}.{kind}"


@lru_cache(maxsize=1)
def get_celery_app() -> Celery:
    settings = get_settings()
    app = Celery("fhir_ner", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue_name("notes"),
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 2 * 3600},
        worker_hijack_root_logger=False,
    )
    return app
