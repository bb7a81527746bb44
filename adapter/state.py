"""Note state in Redis, shared by the API and the workers: payloads, de-duplication, and status."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

NOTE_TTL_SECONDS = 14 * 24 * 3600


class NoteState:
    """Small task messages carry (document id, version); the DocumentReference itself waits here."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def store_note(self, document_id: str, version_id: str, document: dict[str, Any]) -> None:
        self.client.set(self._key("note", document_id, version_id), json.dumps(document), ex=NOTE_TTL_SECONDS)

    def load_note(self, document_id: str, version_id: str) -> dict[str, Any] | None:
        raw = self.client.get(self._key("note", document_id, version_id))
        return json.loads(raw) if raw else None

    def claim(self, document_id: str, version_id: str) -> bool:
        """True the first time a note version is seen; redeliveries get False and create no job."""
        return bool(self.client.set(self._key("seen", document_id, version_id), "1", nx=True))

    def release(self, document_id: str, version_id: str) -> None:
        """Undo a claim when the job could not be enqueued, so the EHR's retry is accepted."""
        self.client.delete(self._key("seen", document_id, version_id))

    def set_status(self, document_id: str, version_id: str, status: str, **details: Any) -> None:
        record = {"status": status, "updated": time.time(), **details}
        self.client.hset(self._key("status", document_id), version_id, json.dumps(record))

    def get_status(self, document_id: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self._key("status", document_id))
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    def record_notification(self, subscription: str | None, notification_type: str) -> None:
        key = self._key("subscription", subscription or "unknown")
        self.client.hset(key, mapping={f"last_{notification_type}": time.time()})
        self.client.hincrby(key, f"count_{notification_type}", 1)
