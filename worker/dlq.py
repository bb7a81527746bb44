"""The dead-letter store: jobs that exhausted their retries wait here, with their last error, in Redis.

Nothing is dropped silently: `fhir-ner dlq list|show|retry` manage the entries, and the note's status
says it was dead-lettered.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis


@dataclass
class DeadLetter:
    id: str
    task: str
    args: list[Any]
    error: str
    failed_at: float = field(default_factory=time.time)
    attempts: int = 0
    retried: int = 0


class DeadLetterStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.entries_key = f"{prefix}:dlq:entries"
        self.index_key = f"{prefix}:dlq:index"

    def add(self, letter: DeadLetter) -> None:
        """Idempotent per id: a job dead-lettered twice keeps one entry with the latest error."""
        previous = self.get(letter.id)
        if previous is not None:
            letter.retried = previous.retried
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.entries_key, letter.id, json.dumps(asdict(letter)))
        pipe.zadd(self.index_key, {letter.id: letter.failed_at})
        pipe.execute()

    def get(self, letter_id: str) -> DeadLetter | None:
        raw = self.client.hget(self.entries_key, letter_id)
        return DeadLetter(**json.loads(raw)) if raw else None

    def list(self, limit: int = 100) -> list[DeadLetter]:
        ids = self.client.zrange(self.index_key, 0, limit - 1)
        letters = [self.get(i.decode() if isinstance(i, bytes) else i) for i in ids]
        return [letter for letter in letters if letter is not None]

    def remove(self, letter_id: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.entries_key, letter_id)
        pipe.zrem(self.index_key, letter_id)
        removed, _ = pipe.execute()
        return bool(removed)

    def count(self) -> int:
        return int(self.client.zcard(self.index_key))
