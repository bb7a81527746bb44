"""FHIR references and the one EHR we trust: everything we fetch must live under the configured base URL."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class OutsideEhrError(ValueError):
    """A URL that does not live under the configured EHR base URL."""


@dataclass(frozen=True)
class ResourceRef:
    resource_type: str
    id: str
    version: str | None = None

    @property
    def relative(self) -> str:
        return f"{self.resource_type}/{self.id}"

    @property
    def versioned(self) -> str:
        return f"{self.relative}/_history/{self.version}" if self.version else self.relative


def _origin(scheme: str, netloc: str) -> tuple[str, str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme.lower())
    except ValueError:
        port = -1
    if parts.username is not None or parts.password is not None:
        return scheme.lower(), "\0userinfo", port
    return scheme.lower(), (parts.hostname or "").lower(), port


def _clean_path(path: str) -> str:
    cleaned = posixpath.normpath(path or "/")
    return cleaned if cleaned.startswith("/") else "/" + cleaned


class EhrBase:
    """The configured FHIR base URL, and the test of whether a URL or reference lies under it."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        parts = urlsplit(self.base_url)
        self._origin = _origin(parts.scheme, parts.netloc)
        self._path = _clean_path(parts.path).rstrip("/")

    def resolve(self, url: str) -> str:
        """The absolute URL for ``url`` (relative to the base or absolute), or :class:`OutsideEhrError`."""
        if not isinstance(url, str) or not url or any(ch in url for ch in "\r\n\t\\") or url.startswith("//"):
            raise OutsideEhrError("not a usable URL")
        absolute = urljoin(self.base_url, url)
        parts = urlsplit(absolute)
        if parts.scheme.lower() not in ("http", "https") or _origin(parts.scheme, parts.netloc) != self._origin:
            raise OutsideEhrError("URL outside the configured EHR base URL")
        lowered = parts.path.lower()
        if any(s in (".", "..") for s in parts.path.split("/")) or "%2e" in lowered or "%2f" in lowered:
            raise OutsideEhrError("URL with dot segments")
        path = _clean_path(parts.path)
        if path != self._path and not path.startswith(self._path + "/"):
            raise OutsideEhrError("URL outside the configured EHR base URL")
        return absolute

    def contains(self, url: str) -> bool:
        try:
            self.resolve(url)
        except OutsideEhrError:
            return False
        return True

    def relative_path(self, url: str) -> str:
        """The part of an EHR URL after the base (``DocumentReference/1/_history/2``)."""
        absolute = self.resolve(url)
        path = _clean_path(urlsplit(absolute).path)
        return path[len(self._path) :].lstrip("/")


def parse_reference(reference: str, ehr: EhrBase | None = None) -> ResourceRef | None:
    """``Type/id[/_history/v]``, relative or absolute; None when it is not a resource reference at all.

    With ``ehr``, an absolute reference must lie under the EHR base URL (else :class:`OutsideEhrError`).
    """
    if not isinstance(reference, str) or not reference or reference.startswith(("urn:", "#")):
        return None
    path = reference.split("?", 1)[0].split("#", 1)[0]
    if "://" in path:
        path = ehr.relative_path(path) if ehr is not None else urlsplit(path).path
    segments = [s for s in path.split("/") if s]
    version = None
    if len(segments) >= 4 and segments[-2] == "_history":
        version = segments[-1]
        segments = segments[:-2]
    if len(segments) < 2:
        return None
    resource_type, resource_id = segments[-2], segments[-1]
    if not _TYPE.match(resource_type) or not _ID.match(resource_id):
        return None
    if version is not None and not _ID.match(version):
        return None
    return ResourceRef(resource_type, resource_id, version)
