"""Backfills and reprocessing runs: their progress record in Redis, and the claim that queues a note they find.

Shared by the worker's drivers (``fhir-ner backfill``, ``fhir-ner reprocess``, :mod:`worker.backfill`), which
write it, and the API (``GET /backfills``, ``/metrics``), which reads it.

* A **run** has a name (from its parameters, so the same command finds its own run again after a ``kill -9``)
  and a hash ``{prefix}:bulk:run:{name}``: kind, parameters, state, source, counts, the position to resume from,
  rate, times. ``{prefix}:bulk:runs`` lists the names.
* **Claims.** A note version a run finds is claimed by one Redis script, which also pushes its task message
  and moves the run's position and counts: a run killed at any point resumes from the last note it accounted
  for, and no note is counted or queued twice.

  - *backfill*: a version claimed before (by a live notification or another run) or with a status is a
    duplicate (already processed, or on its way); otherwise it is claimed the way the receiver claims it
    (``{prefix}:seen:{id}:{version}``) and queued.
  - *reprocess*: only a version whose status is ``done`` by another model or mapping profile is queued again
    (claimed once per model and profile: ``{prefix}:reseen:{id}:{version}:{fingerprint}``).

  Either way the note is marked ``{prefix}:bulk:note:{id}:{version}`` = run name, so its later stages keep the
  run's low priority (:func:`note_priority`) and a resumed run recognises what it queued itself.
* **Priority.** Bulk jobs travel on the same queues as live ones, at Celery priority :data:`BULK_PRIORITY`:
  kombu's Redis transport keeps one list per priority step and its workers always take priority 0 (live
  notes) first, so a live note waits at most for the jobs a worker already holds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from core.jobs import Envelope
from core.redis_client import queue_script

NOTE_TTL_SECONDS = 14 * 24 * 3600
# Celery/kombu on Redis: priority 0 is served first, 9 last (kombu keeps a list per step 0, 3, 6, 9).
BULK_PRIORITY = 9
PRIORITY_SEPARATOR = "\x06\x16"
RunKind = Literal["backfill", "reprocess"]
COUNTS = ("scanned", "queued", "duplicates", "skipped", "up_to_date")

# KEYS: seen/reseen claim, status hash, note, queue list, note marker, run hash.
# ARGV: ttl, version, status record, document JSON ('' none), envelope ('' none), run name, position, scanned,
#       action (process|retract|skip), kind (backfill|reprocess), now, fingerprint (reprocess), reason (skip)
_CLAIM = """
local function account(field)
  redis.call('HSET', KEYS[6], 'position', ARGV[7], 'scanned', ARGV[8], 'updated', ARGV[11])
  if field then redis.call('HINCRBY', KEYS[6], field, 1) end
end
if redis.call('GET', KEYS[5]) == ARGV[6] then
  account(false)
  return 'mine'
end
if ARGV[10] == 'reprocess' then
  if ARGV[9] ~= 'process' then account('skipped') return 'skipped' end
  local raw = redis.call('HGET', KEYS[2], ARGV[2])
  if not raw then account('skipped') return 'not-processed' end
  local record = cjson.decode(raw)
  if record['status'] ~= 'done' then account('skipped') return 'not-done' end
  local current = tostring(record['model'] or '') .. '|' .. tostring(record['profile'] or '')
  if current == ARGV[12] then account('up_to_date') return 'up-to-date' end
  if not redis.call('SET', KEYS[1], ARGV[6], 'NX', 'EX', ARGV[1]) then account('duplicates') return 'duplicate' end
else
  if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
    account('duplicates')
    return 'duplicate'
  end
  if ARGV[9] == 'skip' or (ARGV[9] == 'retract' and redis.call('HLEN', KEYS[2]) == 0) then
    -- Not processable, or entered in error before anything was derived from it: nothing to queue.
    redis.call('SET', KEYS[5], ARGV[6], 'EX', ARGV[1])
    local reason = ARGV[13]
    if ARGV[9] == 'retract' then reason = 'entered-in-error before any version was processed' end
    redis.call('HSET', KEYS[2], ARGV[2], cjson.encode({status='skipped', reason=reason, source=ARGV[10],
      run=ARGV[6], updated=tonumber(ARGV[11])}))
    account('skipped')
    return 'skipped'
  end
  redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
