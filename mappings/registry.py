"""Mappers registered by name: a new label or resource type is a new mapper plus a profile line.

Each mapper declares the resource type it produces, and each resource type that mappers produce has a
retirement rule: how a resource of that type is marked ``entered-in-error`` when the note no longer says it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mappings.context import DocumentContext
from mappings.mentions import Mention


class Mapper(Protocol):
    def __call__(
        self, mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
    ) -> dict[str, Any]:
        """Return the clinical core of one FHIR R4 resource (identifiers and traceability are added later)."""
        ...


@dataclass(frozen=True)
class Retirement:
    """How to mark a resource type entered-in-error, and how to tell that it already is."""

    retire: Callable[[dict[str, Any]], dict[str, Any]]
    is_retired: Callable[[dict[str, Any]], bool]


_MAPPERS: dict[str, Mapper] = {}
_RESOURCE_TYPES: dict[str, str] = {}
_RETIREMENTS: dict[str, Retirement] = {}


def register_mapper(name: str, resource_type: str) -> Callable[[Mapper], Mapper]:
    def decorate(mapper: Mapper) -> Mapper:
        if name in _MAPPERS:
            raise ValueError(f"mapper {name!r} is already registered")
        _MAPPERS[name] = mapper
        _RESOURCE_TYPES[name] = resource_type
        return mapper

    return decorate


def register_retirement(
    resource_type: str, retire: Callable[[dict[str, Any]], dict[str, Any]], is_retired: Callable[[dict[str, Any]], bool]
) -> None:
    if resource_type in _RETIREMENTS:
        raise ValueError(f"a retirement rule for {resource_type} is already registered")
    _RETIREMENTS[resource_type] = Retirement(retire, is_retired)


def get_mapper(name: str) -> Mapper:
    try:
        return _MAPPERS[name]
    except KeyError:
        raise KeyError(f"unknown mapper {name!r}") from None


def mapper_resource_type(name: str) -> str:
    return _RESOURCE_TYPES[name]


def known_mappers() -> set[str]:
    return set(_MAPPERS)


def get_retirement(resource_type: str) -> Retirement:
    try:
        return _RETIREMENTS[resource_type]
    except KeyError:
        raise KeyError(f"no retirement rule for {resource_type}: register one beside its mapper") from None


def retirable_types() -> list[str]:
    """Every resource type a derived resource may have: what the write-back searches when a note changes."""
    return sorted(_RETIREMENTS)
