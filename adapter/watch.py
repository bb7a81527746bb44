"""The API's background watch: hand gaps that outlived the grace period, and silent subscriptions, to a worker."""

from __future__ import annotations

import asyncio
import logging

from core.jobs import Job, JobQueue
from core.settings import Settings
from core.subscriptions import RecoveryPlan, SubscriptionState

logger = logging.getLogger("fhir_ner.watch")


def check_subscriptions(
    subscriptions: SubscriptionState, jobs: JobQueue, settings: Settings, now: float | None = None
) -> list[RecoveryPlan]:
    """One pass: find overdue subscriptions and enqueue ``recover_events`` for each (no EHR call here)."""
    plans = subscriptions.overdue(
        grace_seconds=settings.gap_grace_seconds,
        default_heartbeat=settings.heartbeat_seconds,
        retry_seconds=settings.recovery_retry_seconds,
        now=now,
    )
    sent = []
    for plan in plans:
        try:
            jobs.send(Job("recover_events", (plan.subscription, plan.from_event, plan.to_event, plan.since)))
        except Exception as error:
            # Let the next pass try again rather than wait for the lock to expire.
            subscriptions.client.delete(f"{subscriptions.prefix}:sub:{plan.subscription}:recovering")
            logger.error("could not enqueue a recovery (%s)", type(error).__name__)
            continue
        logger.warning(
            "subscription %s: %s, recovering events %s..%s",
            plan.subscription,
            plan.reason,
            plan.from_event,
            plan.to_event if plan.to_event is not None else "?",
        )
        sent.append(plan)
    return sent


async def watch_forever() -> None:
    """Run :func:`check_subscriptions` every ``recovery_check_seconds`` (read afresh each time)."""
    from core.deps import get_subscription_state
    from core.jobs import get_job_queue
    from core.settings import get_settings

    while True:
        interval = get_settings().recovery_check_seconds
        if interval <= 0:
            return
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(check_subscriptions, get_subscription_state(), get_job_queue(), get_settings())
        except Exception as error:  # Redis down, say: try again next time
            logger.warning("subscription watch failed (%s)", type(error).__name__)
