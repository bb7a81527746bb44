"""What the review pages read and the workers write, in Redis (issue 16). Shared by the API and the worker.

Keys, all under the deployment's prefix:

* ``review:note:{id}`` (hash, version -> JSON): the worker's record of what it read and wrote for each
  version of a note: the text, every mention (offsets, label, assertion, confidence, codes) and what it
  became (a resource, or why none). Kept as long as the note's state (``NOTE_TTL_SECONDS``).
* ``review:patient:{id}`` (set of note ids): the notes recorded for a patient, same lifetime.
* ``review:session:{sid}``: a reviewer's login (name and CSRF token), ``FHIR_NER_REVIEW_SESSION_HOURS``; one opened
  by a SMART launch also names the launch's patient and the user's ``fhirUser``.
* ``review:launch:{state}``: a SMART launch waiting for its callback (PKCE verifier, endpoints), ten minutes, one use.
* ``review:action:{id}``: a reviewer action and its outcome; ``review:actions:{note}`` lists a note's.
* ``review:feedback:{note}``: the reviewed note as a training document (text + corrected mentions). It does
  not expire: it is what ``fhir-ner feedback export`` writes out; ``feedback export --delete`` removes it.
* ``review:try:{id}`` / ``review:try-result:{id}``: a playground request and its answer (ten minutes).

Note text lives only in values here, never in key names, task messages or logs.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import redis

from core.state import NOTE_TTL_SECONDS

TRY_TTL_SECONDS = 600
#: How long an EHR launch may take between /review/launch and its callback (the user may have to log in).
LAUNCH_TTL_SECONDS = 600
ACTION_KINDS = ("confirm", "reject", "correct", "add")
ACTION_STATES = ("queued", "done", "failed")
#: Kinds whose target is a resource, whatever note version it is looked at from; the others carry offsets
#: into one version's text.
RESOURCE_ACTIONS = ("confirm", "reject")


def action_id(document_id: str, version_id: str, kind: str, resource: str | None, payload: dict[str, Any]) -> str:
    """Deterministic and reviewer-independent: the same action sent twice (a double submit, two reviewers
    agreeing) is one action. Confirm and reject name the resource only; correct and add their version's offsets."""
    version = "" if kind in RESOURCE_ACTIONS else version_id
    body = json.dumps([document_id, version, kind, resource or "", payload], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def new_action(
    document_id: str,
    version_id: str,
    kind: str,
    mention: dict[str, Any] | None,
    payload: dict[str, Any],
    reviewer: str,
    reviewer_reference: str | None = None,
) -> dict[str, Any]:
    """An action as the API keeps it for the worker: the target mention as the record has it (``None`` for add),
    the payload (span, label, code) and who asked (with their ``Practitioner/...`` when they came by a SMART
    launch). The task message carries only its ``id``."""
    resource = str(mention["resource"]) if mention and mention.get("resource") else None
    return {
        "id": action_id(document_id, version_id, kind, resource, payload),
        "document": document_id,
        "version": version_id,
        "kind": kind,
        "resource": resource,
        "index": mention.get("index") if mention else None,
        "mention": {k: mention.get(k) for k in ("label", "start", "end", "assertion", "resource_type", "mention_key")}
        if mention
        else None,
        "payload": payload,
        "reviewer": reviewer,
        "reviewer_reference": reviewer_reference,
        "state": "queued",
        "message": None,
        "created": time.time(),
    }


def feedback_document(record: dict[str, Any], actions: list[dict[str, Any]]) -> dict[str, Any]:
    """The reviewed note as a training document: its text and the model's mentions, minus the rejected ones,
    with the corrections, plus the added ones. Only done actions count; correct and add only for the version
    they were made on (their offsets are into that version's text)."""
    version = str(record.get("version"))
    mentions: list[dict[str, Any]] = [
        {
            "label": m["label"],
            "start": int(m["start"]),
            "end": int(m["end"]),
            "resource": m.get("resource"),
            "index": m.get("index"),
            "mention_key": m.get("mention_key"),
            "reviewed": None,
        }
        for m in record.get("mentions", [])
        if not m.get("added_by")
    ]
    for action in sorted(actions, key=lambda a: float(a.get("created") or 0)):
        if action.get("state") != "done":
            continue
        kind = action.get("kind")
        same_version = str(action.get("version")) == version
        if kind == "add":
            if same_version:
                payload = action["payload"]
                mentions.append(
                    {
                        "label": payload["label"],
                        "start": int(payload["start"]),
                        "end": int(payload["end"]),
                        "resource": action.get("created_resource"),
                        "index": None,
                        "mention_key": None,
                        "reviewed": "added",
                    }
                )
            continue
        key = (action.get("mention") or {}).get("mention_key")
        for mention in mentions:
            # The same resource, the same mention of this version, or (a later version) the same finding.
            targeted = (
                (action.get("resource") and mention["resource"] == action.get("resource"))
                or (same_version and mention["index"] is not None and mention["index"] == action.get("index"))
                or (kind in RESOURCE_ACTIONS and key and mention["mention_key"] == key)
            )
            if not targeted:
                continue
            if kind == "reject":
                mention["reviewed"] = "rejected"
            elif kind == "confirm" and mention["reviewed"] is None:
                mention["reviewed"] = "confirmed"
            elif kind == "correct" and same_version:
                payload = action["payload"]
                mention.update(
                    label=payload["label"], start=int(payload["start"]), end=int(payload["end"]), reviewed="corrected"
                )
                if action.get("created_resource"):
                    mention["resource"] = action["created_resource"]
    text = str(record.get("text") or "")
    kept = [
        {**{k: m[k] for k in ("label", "start", "end", "reviewed")}, "text": text[m["start"] : m["end"]]}
        for m in mentions
        if m["reviewed"] != "rejected" and 0 <= m["start"] < m["end"] <= len(text)
    ]
    kept.sort(key=lambda m: (m["start"], m["end"], m["label"]))
    return {
        "document": record.get("document"),
        "version": version,
        "language": record.get("language"),
        "text": text,
        "mentions": kept,
        "updated": time.time(),
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ReviewStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, "review", *parts))

    # The worker's per-version records -------------------------------------------------------------------------
    def put_record(self, document_id: str, version_id: str, record: dict[str, Any]) -> None:
        pipe = self.client.pipeline(transaction=True)
        note_key = self.key("note", document_id)
        pipe.hset(note_key, version_id, json.dumps(record))
        pipe.expire(note_key, NOTE_TTL_SECONDS)
        subject = str(record.get("subject") or "")
        if subject.startswith("Patient/"):
            patient_key = self.key("patient", subject.split("/", 1)[1])
            pipe.sadd(patient_key, document_id)
            pipe.expire(patient_key, NOTE_TTL_SECONDS)
        pipe.execute()

    def put_text(self, document_id: str, version_id: str, text: str) -> None:
        self.client.set(self.key("text", document_id, version_id), text, ex=NOTE_TTL_SECONDS)

    def get_text(self, document_id: str, version_id: str) -> str | None:
        """The text the read stage kept; moved into the version's record once that is written."""
        raw = self.client.get(self.key("text", document_id, version_id))
        return _text(raw) if raw is not None else None

    def drop_text(self, document_id: str, version_id: str) -> None:
        self.client.delete(self.key("text", document_id, version_id))

    def records(self, document_id: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self.key("note", document_id))
        return {_text(k): json.loads(v) for k, v in raw.items()}

    def patient_notes(self, patient_id: str) -> list[str]:
        return sorted(_text(m) for m in self.client.smembers(self.key("patient", patient_id)))

    # Sessions -----------------------------------------------------------------------------------------------
    def open_session(self, reviewer: str, ttl_seconds: int, **extra: Any) -> tuple[str, str]:
        """A new login: (session id, CSRF token). ``extra`` marks a SMART launch's session (``smart``, ``patient``,
        ``fhir_user``)."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        payload = json.dumps({**extra, "reviewer": reviewer, "csrf": csrf, "since": time.time()})
        self.client.set(self.key("session", session_id), payload, ex=ttl_seconds)
        return session_id, csrf

    def session(self, session_id: str) -> dict[str, Any] | None:
        if not session_id or len(session_id) > 100:
            return None
        raw = self.client.get(self.key("session", session_id))
        return json.loads(raw) if raw else None

    def close_session(self, session_id: str) -> None:
        self.client.delete(self.key("session", session_id))

    # SMART launches ----------------------------------------------------------------------------------------------
    def put_launch(self, state: str, launch: dict[str, Any], ttl_seconds: int = LAUNCH_TTL_SECONDS) -> None:
        """A launch waiting for the EHR's authorization (state -> PKCE verifier, endpoints, launch)."""
        self.client.set(self.key("launch", state), json.dumps(launch), ex=ttl_seconds)

    def take_launch(self, state: str) -> dict[str, Any] | None:
        """The launch for this state, removed as it is read: a state is good for one callback."""
        if not state or len(state) > 100:
            return None
        raw = self.client.getdel(self.key("launch", state))
        return json.loads(raw) if raw else None

    # Reviewer actions -----------------------------------------------------------------------------------------
    def put_action(self, action: dict[str, Any]) -> bool:
        """Record a new action; False when one with that id exists already (the same action, sent again)."""
        key = self.key("action", str(action["id"]))
        created = bool(self.client.set(key, json.dumps(action), nx=True))
        if created:
            self.client.zadd(self.key("actions", str(action["document"])), {str(action["id"]): time.time()})
        return created

    def update_action(self, action_id: str, **changes: Any) -> dict[str, Any] | None:
        action = self.action(action_id)
        if action is None:
            return None
        action.update(changes, updated=time.time())
        self.client.set(self.key("action", action_id), json.dumps(action))
        return action

    def action(self, action_id: str) -> dict[str, Any] | None:
        raw = self.client.get(self.key("action", action_id))
        return json.loads(raw) if raw else None

    def actions(self, document_id: str) -> list[dict[str, Any]]:
        members = self.client.zrange(self.key("actions", document_id), 0, -1)
        ids = [_text(i) for i in members if isinstance(i, bytes | str)]
        found = [self.action(i) for i in ids]
        return [a for a in found if a is not None]

    # Training documents from reviews --------------------------------------------------------------------------
    def note_actions(self, document_id: str) -> dict[str, Any]:
        """The latest action per target on a note, for the note view: ``resource`` -> action and
        ``index:{version}:{i}`` -> action."""
        shown: dict[str, Any] = {}
        for action in self.actions(document_id):
            if action.get("resource"):
                shown[str(action["resource"])] = action
            if action.get("index") is not None:
                shown[f"index:{action.get('version')}:{action['index']}"] = action
        return shown

    def put_feedback(self, document_id: str, document: dict[str, Any]) -> None:
        self.client.set(self.key("feedback", document_id), json.dumps(document))

    def feedback(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        start = len(self.key("feedback", ""))
        for key in self.client.scan_iter(self.key("feedback", "*"), count=500):
            raw = self.client.get(key)
            if raw:
                found[_text(key)[start:]] = json.loads(raw)
        return found

    def delete_feedback(self, document_id: str) -> None:
        self.client.delete(self.key("feedback", document_id))

    # The playground -------------------------------------------------------------------------------------------
    def put_try(self, request: dict[str, Any]) -> str:
        request_id = secrets.token_hex(16)
        self.client.set(self.key("try", request_id), json.dumps(request), ex=TRY_TTL_SECONDS)
        return request_id

    def take_try(self, request_id: str) -> dict[str, Any] | None:
        """The request, removed as it is read (its text is needed once)."""
        raw = self.client.getdel(self.key("try", request_id))
        return json.loads(raw) if raw else None

    def put_try_result(self, request_id: str, result: dict[str, Any]) -> None:
        self.client.set(self.key("try-result", request_id), json.dumps(result), ex=TRY_TTL_SECONDS)

    def take_try_result(self, request_id: str) -> dict[str, Any] | None:
        raw = self.client.getdel(self.key("try-result", request_id))
        return json.loads(raw) if raw else None


def recent_notes(client: redis.Redis, prefix: str, limit: int = 200, scan_limit: int = 20000) -> list[dict[str, Any]]:
    """The most recently updated notes (from their status records), newest first: at most ``scan_limit`` keys
    are looked at, so a very large deployment sees a sample, never a stalled page."""
    status_prefix = f"{prefix}:status:"
    notes: list[dict[str, Any]] = []
    for seen, raw_key in enumerate(client.scan_iter(status_prefix + "*", count=1000)):
        if seen >= scan_limit:
            break
        key = _text(raw_key)
        versions = {_text(k): json.loads(v) for k, v in client.hgetall(key).items()}
        if not versions:
            continue
        latest_version, latest = max(versions.items(), key=lambda item: float(item[1].get("updated") or 0))
        notes.append(
            {
                "document": key[len(status_prefix) :],
                "version": latest_version,
                "versions": len(versions),
                **latest,
            }
        )
    notes.sort(key=lambda note: float(note.get("updated") or 0), reverse=True)
    return notes[:limit]
