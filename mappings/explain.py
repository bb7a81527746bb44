"""Why a mention did or did not become a resource, for the review pages. Pure: mentions and a profile in.

It mirrors the profile's filters in ``mappings/bundle.py`` (``_select``) and says which one applied, in words a
reviewer can act on: not in the profile, dropped by the profile for its assertion, family mention dropped,
below the label's confidence threshold (dropped, or kept as text only), or the same finding already written.
"""

from __future__ import annotations

from mappings.mentions import Mention
from mappings.profile import MappingProfile


def why_not_mapped(mention: Mention, profile: MappingProfile) -> str | None:
    """The reason the profile drops ``mention``, or None when it is mapped."""
    mapping = profile.labels.get(mention.label)
    if mapping is None:
        return f"dropped by profile: label {mention.label} is not in profile {profile.name}"
    if mention.assertion in mapping.drop_assertions:
        return f"dropped by profile: {mention.assertion} mentions of {mention.label} are not written"
    if mention.confidence < mapping.min_confidence and mapping.below_threshold == "drop":
        return f"below threshold: confidence {mention.confidence:.2f} < {mapping.min_confidence:.2f}"
    if mention.assertion == "family" and profile.family_action(mention.label) == "drop":
        return "dropped by profile: family mentions are not written"
    return None


def text_only_reason(mention: Mention, profile: MappingProfile) -> str | None:
    """Why a mapped mention carries ``code.text`` only (below the threshold, profile says text-only)."""
    mapping = profile.labels.get(mention.label)
    if mapping is not None and mention.confidence < mapping.min_confidence:
        return f"below threshold: confidence {mention.confidence:.2f} < {mapping.min_confidence:.2f}, text only"
    return None
