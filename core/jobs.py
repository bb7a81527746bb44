"""The work the receiver hands to the workers. Messages carry ids only; the API never calls the EHR itself.

* ``worker.tasks.process_note(document_id, version_id)``: a note version to tag (its JSON waits in Redis,
  or the worker reads that version from the EHR);
* ``worker.tasks.retract_note(document_id, version_id)``: a note became ``entered-in-error``;
* ``worker.tasks.resolve_note(document_id, subscription)``: an id-only notification without a version;
  the worker reads the current version (:func:`worker.recovery.run_resolve_note`);
* ``worker.tasks.recover_events(subscription, from_event, to_event, since)``: an ``empty`` notification, a
  gap, or a silent subscription (:func:`worker.recovery.run_recover_events`).

Exactly-once enqueueing: when the broker is the Redis that holds the receiver's state (always, with
these settings), each job is written as a Celery task message by the same Redis script that claims the
note version or event number (:meth:`JobQueue.envelope`). Claim and message succeed or fail together, so
neither a crash nor a broker hiccup can leave a note claimed but never queued, and a notification costs
one Redis round trip. The message is Celery's own protocol-2 message (built by ``app.amqp.as_task_v2``)
in kombu's Redis envelope, exactly what ``send_task`` would push on a direct queue; for anything else
(a non-direct route, a broker other than that Redis, e.g. the demo's in-process transport) the job is sent
with ``send_task`` after the claim.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

TASKS = {
    "process_note": "worker.tasks.process_note",
    "retract_note": "worker.tasks.retract_note",
    "resolve_note": "worker.tasks.resolve_note",
    "recover_events": "worker.tasks.recover_events",
    # The review pages' jobs (worker/review_tasks.py): argument is an id of a request kept in Redis.
    "review_try": "worker.review_tasks.try_text",
    "retry_dead_letter": "worker.review_tasks.retry_dead_letter",
    "review_action": "worker.review_actions.apply_action",  # a reviewer's confirm/reject/correct/add (I/O queue)
}
TASK_PROCESS_NOTE = TASKS["process_note"]
TASK_RETRACT_NOTE = TASKS["retract_note"]
TASK_RESOLVE_NOTE = TASKS["resolve_note"]
TASK_RECOVER_EVENTS = TASKS["recover_events"]


@dataclass(frozen=True)
class Job:
    kind: str  # a key of TASKS
    args: tuple[Any, ...]

    @property
    def task(self) -> str:
        return TASKS[self.kind]


@dataclass(frozen=True)
class Envelope:
    """A ready task message and the Redis list it goes to (LPUSH, as kombu's Redis transport does)."""

    key: str
    payload: str


class JobQueue(Protocol):
    def envelope(self, job: Job) -> Envelope | None:
        """The message to push atomically with the claim, or None to have :meth:`send` called after it."""

    def send(self, job: Job) -> None:
        """Send a job on its own (raises when the queue is unavailable)."""


def celery_envelope(task: str, args: list[Any], priority: int = 0) -> Envelope | None:
    """The task message ``send_task(task, args, priority=priority)`` would push, built without sending it; None
    for a route that is not a plain direct queue (those are left to ``send_task``). kombu's Redis transport keeps
    a list per priority step (0, 3, 6, 9; 0 is served first): ``priority`` must be one of them."""
    from kombu.serialization import dumps

    from core.celery_app import get_celery_app

    app = get_celery_app()
    if not _broker_is_state_redis(str(app.conf.broker_url or "")):
        return None
    route = app.amqp.router.route({}, task, args, {})
    queue = route.get("queue")
    if queue is None or getattr(queue.exchange, "type", "direct") != "direct" or route.get("exchange"):
        return None
    task_id = str(uuid.uuid4())
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id, task, args=args, kwargs={}, argsrepr=_plain_repr(args, app.amqp.argsrepr_maxsize), kwargsrepr="{}"
    )
    content_type, content_encoding, data = dumps(body, serializer=app.conf.task_serializer)  # type: ignore[no-untyped-call]
    raw = data.encode(content_encoding or "utf-8") if isinstance(data, str) else data
    message = {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": getattr(queue.exchange, "delivery_mode", None) or 2,
            "delivery_info": {"exchange": "", "routing_key": queue.name},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    suffix = f"\x06\x16{priority}" if priority else ""  # kombu.transport.redis.Channel._q_for_pri
    return Envelope(prefix + queue.name + suffix, json.dumps(message))


def _plain_repr(args: list[Any], limit: int) -> str | None:
    """``repr`` of ids and numbers, which is what Celery's ``saferepr`` writes in the message's ``argsrepr``
    header for them, at a fraction of its cost; None (Celery's own) for anything else or anything long."""
    if not all(type(arg) in (str, int, float) for arg in args):
        return None
    text = repr(args)
    return text if len(text) <= limit else None


def _broker_is_state_redis(broker_url: str) -> bool:
    """The message can ride with the claim only when the broker is the very Redis the claims are in."""
    from core.redis_client import state_redis_is_overridden
    from core.settings import get_settings

    return (
        broker_url.startswith(("redis://", "rediss://", "unix://", "sentinel://"))
        and broker_url == get_settings().redis_url
        and not state_redis_is_overridden()
    )


class CeleryJobQueue:
    """Celery task messages, routed to their queue (the receiver's jobs all go to the I/O queue)."""

    def envelope(self, job: Job) -> Envelope | None:
        return celery_envelope(job.task, list(job.args))

    def send(self, job: Job) -> None:
        from core.celery_app import get_celery_app

        get_celery_app().send_task(job.task, args=list(job.args))


class RecordingJobQueue:
    """Keeps jobs in a list instead of sending them (tests, dry runs)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, tuple[Any, ...]]] = []

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.jobs if name == kind]

    def envelope(self, job: Job) -> Envelope | None:
        return None

    def send(self, job: Job) -> None:
        self.jobs.append((job.kind, job.args))


_override: JobQueue | None = None


def use_job_queue(queue: JobQueue | None) -> None:
    """Send jobs somewhere else (tests record them); None restores Celery."""
    global _override
    _override = queue


def get_job_queue() -> JobQueue:
    return _override if _override is not None else CeleryJobQueue()
