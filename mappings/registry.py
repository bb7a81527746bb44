"""Mappers registered by name: a new label or resource type is a new mapper plus a profile line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mappings.context import DocumentContext
from mappings.mentions import Mention


class Mapper(Protocol):
    def __call__(
        self, mention: Mention, context: DocumentContext, params: dict[str, Any], code: dict[str, Any]
    ) -> dict[str, Any]:
        """Return the clinical core of one FHIR R4 resource (identifiers and traceability are added later)."""
        ...


_MAPPERS: dict[str, Mapper] = {}


def register_mapper(name: str) -> Callable[[Mapper], Mapper]:
    def decorate(mapper: Mapper) -> Mapper:
        if name in _MAPPERS:
            raise ValueError(f"mapper {name!r} is already registered")
        _MAPPERS[name] = mapper
        return mapper

    return decorate


def get_mapper(name: str) -> Mapper:
    try:
        return _MAPPERS[name]
    except KeyError:
        raise KeyError(f"unknown mapper {name!r}") from None


def known_mappers() -> set[str]:
    return set(_MAPPERS)
