"""Which resources a note version keeps, creates and retires, given what the EHR already holds for the note.

Pure: the worker searches the EHR (``_tag={namespace}/document|{note id}`` for each resource type) and
hands the results here. A found resource is ours only when it carries an identifier in our namespace *and*
its derivation reference points at a version of this very note; anything else is left alone.

- A live resource whose mention key the new version yields again is **kept** (it still says what the note
  says; no second copy is created).
- A live resource whose mention key the new version no longer yields is **retired** (entered-in-error).
- A mention whose key no live resource carries is **created**.
- A retracted note (``DocumentReference.status`` entered-in-error) retires every live resource.
- If the EHR holds resources derived from a *newer* version (numeric version ids), the note version being
  processed is stale (a late delivery): nothing is written.
- A reviewer's word wins (``mappings/review.py``, the ``{namespace}/review`` tag): a finding a reviewer rejected is
  never created again, whatever later versions say, and a resource a reviewer confirmed, corrected or added is
  kept even when the new version no longer yields it (only a retracted note retires it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mappings.identity import derivation_source, identifier_value, mention_key_system
from mappings.registry import get_retirement, retirable_types


@dataclass(frozen=True)
class DerivedResource:
    """A resource the EHR holds that was derived from a version of the note being processed."""

    resource: dict[str, Any]
    resource_type: str
    id: str
    version_id: str | None
    document_version: str | None
    mention_key: str | None
    retired: bool
    review: str | None = None  # the reviewer's tag: confirmed, rejected, corrected or added

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


def parse_derived(resource: dict[str, Any], namespace: str, document_id: str) -> DerivedResource | None:
    """The resource as one of ours derived from ``document_id``, or None when it is not."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or resource_type not in retirable_types() or not resource.get("id"):
        return None
    if identifier_value(resource, namespace) is None:
        return None
    source = derivation_source(resource)
    if source is None or source[0] != document_id:
        return None
    version_id = (resource.get("meta") or {}).get("versionId")
    return DerivedResource(
        resource=resource,
        resource_type=resource_type,
        id=str(resource["id"]),
        version_id=str(version_id) if version_id else None,
        document_version=source[1],
        mention_key=identifier_value(resource, mention_key_system(namespace)),
        retired=get_retirement(resource_type).is_retired(resource),
        review=_review_state(resource, namespace),
    )


def _review_state(resource: dict[str, Any], namespace: str) -> str | None:
    system = f"{namespace}/review"  # mappings.review.review_tag_system (that module imports this one)
    for tag in (resource.get("meta") or {}).get("tag") or []:
        if tag.get("system") == system and tag.get("code"):
            return str(tag["code"])
    return None


def parse_existing(resources: Iterable[dict[str, Any]], namespace: str, document_id: str) -> list[DerivedResource]:
    """Ours among the search results, each once, in a stable order."""
    found: dict[str, DerivedResource] = {}
    for resource in resources:
        derived = parse_derived(resource, namespace, document_id)
        if derived is not None:
            found.setdefault(derived.reference, derived)
    return [found[key] for key in sorted(found)]


def version_is_newer(candidate: str | None, than: str) -> bool:
    """True only when both versions are integers and ``candidate`` is the larger; other ids cannot be ordered."""
    if candidate is None or not candidate.isdigit() or not than.isdigit():
        return False
    return int(candidate) > int(than)


def newest_version(existing: Sequence[DerivedResource], than: str) -> str | None:
    newer = [e.document_version for e in existing if version_is_newer(e.document_version, than)]
    return max(newer, key=lambda v: int(v or 0)) if newer else None


@dataclass(frozen=True)
class Reconciliation:
    create: list[str]  # mention keys to create
    kept: list[DerivedResource]
    retire: list[DerivedResource]
    superseded_by: str | None = None


def reconcile(new_keys: Sequence[str], existing: Sequence[DerivedResource], version_id: str) -> Reconciliation:
    newer = newest_version(existing, version_id)
    if newer is not None:
        return Reconciliation(create=[], kept=[], retire=[], superseded_by=newer)
    live = [e for e in existing if not e.retired]
    wanted = set(new_keys)
    live_keys = {e.mention_key for e in live if e.mention_key}
    rejected = {e.mention_key for e in existing if e.review == "rejected" and e.mention_key}
    return Reconciliation(
        create=[key for key in new_keys if key not in live_keys and key not in rejected],
        kept=[e for e in live if e.mention_key in wanted or e.review],
        retire=[e for e in live if e.mention_key not in wanted and not e.review],
    )


def retired_copy(derived: DerivedResource) -> dict[str, Any]:
    return get_retirement(derived.resource_type).retire(derived.resource)
