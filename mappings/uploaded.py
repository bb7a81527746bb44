"""A mapping profile pasted or uploaded on the review playground (issue 16). Pure: YAML text in, profile out."""

from __future__ import annotations

import yaml

import mappings.mappers  # noqa: F401  (registers the mappers a profile names)
from mappings.profile import MappingProfile, ProfileError, parse_profile

SOURCE = "uploaded profile"


def parse_uploaded_profile(text: str) -> MappingProfile:
    """The profile, or a :class:`ProfileError` worded as ``fhir-ner extract --profile`` words it.

    It may not name code-system files: those would be read from the server's disk."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ProfileError(f"{SOURCE}: not valid YAML ({error})") from None
    if isinstance(data, dict) and data.get("code_systems"):
        raise ProfileError(f"{SOURCE}: code_systems: files cannot be uploaded here; use the built-in code systems")
    return parse_profile(data, SOURCE)
