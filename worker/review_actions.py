"""A reviewer's action, written to the EHR (issue 16): the I/O queue's ``apply_action(action_id)`` task.

The API has checked the login, the CSRF token and that the resource belongs to the note's record, kept the action
in Redis (``core/review.py``) and sent this task with the action's id only. Here the worker reads the resource
(and, to map a corrected or added mention, the note version) from the EHR, builds the transaction with
``mappings/review.py`` (PUT with ``ifMatch``, conditional creates, a Provenance naming the reviewer and the
adapter) and writes it with its EHR client. Then it marks the action done or failed, updates the note's review
record (what the pages show) and the note's training document (``review:feedback:{note}``).

Idempotent: running it again finds the resource as the first run left it and writes no second copy of anything
(the Provenance is a conditional create on a tag that hashes the action id). A version conflict (someone wrote
the resource since it was read) or an EHR outage is retried; anything else fails the action with a message the
queue page shows. Note text is never logged.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from celery import shared_task

from core.deps import get_review_store as review_store
from core.documents import find_text_attachment
from core.review import feedback_document
from core.settings import get_settings
from mappings.context import context_from_document_reference
from mappings.mentions import CandidateCode, Mention
from mappings.review import (
    ReviewActionError,
    ReviewWrite,
    added_resource,
    confirmed_copy,
    corrected_copy,
    corrected_replacement,
    is_retired,
    rejected_copy,
    review_state,
    review_transaction,
)
from worker.ehr import EhrClient, EhrError, check_transaction_response

logger = logging.getLogger("fhir_ner.worker")

APPLY_ACTION = "worker.review_actions.apply_action"


def _without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    return {**{k: v for k, v in resource.items() if k != "meta"}, **({"meta": meta} if meta else {})}


def code_display(system: str, code: str) -> str | None:
    """The code's display from the profile's terminology, when it has that system loaded (else None)."""
    from worker.runtime import get_profile
    from worker.terminology import get_terminology

    try:
        service = get_terminology(get_profile())
        if service is None:
            return None
        for name in service.loaders:
            data = service.index(name).data
            if data.url == system:
                return next((e.display for e in data.entries if e.code == code and e.display), None)
    except Exception as error:  # noqa: BLE001 - a display is a nicety; the code is written without one
        logger.warning("no display for a reviewer's code (%s)", type(error).__name__)
    return None


def _mention(action: dict[str, Any], text: str) -> Mention:
    payload = action["payload"]
    start, end = int(payload["start"]), int(payload["end"])
    if not 0 <= start < end <= len(text):
        raise ReviewActionError("the span is outside the note text")
    codes: tuple[CandidateCode, ...] = ()
    if payload.get("code"):
        system, code = str(payload["system"]), str(payload["code"])
        codes = (CandidateCode(system, code, code_display(system, code), 1.0),)
    assertion = str((action.get("mention") or {}).get("assertion") or "present")
    return Mention(str(payload["label"]), start, end, text[start:end], 1.0, assertion=assertion, codes=codes)


def _update_or_unchanged(
    write: ReviewWrite, old: dict[str, Any], new: dict[str, Any], version: str | None
) -> ReviewWrite:
    """A PUT of ``new``, or, when the EHR holds it already (a rerun), only the Provenance's target."""
    if _without_server_meta(new) != _without_server_meta(old):
        return replace(write, updates=[(new, version)])
    return replace(write, unchanged=[f"{old['resourceType']}/{old['id']}"])


