"""Prometheus metrics: request counters and latency in-process, queue depth and recovery totals from Redis.

With several API processes, each exposes its own request counters (scrape each, or sum); the values read
from Redis (queue depth, gaps, recoveries) are shared and the same in every process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("fhir_ner.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

NOTIFICATIONS = Counter(
    "fhir_ner_notifications",
    "Notifications received, by notification type and outcome.",
    ["type", "outcome"],
    registry=REGISTRY,
)
ACK_SECONDS = Histogram(
    "fhir_ner_notification_ack_seconds",
    "Time from request to acknowledgement of a notification.",
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
NOTES = Counter(
    "fhir_ner_notes",
    "Notes seen in notifications, by what happened to them "
    "(queued, retraction, skipped, duplicate, refused, resolving, not-a-note, recovery).",
    ["outcome"],
    registry=REGISTRY,
)

# Celery's Redis transport keeps one list per queue and priority step.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_TOTALS = {
    "gaps_detected": "Event-number gaps that outlived the grace period.",
    "gaps_recovered": "Gaps closed by a recovery.",
    "silences_detected": "Subscriptions silent for longer than their heartbeat period.",
    "recoveries": "Recoveries finished ($events or _lastUpdated).",
    "events_recovered": "Events fetched through $events.",
    "error_notifications": "Notifications reporting a subscription error.",
    "refused_urls": "References or attachment URLs refused because they lie outside the EHR base URL.",
}


class RedisCollector(Collector):
    """Read at scrape time: queue depth, and the receiver totals kept in Redis."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from core.deps import get_redis, get_subscription_state

        try:
            from core.celery_app import QUEUES, broker_queue_key

            client = get_redis()
            pipe = client.pipeline(transaction=False)
            for kind in QUEUES:
                for suffix in _PRIORITY_SUFFIXES:
                    pipe.llen(broker_queue_key(kind) + suffix)
            lengths = [int(n) for n in pipe.execute()]
            steps = len(_PRIORITY_SUFFIXES)
            depths = {kind: sum(lengths[i * steps : (i + 1) * steps]) for i, kind in enumerate(QUEUES)}
            state = get_subscription_state()
            totals = state.totals()
            subscriptions = int(client.scard(state.registry_key))
        except Exception as error:  # Redis down: /readyz says so; metrics still answer
            logger.warning("metrics: Redis unavailable (%s)", type(error).__name__)
            return
        depth = GaugeMetricFamily("fhir_ner_queue_depth", "Task messages waiting, by queue.", labels=["queue"])
        for kind, waiting in depths.items():
            depth.add_metric([kind], waiting)
        yield depth
        yield GaugeMetricFamily(
            "fhir_ner_subscriptions", "Subscriptions the receiver has heard from.", value=subscriptions
        )
        for name, documentation in _TOTALS.items():
            yield CounterMetricFamily(f"fhir_ner_{name}", documentation, value=totals.get(name, 0))
        yield from _backfill_metrics()


def _backfill_metrics() -> Iterator[GaugeMetricFamily]:
    """The backfill and reprocess runs' progress (``GET /backfills`` in numbers), one series per run."""
    from core.backfill import COUNTS, BulkState
    from core.deps import get_redis
    from core.settings import get_settings

    try:
        runs = BulkState(get_redis(), get_settings().key_prefix).runs()
    except Exception as error:
        logger.warning("metrics: backfill runs unavailable (%s)", type(error).__name__)
        return
    notes = GaugeMetricFamily(
        "fhir_ner_backfill_notes",
        "Notes of each backfill/reprocess run by outcome (scanned, queued, duplicates, skipped, up_to_date).",
        labels=["run", "kind", "outcome"],
    )
    total = GaugeMetricFamily("fhir_ner_backfill_total", "Notes the run's source announced.", labels=["run", "kind"])
    running = GaugeMetricFamily(
        "fhir_ner_backfill_running", "1 while the run's driver is alive, else 0.", labels=["run", "kind", "state"]
    )
    rate = GaugeMetricFamily(
        "fhir_ner_backfill_rate",
        "Notes per second the run may queue now (after the EHR's 429s).",
        labels=["run", "kind"],
    )
    eta = GaugeMetricFamily("fhir_ner_backfill_eta_seconds", "Estimated seconds left.", labels=["run", "kind"])
    for run in runs:
        labels = [str(run["name"]), str(run.get("kind") or "")]
        for outcome in COUNTS:
            notes.add_metric([*labels, outcome], float(run.get(outcome) or 0))
        if run.get("total") is not None:
            total.add_metric(labels, float(run["total"]))
        running.add_metric([*labels, str(run.get("state") or "")], 1.0 if run.get("driver_alive") else 0.0)
        if run.get("effective_rate") is not None:
            rate.add_metric(labels, float(run["effective_rate"]))
        if run.get("eta_seconds") is not None:
            eta.add_metric(labels, float(run["eta_seconds"]))
    yield from (notes, total, running, rate, eta)


REGISTRY.register(RedisCollector())
