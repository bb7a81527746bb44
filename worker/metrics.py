"""Prometheus metrics of a worker process, served on ``FHIR_NER_WORKER_METRICS_PORT``.

Tasks run in the worker's own process with the ``solo`` and ``threads`` pools (the ones ``fhir-ner worker``
uses for inference and I/O), so one registry per worker process sees everything it does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

logger = logging.getLogger("fhir_ner.worker")

REGISTRY = CollectorRegistry(auto_describe=True)

TASK_SECONDS = Histogram(
    "fhir_ner_worker_task_seconds",
    "Duration of worker tasks, by task and outcome.",
    ["task", "outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
NOTES = Counter(
    "fhir_ner_worker_notes",
    "Note versions finished, by outcome (done, skipped, retracted, dead-lettered).",
    ["outcome"],
    registry=REGISTRY,
)
TOKENS = Counter("fhir_ner_worker_tokens", "Tokens the tagger read.", registry=REGISTRY)
MENTIONS = Counter(
    "fhir_ner_worker_mentions", "Mentions found, by label and assertion.", ["label", "assertion"], registry=REGISTRY
)
RETRIES = Counter("fhir_ner_worker_retries", "Task retries, by task.", ["task"], registry=REGISTRY)
DEAD_LETTERS = Counter("fhir_ner_worker_dead_letters", "Jobs dead-lettered, by task.", ["task"], registry=REGISTRY)
BATCH_NOTES = Histogram(
    "fhir_ner_worker_batch_notes",
    "Notes tagged per inference pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "fhir_ner_worker_inference_seconds",
    "Duration of one inference pass over a batch of notes.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
OOM_SHRINKS = Counter(
    "fhir_ner_worker_oom_shrinks", "Times out-of-memory halved the windows per forward pass.", registry=REGISTRY
)

_started: dict[str, float] = {}
_lock = threading.Lock()
_server_started = False
_signals_connected = False


def task_started(task_id: str) -> None:
    with _lock:
        _started[task_id] = time.perf_counter()


def task_finished(task_id: str, task_name: str, outcome: str) -> None:
    with _lock:
        started = _started.pop(task_id, None)
    if started is not None:
        TASK_SECONDS.labels(task_name.rsplit(".", 1)[-1], outcome).observe(time.perf_counter() - started)


def serve_metrics(port: int | None) -> None:
    """Start the /metrics endpoint once per process (a no-op without a port)."""
    global _server_started
    if port is None or _server_started:
        return
    start_http_server(port, registry=REGISTRY)
    _server_started = True
    logger.info("worker metrics served", extra={"port": port})


def connect_signals() -> None:
    """Time every task through Celery's signals (batches included: they send the same signals)."""
    from celery.signals import task_postrun, task_prerun, task_retry

    global _signals_connected
    if _signals_connected:
        return
    _signals_connected = True

    def on_prerun(task_id: str | None = None, **_: Any) -> None:
        if task_id:
            task_started(task_id)

    def on_postrun(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
        if task_id and task is not None:
            task_finished(task_id, task.name, (state or "unknown").lower())

    def on_retry(sender: Any = None, **_: Any) -> None:
        name = getattr(sender, "name", "unknown")
        RETRIES.labels(name.rsplit(".", 1)[-1]).inc()

    task_prerun.connect(on_prerun, weak=False)
    task_postrun.connect(on_postrun, weak=False)
    task_retry.connect(on_retry, weak=False)