def plan_action(client: EhrClient, action: dict[str, Any], record: dict[str, Any], namespace: str) -> ReviewWrite:
    """What the action writes, from the EHR's current resource: nothing but the Provenance when a rerun finds
    the resource as the action leaves it."""
    from worker.runtime import get_profile

    kind = str(action["kind"])
    write = ReviewWrite(
        kind=kind,
        action_id=str(action["id"]),
        reviewer=str(action["reviewer"]),
        reviewer_reference=str(action["reviewer_reference"]) if action.get("reviewer_reference") else None,
        document_id=str(action["document"]),
        document_version=str(action["version"]),
    )
    old: dict[str, Any] | None = None
    if action.get("resource"):
        old = client.read(str(action["resource"]))
    version = str((old or {}).get("meta", {}).get("versionId") or "") or None
    if kind in ("confirm", "reject"):
        assert old is not None
        if kind == "reject":
            new = (
                old
                if (is_retired(old) and review_state(old, namespace) == "rejected")
                else rejected_copy(old, namespace)
            )
        else:
            new = confirmed_copy(old, namespace)
        return _update_or_unchanged(write, old, new, version)
    text = record.get("text")
    if text is None:
        raise ReviewActionError("the note text of this version is no longer held")
    document = client.read(f"DocumentReference/{action['document']}/_history/{action['version']}")
    attachment = find_text_attachment(document)
    context = context_from_document_reference(document, attachment.index if attachment else 0)
    mention = _mention(action, str(text))
    profile = get_profile()
    if kind == "add":
        return replace(write, creates=[added_resource(context, mention, profile, namespace)])
    assert old is not None
    if review_state(old, namespace) == "rejected" and is_retired(old):
        # A rerun of a correction that moved the finding to another resource type: the old resource stays
        # rejected, the new one is created (or found, by its identifier) again.
        replacement = corrected_replacement(old, context, mention, profile, namespace)
        if replacement is None:
            raise ReviewActionError("it is entered-in-error: a rejected resource cannot be corrected")
        return replace(write, creates=[replacement])
    corrected = corrected_copy(old, context, mention, profile, namespace)
    if isinstance(corrected, dict):
        return _update_or_unchanged(write, old, corrected, version)
    return replace(write, updates=[(rejected_copy(old, namespace), version)], creates=[corrected])


def _status(resource: dict[str, Any]) -> str:
    if resource.get("resourceType") == "Condition":
        return str((((resource.get("verificationStatus") or {}).get("coding")) or [{}])[0].get("code") or "")
    return str(resource.get("status") or "")


def _codes(resource: dict[str, Any]) -> list[dict[str, str]]:
    concept = resource.get("code") or ((resource.get("condition") or [{}])[0].get("code")) or {}
    return [
        {"system": str(c.get("system") or ""), "code": str(c.get("code") or ""), "display": str(c.get("display") or "")}
        for c in concept.get("coding") or []
    ]


def _patch_record(record: dict[str, Any], action: dict[str, Any], write: ReviewWrite, created: dict[str, str]) -> None:
    """The note view's record says what the EHR now holds after the action."""
    kind = action["kind"]
    mentions: list[dict[str, Any]] = record.setdefault("mentions", [])
    target = next(
        (m for m in mentions if action.get("resource") and m.get("resource") == action["resource"]),
        None,
    )
    for resource, _ in write.updates:
        reference = f"{resource['resourceType']}/{resource['id']}"
        for mention in mentions:
            if mention.get("resource") == reference:
                mention.update(status=_status(resource), reviewed=review_state_from(kind, resource))
                if kind == "correct" and not write.creates:
                    mention.update(codes=_codes(resource))
    if kind == "correct" and target is not None:
        payload = action["payload"]
        text = str(record.get("text") or "")
        target.update(
            label=payload["label"],
            start=int(payload["start"]),
            end=int(payload["end"]),
            text=text[int(payload["start"]) : int(payload["end"])],
            reviewed="corrected",
        )
        for item in write.creates:
            target.update(
                resource=created.get(item.identifier_value, target.get("resource")),
                resource_type=item.resource["resourceType"],
                mention_key=item.mention_key,
                status=_status(item.resource),
                codes=_codes(item.resource),
            )
    if kind == "add":
        for item in write.creates:
            reference = created.get(item.identifier_value)
            if any(m.get("resource") == reference for m in mentions):
                continue
            payload = action["payload"]
            text = str(record.get("text") or "")
            mentions.append(
                {
                    "index": len(mentions),
                    "label": payload["label"],
                    "start": int(payload["start"]),
                    "end": int(payload["end"]),
                    "text": text[int(payload["start"]) : int(payload["end"])],
                    "confidence": 1.0,
                    "assertion": "present",
                    "codes": _codes(item.resource),
                    "resource": reference,
                    "resource_type": item.resource["resourceType"],
                    "mention_key": item.mention_key,
                    "status": _status(item.resource),
                    "outcome": "written",
                    "reason": f"added by reviewer {action['reviewer']}",
                    "added_by": action["reviewer"],
                    "reviewed": "added",
                }
            )


