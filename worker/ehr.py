"""Where results go: the EHR's FHIR base URL over HTTP, or a folder (the demo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import httpx

from adapter.settings import Settings

FHIR_JSON = "application/fhir+json"


class EhrError(RuntimeError):
    """The EHR refused or failed a request; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code

    @property
    def transient(self) -> bool:
        return self.status_code is None or self.status_code == 429 or self.status_code >= 500


class ResultWriter(Protocol):
    def write(self, bundle: dict[str, Any], name: str) -> dict[str, Any]: ...


class EhrClient:
    """A FHIR REST client bound to one base URL; it never follows a URL outside that base."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(headers=headers, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> EhrClient:
        token = settings.ehr_bearer_token.get_secret_value() if settings.ehr_bearer_token else None
        return cls(settings.ehr_base_url, token, settings.ehr_timeout_seconds)

    def url_for(self, path: str) -> str:
        url = urljoin(self.base_url, path)
        base = urlsplit(self.base_url)
        target = urlsplit(url)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc) or not target.path.startswith(base.path):
            raise EhrError("refusing to fetch a URL outside the configured EHR base URL", status_code=400)
        return url

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._client.request(method, self.url_for(path), json=body)
        except httpx.HTTPError as error:
            raise EhrError(f"{method} {path}: {type(error).__name__}") from None
        if response.status_code >= 400:
            raise EhrError(f"{method} {path}: HTTP {response.status_code}", response.status_code)
        result: dict[str, Any] = response.json() if response.content else {}
        return result

    def read(self, path: str) -> dict[str, Any]:
        return self._request("GET", path)

    def fetch_text(self, path: str) -> bytes:
        try:
            response = self._client.get(self.url_for(path), headers={"Accept": "*/*"})
        except httpx.HTTPError as error:
            raise EhrError(f"GET {path}: {type(error).__name__}") from None
        if response.status_code >= 400:
            raise EhrError(f"GET {path}: HTTP {response.status_code}", response.status_code)
        return response.content

    def write(self, bundle: dict[str, Any], name: str) -> dict[str, Any]:
        """POST a transaction Bundle to the base URL and return the transaction-response."""
        return self._request("POST", "", bundle)

    def close(self) -> None:
        self._client.close()


class FolderWriter:
    """Writes each transaction Bundle as JSON into a folder, instead of an EHR."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, bundle: dict[str, Any], name: str) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.json"
        path.write_text(json.dumps(bundle, indent=2, ensure_ascii=False), encoding="utf-8")
        return {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created", "location": str(path)}} for _ in bundle["entry"]],
        }