end
redis.call('SET', KEYS[5], ARGV[6], 'EX', ARGV[1])
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[1]) end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if ARGV[5] ~= '' then redis.call('LPUSH', KEYS[4], ARGV[5]) end
account('queued')
return 'queued'
"""

ClaimOutcome = Literal["queued", "duplicate", "skipped", "mine", "not-processed", "not-done", "up-to-date"]


@dataclass(frozen=True)
class FoundNote:
    """A note version a run found, with where the run stands once it is accounted for."""

    document_id: str
    version_id: str
    action: Literal["process", "retract", "skip"]
    document: dict[str, Any] | None = None
    reason: str = ""


def priority_queue_key(key: str, priority: int = BULK_PRIORITY) -> str:
    """kombu's Redis list for ``priority`` of the queue whose priority-0 list is ``key``."""
    return f"{key}{PRIORITY_SEPARATOR}{priority}" if priority else key


class BulkState:
    """Runs' records and claims in Redis."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._claim = client.register_script(_CLAIM)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def registry_key(self) -> str:
        return self._key("bulk", "runs")

    def run_key(self, name: str) -> str:
        return self._key("bulk", "run", name)

    def marker_key(self, document_id: str, version_id: str) -> str:
        return self._key("bulk", "note", document_id, version_id)

    # ------------------------------------------------------------------ runs
    def open_run(self, name: str, kind: RunKind, params: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """The run's record, created if new; a finished run is started again from the beginning."""
        key = self.run_key(name)
        record = self.get(name)
        now = time.time()
        if record is None or record.get("state") in ("done", "dry-run") or dry_run:
            fields: dict[str, Any] = {
                "name": name,
                "kind": kind,
                "params": json.dumps(params, sort_keys=True),
                "state": "starting",
                "started": now,
                "updated": now,
                "position": "",
                "total": "",
                "source": "",
                "error": "",
                "finished": "",
                **{count: 0 for count in COUNTS},
            }
            pipe = self.client.pipeline()
            pipe.delete(key)
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.sadd(self.registry_key, name)
            pipe.execute()
        else:
            self.client.hset(key, mapping={"resumed": str(now), "updated": str(now), "error": ""})
        result = self.get(name)
        assert result is not None
        return result

    def update(self, name: str, **fields: Any) -> None:
        values = {
            k: json.dumps(v) if isinstance(v, dict | list) else "" if v is None else str(v) for k, v in fields.items()
        }
        values["updated"] = str(time.time())
        self.client.hset(self.run_key(name), mapping=values)  # type: ignore[arg-type]

    def get(self, name: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self.run_key(name))
        return _decode_run(raw) if raw else None

    def runs(self) -> list[dict[str, Any]]:
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in self.client.smembers(self.registry_key))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.run_key(name))
            pipe.exists(self._key("bulk", "lock", name))
        answers = pipe.execute()
        found = []
        for raw, locked in zip(answers[::2], answers[1::2], strict=True):
            if not raw:
                continue
            record = _decode_run(raw)
            record["driver_alive"] = bool(locked)
            if record["state"] in ("running", "starting") and not locked:
                record["state"] = "interrupted"  # its driver died (kill -9, lost machine): run it again to resume
                record["eta_seconds"] = None
            found.append(record)
        return found

    # ------------------------------------------------------------------ one driver per run
    def lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take (or keep, when ``owner`` already holds it) the run's lock for ``ttl`` seconds."""
        key = self._key("bulk", "lock", name)
        milliseconds = max(1, int(ttl * 1000))
        if self.client.set(key, owner, nx=True, px=milliseconds):
            return True
        held = self.client.get(key)
        if held is not None and _text(held) == owner:
            self.client.pexpire(key, milliseconds)
            return True
        return False

    def unlock(self, name: str, owner: str) -> None:
        key = self._key("bulk", "lock", name)
        held = self.client.get(key)
        if held is not None and _text(held) == owner:
            self.client.delete(key)

    # ------------------------------------------------------------------ claims
    def queue_claim(
        self,
        pipe: Any,
        run: str,
        kind: RunKind,
        note: FoundNote,
        envelope: Envelope | None,
        position: dict[str, Any],
        scanned: int,
        fingerprint: str = "",
        **details: Any,
    ) -> None:
        """Add to ``pipe``: account for ``note`` in ``run`` and, if it is to be (re)processed, claim and queue it."""
        if kind == "reprocess":
            claim_key = self._key("reseen", note.document_id, note.version_id, fingerprint)
        else:
            claim_key = self._key("seen", note.document_id, note.version_id)
        record = {"status": "queued", "updated": time.time(), "source": kind, "run": run, **details}
        if note.action == "retract":
            record["action"] = "retract"
        queue_script(
            pipe,
            self._claim,
            [
                claim_key,
                self._key("status", note.document_id),
                self._key("note", note.document_id, note.version_id),
                envelope.key if envelope else self._key("no-queue"),
                self.marker_key(note.document_id, note.version_id),
                self.run_key(run),
            ],
            [
                NOTE_TTL_SECONDS,
                note.version_id,
                json.dumps(record),
                json.dumps(note.document) if note.document is not None else "",
                envelope.payload if envelope else "",
                run,
                json.dumps(position, sort_keys=True),
                scanned,
                note.action,
                kind,
                time.time(),
                fingerprint,
                note.reason,
            ],
        )

    def claim(
        self,
        run: str,
        kind: RunKind,
        note: FoundNote,
        envelope: Envelope | None,
        position: dict[str, Any],
        scanned: int,
        fingerprint: str = "",
        **details: Any,
    ) -> ClaimOutcome:
        pipe = self.client.pipeline(transaction=False)
        self.queue_claim(pipe, run, kind, note, envelope, position, scanned, fingerprint, **details)
        result = pipe.execute()[-1]
        outcome = result.decode() if isinstance(result, bytes) else str(result)
        return outcome  # type: ignore[return-value]

    def note_run(self, document_id: str, version_id: str) -> str | None:
        """The run that queued this note version, if a run did (its stages then keep the bulk priority)."""
        raw = self.client.get(self.marker_key(document_id, version_id))
        return _text(raw) if raw is not None else None


