"""Mapping profiles: which mapper each label goes to, and with what parameters. Loaded from YAML."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mappings.registry import known_mappers


class ProfileError(ValueError):
    """A mapping profile that cannot be used; the message names the file and the problem."""


class LabelMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mapper: str
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    below_threshold: Literal["drop", "text-only"] = "drop"
    params: dict[str, Any] = Field(default_factory=dict)


class MappingProfile(BaseModel):
    """Label → mapper configuration, validated when the process starts."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    labels: dict[str, LabelMapping]
    family: Literal["family-member-history", "drop"] = "family-member-history"
    family_mapper: str = "family-member-history"

    @model_validator(mode="after")
    def _mappers_exist(self) -> MappingProfile:
        known = known_mappers()
        for label, mapping in self.labels.items():
            if mapping.mapper not in known:
                raise ValueError(
                    f"label {label}: unknown mapper {mapping.mapper!r} (known: {', '.join(sorted(known))})"
                )
        if self.family == "family-member-history" and self.family_mapper not in known:
            raise ValueError(f"unknown family mapper {self.family_mapper!r}")
        return self


def parse_profile(data: Any, source: str = "<profile>") -> MappingProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a mapping profile must be a YAML mapping")
    try:
        return MappingProfile.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors())
        raise ProfileError(f"{source}: invalid mapping profile: {problems}") from None


def load_profile(path: Path | str | None = None) -> MappingProfile:
    """Load a profile file, or the built-in default when ``path`` is None."""
    # Importing the mappers registers them before the profile names are checked.
    import mappings.mappers  # noqa: F401

    if path is None:
        text = resources.files("mappings").joinpath("profiles/default.yaml").read_text(encoding="utf-8")
        source = "default profile"
    else:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as error:
            raise ProfileError(f"{file}: cannot read mapping profile ({error.strerror})") from None
        source = str(file)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ProfileError(f"{source}: not valid YAML ({error})") from None
    return parse_profile(data, source)
