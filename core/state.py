"""Note state in Redis, shared by the API and the workers: payloads, de-duplication, and status."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from core.jobs import Envelope
from core.redis_client import queue_script

NOTE_TTL_SECONDS = 14 * 24 * 3600
HINT_TTL_SECONDS = 3600

# Claim (document, version), keep the note, mark it queued and push its task message, all in one step: a
# redelivery can never reset the status of a version already queued, processing or done, and a claimed
# version always has its message. Returns the other versions already known (false: claimed before).
_CLAIM_AND_QUEUE = """
local ok = redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1])
if not ok then return false end
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[1]) end
local others = {}
for _, version in ipairs(redis.call('HKEYS', KEYS[2])) do
  if version ~= ARGV[2] then others[#others + 1] = version end
end
local record = cjson.decode(ARGV[3])
if #others > 0 then record['previous_versions'] = others end
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(record))
if ARGV[5] ~= '' then redis.call('LPUSH', KEYS[4], ARGV[5]) end
return others
"""

# Record an in-flight stage unless the version is already finished: a stage that hands on is followed by
# the next stage's message, whose worker may finish the note first; its "done" must never be overwritten
# by a late "processing". Returns 1 when written.
_ADVANCE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local status = cjson.decode(current)['status']
  if status == 'done' or status == 'skipped' then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class NoteState:
    """Small task messages carry (document id, version); the DocumentReference itself waits here."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._claim_and_queue = client.register_script(_CLAIM_AND_QUEUE)
        self._advance = client.register_script(_ADVANCE)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def store_note(self, document_id: str, version_id: str, document: dict[str, Any]) -> None:
        self.client.set(self._key("note", document_id, version_id), json.dumps(document), ex=NOTE_TTL_SECONDS)

    def load_note(self, document_id: str, version_id: str) -> dict[str, Any] | None:
        raw = self.client.get(self._key("note", document_id, version_id))
        return json.loads(raw) if raw else None

    def claim(self, document_id: str, version_id: str) -> bool:
        """True the first time a note version is seen; redeliveries get False and create no job."""
        return bool(self.client.set(self._key("seen", document_id, version_id), "1", nx=True, ex=NOTE_TTL_SECONDS))

    def queue_claim(
        self,
        pipe: Any,
        document_id: str,
        version_id: str,
        document: dict[str, Any] | None = None,
        envelope: Envelope | None = None,
        **details: Any,
    ) -> None:
        """Add to ``pipe``: claim the version, keep the note (if given), mark it queued, push ``envelope``.

        Read the outcome with :meth:`claim_result` on this call's result.
        """
        record = json.dumps({"status": "queued", "updated": time.time(), **details})
        queue_script(
            pipe,
            self._claim_and_queue,
            [
                self._key("seen", document_id, version_id),
                self._key("status", document_id),
                self._key("note", document_id, version_id),
                envelope.key if envelope else self._key("no-queue"),
            ],
            [
                NOTE_TTL_SECONDS,
                version_id,
                record,
                json.dumps(document) if document is not None else "",
                envelope.payload if envelope else "",
            ],
        )

    @staticmethod
    def claim_result(result: Any) -> list[str] | None:
        """None when the version was claimed before (a redelivery), else the other known versions."""
        if result is None or result is False:
            return None
        return [v.decode() if isinstance(v, bytes) else str(v) for v in result]

    def claim_and_queue(
        self,
        document_id: str,
        version_id: str,
        document: dict[str, Any] | None = None,
        envelope: Envelope | None = None,
        **details: Any,
    ) -> list[str] | None:
        """:meth:`queue_claim` in a round trip of its own."""
        pipe = self.client.pipeline(transaction=False)
        self.queue_claim(pipe, document_id, version_id, document, envelope, **details)
        return self.claim_result(pipe.execute()[-1])

    def release(self, document_id: str, version_id: str) -> None:
        """Undo a claim when the job could not be enqueued, so the EHR's retry is accepted."""
        self.client.delete(self._key("seen", document_id, version_id))

    def set_status(self, document_id: str, version_id: str, status: str, **details: Any) -> None:
        self.queue_status(self.client, document_id, version_id, status, **details)

    def queue_status(self, pipe: Any, document_id: str, version_id: str, status: str, **details: Any) -> None:
        """:meth:`set_status` as part of a pipeline."""
        record = {"status": status, "updated": time.time(), **details}
        pipe.hset(self._key("status", document_id), version_id, json.dumps(record))

    def advance_status(self, document_id: str, version_id: str, status: str, **details: Any) -> bool:
        """Set an in-flight status, unless the version is finished already (then False, nothing written)."""
        record = json.dumps({"status": status, "updated": time.time(), **details})
        return bool(self._advance(keys=[self._key("status", document_id)], args=[version_id, record]))

    def get_status(self, document_id: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self._key("status", document_id))
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    def record_notification(self, subscription: str | None, notification_type: str) -> None:
        key = self._key("subscription", subscription or "unknown")
        self.client.hset(key, mapping={f"last_{notification_type}": time.time()})
        self.client.hincrby(key, f"count_{notification_type}", 1)

    # Authorization hints travel beside the task, never inside it (task messages are logged and kept).
    def store_hint(self, document_id: str, hint_type: str | None, value: str, pipe: Any = None) -> None:
        payload = json.dumps({"type": hint_type, "value": value})
        target = pipe if pipe is not None else self.client
        target.set(self._key("hint", document_id), payload, ex=HINT_TTL_SECONDS)

    def load_hint(self, document_id: str) -> tuple[str | None, str] | None:
        raw = self.client.get(self._key("hint", document_id))
        if not raw:
            return None
        data = json.loads(raw)
        return data.get("type"), str(data["value"])