def note_priority(client: redis.Redis, prefix: str, document_id: str, version_id: str) -> int:
    """Celery priority for the next stage of a note: :data:`BULK_PRIORITY` when a run queued it, else 0."""
    return BULK_PRIORITY if client.exists(f"{prefix}:bulk:note:{document_id}:{version_id}") else 0


def queued_by_reprocess(client: redis.Redis, prefix: str, document_id: str, version_id: str) -> bool:
    """True when a reprocessing run queued this note version (its Provenance then names the new model even
    when every resource is kept)."""
    raw = client.get(f"{prefix}:bulk:note:{document_id}:{version_id}")
    return raw is not None and _text(raw).startswith("reprocess-")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# A run's notes reach the EHR (their write stage) no faster than the run's rate, whatever the workers' backlog:
# each takes the next slot, 1.1/rate after the previous one (10% margin for scheduling jitter).
# KEYS: slot key, run hash. ARGV: now. Returns the wait.
_PACE = """
local rate = tonumber(redis.call('HGET', KEYS[2], 'effective_rate') or '')
if not rate or rate <= 0 then return '0' end
local now = tonumber(ARGV[1])
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
redis.call('SET', KEYS[1], tostring(slot + 1.1 / rate), 'EX', 3600)
return tostring(slot - now)
"""


def pace_bulk_note(client: redis.Redis, prefix: str, document_id: str, version_id: str) -> float:
    """Seconds this note's write stage must wait so its run's notes reach the EHR at its rate (0: not a bulk
    note, or its slot has come)."""
    run = client.get(f"{prefix}:bulk:note:{document_id}:{version_id}")
    if run is None:
        return 0.0
    name = _text(run)
    keys = [f"{prefix}:bulk:pace:{name}", f"{prefix}:bulk:run:{name}"]
    wait = client.eval(_PACE, 2, *keys, repr(time.time()))
    return max(0.0, float(_text(wait)))


def _decode_run(raw: dict[Any, Any]) -> dict[str, Any]:
    text = {
        (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in raw.items()
    }
    record: dict[str, Any] = dict(text)
    for count in COUNTS:
        record[count] = int(text.get(count) or 0)
    for field in ("started", "updated", "finished", "resumed", "rate", "effective_rate", "pace", "total"):
        value = text.get(field)
        record[field] = float(value) if value not in (None, "") else None
    if record["total"] is not None:
        record["total"] = int(record["total"])
    for field in ("params", "position"):
        value = text.get(field)
        record[field] = json.loads(value) if value else None
    record["eta_seconds"] = eta_seconds(record)
    return record


def eta_seconds(record: dict[str, Any]) -> float | None:
    """Seconds left, from the notes still to scan and the run's recent pace (None when unknown)."""
    total, scanned = record.get("total"), record.get("scanned") or 0
    if total is None or record.get("state") not in ("running", "starting"):
        return None
    left = max(0, int(total) - int(scanned))
    if left == 0:
        return 0.0
    pace = record.get("pace") or record.get("effective_rate") or record.get("rate")
    return round(left / pace, 1) if pace else None
