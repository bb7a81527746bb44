"""What one stage of a note's job hands to the next, kept in Redis so task messages stay (document, version).

The I/O stage stores the note's DocumentReference and text; the inference stage adds the mentions and
drops the text; the write stage reads the mentions. A stage that finds its input gone (expired, or
Redis lost it) starts the job again from the beginning rather than dropping it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from core.state import NOTE_TTL_SECONDS
from mappings.bundle import ModelInfo
from mappings.mentions import Mention

WORK_TTL_SECONDS = NOTE_TTL_SECONDS  # as long as the note itself is kept for the workers


@dataclass
class TaggingInput:
    document: dict[str, Any]
    attachment_index: int
    text: str
    language: str | None


@dataclass
class TaggingOutput:
    document: dict[str, Any]
    attachment_index: int
    mentions: list[Mention]
    model: ModelInfo


def _mention_record(mention: Mention) -> dict[str, Any]:
    return {
        "label": mention.label,
        "start": mention.start,
        "end": mention.end,
        "text": mention.text,
        "confidence": mention.confidence,
        "assertion": mention.assertion,
        "resolution": mention.resolution,
    }


def _mention(record: dict[str, Any]) -> Mention:
    return Mention(
        record["label"],
        int(record["start"]),
        int(record["end"]),
        record["text"],
        float(record["confidence"]),
        assertion=record.get("assertion", "present"),
        resolution=record.get("resolution"),
    )


class WorkStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, document_id: str, version_id: str) -> str:
        return f"{self.prefix}:work:{document_id}:{version_id}"

    def put_input(self, document_id: str, version_id: str, item: TaggingInput) -> None:
        key = self._key(document_id, version_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "document": json.dumps(item.document),
                "attachment_index": item.attachment_index,
                "text": item.text,
                "language": item.language or "",
            },
        )
        pipe.expire(key, WORK_TTL_SECONDS)
        pipe.execute()

    def get_inputs(self, jobs: list[tuple[str, str]]) -> list[TaggingInput | None]:
        pipe = self.client.pipeline(transaction=False)
        for document_id, version_id in jobs:
            pipe.hmget(self._key(document_id, version_id), "document", "attachment_index", "text", "language")
        items: list[TaggingInput | None] = []
        for document, index, text, language in pipe.execute():
            if document is None or text is None:
                items.append(None)
                continue
            items.append(
                TaggingInput(json.loads(document), int(index or 0), text.decode(), (language or b"").decode() or None)
            )
        return items

    def put_outputs(self, outputs: dict[tuple[str, str], tuple[list[Mention], ModelInfo]]) -> None:
        """Record the mentions of several notes at once and drop their text (the write stage needs none)."""
        pipe = self.client.pipeline(transaction=True)
        for (document_id, version_id), (mentions, model) in outputs.items():
            key = self._key(document_id, version_id)
            pipe.hset(
                key,
                mapping={
                    "mentions": json.dumps([_mention_record(m) for m in mentions]),
                    "model": json.dumps([model.name, model.revision]),
                },
            )
            pipe.hdel(key, "text")
            pipe.expire(key, WORK_TTL_SECONDS)
        pipe.execute()

    def get_output(self, document_id: str, version_id: str) -> TaggingOutput | None:
        document, index, mentions, model = self.client.hmget(
            self._key(document_id, version_id), "document", "attachment_index", "mentions", "model"
        )
        if document is None or mentions is None or model is None:
            return None
        name, revision = json.loads(model)
        return TaggingOutput(
            json.loads(document),
            int(index or 0),
            [_mention(r) for r in json.loads(mentions)],
            ModelInfo(name, revision),
        )

    def has_output(self, document_id: str, version_id: str) -> bool:
        return bool(self.client.hexists(self._key(document_id, version_id), "mentions"))

    def discard(self, document_id: str, version_id: str) -> None:
        self.client.delete(self._key(document_id, version_id))