def review_state_from(kind: str, resource: dict[str, Any]) -> str:
    return {"confirm": "confirmed", "reject": "rejected", "correct": "corrected", "add": "added"}.get(kind, kind)


def run_action(action_id: str) -> dict[str, Any] | None:
    """Apply one action; returns it as now recorded (None when there is no such action). Raises EhrError when
    the EHR is unavailable or the resource changed meanwhile (the task retries)."""
    settings = get_settings()
    store = review_store()
    action = store.action(action_id)
    if action is None:
        return None
    if settings.writeback_dir is not None:
        return store.update_action(action_id, state="failed", message="no EHR: this deployment writes to a folder")
    namespace = settings.identifier_namespace
    document_id, version_id = str(action["document"]), str(action["version"])
    record = store.records(document_id).get(version_id)
    if record is None:
        return store.update_action(action_id, state="failed", message="the note's review record is gone")
    client = EhrClient.from_settings(settings)
    try:
        write = plan_action(client, action, record, namespace)
        bundle = review_transaction(write, namespace, datetime.now(UTC).isoformat(timespec="seconds"))
        response = client.write(bundle, f"review-{action_id}")
        check_transaction_response(bundle, response)
    except ReviewActionError as error:
        return store.update_action(action_id, state="failed", message=str(error))
    except EhrError as error:
        if error.transient:
            raise
        return store.update_action(action_id, state="failed", message=str(error))
    finally:
        client.close()
    locations: list[str] = []
    for entry in response.get("entry") or []:
        location = str((entry.get("response") or {}).get("location") or "").split("/_history/")[0]
        locations.append("/".join(location.rstrip("/").split("/")[-2:]))
    sent = bundle["entry"]
    created: dict[str, str] = {}
    for item in write.creates:
        for sent_entry, location in zip(sent, locations, strict=False):
            if sent_entry.get("resource") is item.resource:
                created[item.identifier_value] = location
    provenance = locations[-1] if locations else None
    changes: dict[str, Any] = {"state": "done", "provenance": provenance, "message": None}
    if created:
        changes["created_resource"] = next(iter(created.values()))
    # The note's record first, then the action marked done: a page that shows the action done must show the
    # resource's new state too (the other order let a reload between the two show "done" beside "unconfirmed").
    record = store.records(document_id).get(version_id) or record
    _patch_record(record, action, write, created)
    store.put_record(document_id, version_id, record)
    done = store.update_action(action_id, **changes)
    store.put_feedback(document_id, feedback_document(record, store.actions(document_id)))
    logger.info("review action applied", extra={"review_action": action_id, "kind": action["kind"]})
    return done


@shared_task(name=APPLY_ACTION, bind=True, acks_late=True)
def apply_action(self: Any, action_id: str) -> None:
    try:
        run_action(action_id)
    except EhrError as error:
        settings = get_settings()
        if self.request.retries < settings.task_max_retries:
            from worker.tasks import retry_delay

            raise self.retry(
                countdown=retry_delay(self.request.retries), max_retries=settings.task_max_retries
            ) from None
        review_store().update_action(action_id, state="failed", message=f"the EHR did not take it: {error}")
