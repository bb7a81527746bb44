"""Mapping profiles: which mapper each label goes to, and with what parameters. Loaded from YAML."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mappings.mentions import Assertion
from mappings.registry import known_mappers
from mappings.terminology import BUILTIN_SYSTEMS


class ProfileError(ValueError):
    """A mapping profile that cannot be used; the message names the file and the problem."""


class CodeOptions(BaseModel):
    """Which code systems code a label's mentions, and how sure a match must be to be used."""

    model_config = ConfigDict(extra="forbid")

    systems: list[str] = Field(min_length=1)
    # Match score under which the resource carries code.text only. None: the threshold the terminology
    # calibrated for this label and system (the built-in linker's, chosen for >= 90% precision), else 0.92.
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    prefixes: dict[str, list[str]] = Field(default_factory=dict)
    all_systems: bool = False
    # Non-billable ICD-10-CM categories (E11, R31) may be written; by default a mention that names only the
    # category gets its "unspecified" billable leaf (E11.9, R31.9), and categories without one are never written.
    categories: bool = False


class CodeSystemSource(BaseModel):
    """A code system the integration engineer adds: a CSV or a FHIR CodeSystem JSON file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    file: str
    format: Literal["csv", "codesystem"] | None = None
    system: str | None = None

    @property
    def file_format(self) -> str:
        if self.format:
            return self.format
        return "csv" if self.file.lower().endswith(".csv") else "codesystem"

    @model_validator(mode="after")
    def _csv_needs_a_system(self) -> CodeSystemSource:
        if self.file_format == "csv" and not self.system:
            raise ValueError(f"code system {self.name}: a CSV needs `system` (the code system URL)")
        return self


class LabelMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mapper: str
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    below_threshold: Literal["drop", "text-only"] = "drop"
    params: dict[str, Any] = Field(default_factory=dict)
    codes: CodeOptions | None = None
    family: Literal["family-member-history", "drop"] | None = None
    drop_assertions: list[Assertion] = Field(default_factory=list)


class MappingProfile(BaseModel):
    """Label → mapper configuration, validated when the process starts."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    labels: dict[str, LabelMapping]
    family: Literal["family-member-history", "drop"] = "family-member-history"
    family_mapper: str = "family-member-history"
    code_systems: list[CodeSystemSource] = Field(default_factory=list)
    # Folder that relative code-system file paths are read from (the profile file's folder).
    base_dir: str | None = Field(default=None, exclude=True)

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

    @model_validator(mode="after")
    def _code_systems_exist(self) -> MappingProfile:
        custom = [source.name for source in self.code_systems]
        for name in custom:
            if name in BUILTIN_SYSTEMS:
                raise ValueError(f"code system {name!r} is built in; give yours another name")
            if custom.count(name) > 1:
                raise ValueError(f"code system {name!r} is declared twice")
        available = set(custom) | set(BUILTIN_SYSTEMS)
        for label, mapping in self.labels.items():
            if mapping.codes is None:
                continue
            for name in [*mapping.codes.systems, *mapping.codes.prefixes]:
                if name not in available:
                    raise ValueError(
                        f"label {label}: unknown code system {name!r} "
                        f"(built in: {', '.join(sorted(BUILTIN_SYSTEMS))}; declared: {', '.join(custom) or 'none'})"
                    )
        return self

    def custom_system_names(self) -> set[str]:
        return {source.name for source in self.code_systems}

    def family_action(self, label: str) -> str:
        mapping = self.labels[label]
        return mapping.family or self.family

    def code_system_path(self, source: CodeSystemSource) -> Path:
        path = Path(source.file).expanduser()
        if not path.is_absolute() and self.base_dir:
            path = Path(self.base_dir) / path
        return path


def parse_profile(data: Any, source: str = "<profile>", base_dir: Path | None = None) -> MappingProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a mapping profile must be a YAML mapping")
    if "base_dir" in data:
        raise ProfileError(f"{source}: invalid mapping profile: base_dir: not a profile field")
    try:
        return MappingProfile.model_validate({**data, "base_dir": str(base_dir) if base_dir else None})
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
        base_dir = None
    else:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as error:
            raise ProfileError(f"{file}: cannot read mapping profile ({error.strerror})") from None
        source = str(file)
        base_dir = file.resolve().parent
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ProfileError(f"{source}: not valid YAML ({error})") from None
    return parse_profile(data, source, base_dir)
