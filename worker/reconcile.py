"""Notes whose next message was lost: found by their status, sent again.

kombu's Redis transport takes a message off its queue (``BRPOP``) and only then records it among the unacknowledged
messages that come back after the visibility timeout. A worker killed in between (``kill -9`` while the reply is
still in its socket) loses that message: the note stays "waiting for the model" or "writing" for ever, though every
stage is idempotent and could simply run again (the load test's kill -9 showed it: one note in ~8 runs on a loaded
machine). The I/O workers therefore look, every ``FHIR_NER_LOST_MESSAGE_SECONDS``, for notes whose status has not
moved for that long and whose stage's message is nowhere, neither waiting in a queue nor held by a worker, and send
that stage again. A queue longer than :data:`MAX_QUEUE_SCAN` is a backlog, not a loss: that round is skipped.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger("fhir_ner.worker")

READ_BATCH = 500  # status hashes read per round trip
MAX_QUEUE_SCAN = 20_000  # messages read per queue per round; a longer queue is a backlog: skip the round
IN_FLIGHT = ("queued", "processing")
MIN_ROUND_SECONDS = 5  # the shortest time between two rounds


def _note_jobs(raw_messages: Iterable[bytes | str]) -> set[tuple[str, str]]:
    """The (document, version) of every note-stage message among ``raw_messages`` (kombu's JSON envelopes,
    or the unacknowledged hash's ``[envelope, exchange, routing key]``)."""
    from worker.tasks import NOTE_TASKS

    found: set[tuple[str, str]] = set()
    for raw in raw_messages:
        try:
            message = json.loads(raw)
            if isinstance(message, list):
                message = message[0]
            if message.get("headers", {}).get("task") not in NOTE_TASKS:
                continue
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            found.add((str(args[0]), str(args[1])))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            continue
    return found


def _messages_in_flight(client: Any) -> set[tuple[str, str]] | None:
    """Every note job with a message in a queue or held by a worker; None when a queue is too long to read."""
    from core.celery_app import QUEUES, broker_key_prefix, broker_queue_key

    raw: list[bytes] = []
    for kind in QUEUES:
        for key in client.scan_iter(match=broker_queue_key(kind) + "*", count=1000):  # each priority's list
            if client.type(key) not in (b"list", "list"):
                continue
            if client.llen(key) > MAX_QUEUE_SCAN:
                return None
            raw += client.lrange(key, 0, -1)
    raw += client.hvals(broker_key_prefix() + "unacked")
    return _note_jobs(raw)


def _in_flight_notes(client: Any, prefix: str, older_than: float) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(document, version, status record) of every note version in flight whose status is older than that.

    Reads every status the deployment keeps (``NOTE_TTL_SECONDS``), :data:`READ_BATCH` per round trip: a cost in
    proportion to the notes kept, paid once a round by one worker."""
    status_prefix = f"{prefix}:status:"
    keys = client.scan_iter(match=status_prefix + "*", count=READ_BATCH)
    while batch := list(itertools.islice(keys, READ_BATCH)):
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.hgetall(key)
        for key, versions in zip(batch, pipe.execute(), strict=True):
            name = key.decode() if isinstance(key, bytes) else key
            for version, raw in versions.items():
                record = json.loads(raw)
                if record.get("status") in IN_FLIGHT and float(record.get("updated", 0)) < older_than:
                    yield (
                        name[len(status_prefix) :],
                        version.decode() if isinstance(version, bytes) else version,
                        record,
                    )


def _stage_task(document_id: str, version_id: str, record: dict[str, Any]) -> str:
    """The task that moves the note on from where it stopped (each stage also copes with a second delivery)."""
    from worker.tasks import PROCESS_NOTE, TAG_NOTES, WRITE_NOTE, work_store

    store = work_store()
    if store.has_output(document_id, version_id):
        return WRITE_NOTE
    if record.get("stage") in ("waiting for the model", "tagging") and store.get_inputs([(document_id, version_id)])[0]:
        return TAG_NOTES
    return PROCESS_NOTE


def resend_lost(now: float | None = None) -> list[tuple[str, str, str]]:
    """One round: send again the stage of every note stuck longer than the setting with no message anywhere.
    Returns (document, version, task) of each note sent again."""
    from core.deps import get_note_state, get_redis
    from core.settings import get_settings
    from worker.tasks import _send

    settings = get_settings()
    client = get_redis()
    now = time.time() if now is None else now
    stuck = list(_in_flight_notes(client, settings.key_prefix, now - settings.lost_message_seconds))
    if not stuck:
        return []
    present = _messages_in_flight(client)
    if present is None:
        logger.info("lost-message check skipped: a queue holds a backlog")
        return []
    state = get_note_state()
    sent: list[tuple[str, str, str]] = []
    for document_id, version_id, record in stuck:
        if (document_id, version_id) in present:
            continue
        task = _stage_task(document_id, version_id, record)
        stage = record.get("stage") or record.get("status", "")
        if not state.advance_status(document_id, version_id, "processing", stage=stage, resent=task):
            continue  # finished meanwhile
        _send(task, document_id, version_id)
        logger.warning("note's message lost, stage sent again", extra={"task": task})
        sent.append((document_id, version_id, task))
    return sent


class LostMessageWatch:
    """A daemon thread in each I/O worker; a Redis lock lets one worker at a time run a round."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from core.settings import get_settings

        if get_settings().lost_message_seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lost-message-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from core.deps import get_redis
        from core.settings import get_settings

        settings = get_settings()
        period = max(MIN_ROUND_SECONDS, settings.lost_message_seconds / 2)
        lock = f"{settings.key_prefix}:lost-message-watch"
        while not self._stop.wait(period):
            try:
                if get_redis().set(lock, "1", nx=True, ex=int(period)):
                    resend_lost()
            except Exception:  # Redis down or a defect: the next round tries again; a worker never dies of it
                logger.exception("lost-message check failed")
