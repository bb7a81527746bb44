"""Where results go: the EHR's FHIR base URL over HTTP, or a folder (the demo)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import httpx

from core.settings import Settings
from worker.ehr_auth import (
    ClientCredentials,
    EhrAuthError,
    NoAuth,
    SmartBackendServices,
    StaticBearer,
    TokenProvider,
    shared_tls_context,
)
from worker.resilience import CircuitBreaker, CircuitOpenError, RetryPolicy

FHIR_JSON = "application/fhir+json"


class EhrError(RuntimeError):
    """The EHR refused or failed a request; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code

    @property
    def transient(self) -> bool:
        # 409/412: a derived resource changed between our search and our transaction; search again and retry.
        return self.status_code is None or self.status_code in (409, 412, 429) or self.status_code >= 500


class ResultWriter(Protocol):
    def write(self, bundle: dict[str, Any], name: str) -> dict[str, Any]: ...

    def derived_resources(
        self, namespace: str, document_id: str, resource_types: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Every resource the EHR holds that carries the note's document tag (see mappings/identity.py)."""
        ...


@dataclass
class TransactionOutcome:
    """A transaction-response read entry by entry: what was created, found already there, or updated."""

    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def _location(response: dict[str, Any]) -> str:
    """``Type/id`` of a response entry (its ``location`` without base URL and history)."""
    location = str(response.get("location") or "")
    head = location.split("/_history/")[0].rstrip("/")
    parts = head.split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else head


def check_transaction_response(bundle: dict[str, Any], response: dict[str, Any]) -> TransactionOutcome:
    """Check the EHR's answer entry by entry; a missing or failed entry is an error, never a silent loss."""
    if response.get("resourceType") != "Bundle" or response.get("type") != "transaction-response":
        raise EhrError(f"the EHR answered the transaction with {response.get('resourceType')}/{response.get('type')}")
    sent = bundle.get("entry") or []
    answered = response.get("entry") or []
    if len(answered) != len(sent):
        raise EhrError(f"the EHR answered {len(answered)} of {len(sent)} transaction entries")
    outcome = TransactionOutcome()
    for index, (request_entry, response_entry) in enumerate(zip(sent, answered, strict=True)):
        result = response_entry.get("response") or {}
        status = str(result.get("status") or "").strip()
        code = status.split(" ", 1)[0]
        if not code.isdigit() or not 200 <= int(code) < 300:
            raise EhrError(f"transaction entry {index} ({request_entry['request']['url']}): status {status or 'none'}")
        method = request_entry["request"]["method"]
        location = _location(result) or str(request_entry["request"]["url"])
        if method == "PUT":
            outcome.updated.append(location)
        elif code == "201":
            outcome.created.append(location)
        else:  # 200 on a conditional create: the resource was already there
            outcome.existing.append(location)
    return outcome


def _resolve_references(node: Any, resolved: dict[str, str]) -> Any:
    """A copy of ``node`` with every ``reference`` to an already written entry's fullUrl replaced by its id."""
    if isinstance(node, dict):
        return {
            key: resolved.get(value, value)
            if key == "reference" and isinstance(value, str)
            else _resolve_references(value, resolved)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_resolve_references(item, resolved) for item in node]
    return node


def write_in_parts(
    post: Callable[[dict[str, Any]], dict[str, Any]], bundle: dict[str, Any], max_entries: int | None
) -> dict[str, Any]:
    """POST ``bundle`` as one transaction, or, over ``max_entries``, as consecutive transactions in order.

    Some EHRs cap transactions (Medplum: 8 entries when any create is conditional). Entries keep their order
    (the Device first, the resources, then the Provenance that points at them), and a part's references to
    entries written by an earlier part are rewritten to the ids the EHR gave them. Every create is
    conditional on its identifier, so if a part fails, running the job again completes the write without
    duplicates.
    """
    entries = list(bundle.get("entry") or [])
    if max_entries is None or len(entries) <= max_entries:
        return post(bundle)
    resolved: dict[str, str] = {}
    answered: list[dict[str, Any]] = []
    for start in range(0, len(entries), max_entries):
        part_entries = [_resolve_references(entry, resolved) for entry in entries[start : start + max_entries]]
        response = post({**bundle, "entry": part_entries})
        check_transaction_response({"entry": part_entries}, response)
        for sent, got in zip(part_entries, response.get("entry") or [], strict=True):
            location = _location(got.get("response") or {})
            if sent.get("fullUrl") and location:
                resolved[str(sent["fullUrl"])] = location
        answered.extend(response.get("entry") or [])
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": answered}


def token_provider(settings: Settings) -> TokenProvider:
    """The configured way to authenticate to the EHR; a missing secret is a clear configuration error."""
    if settings.ehr_auth == "bearer":
        return StaticBearer(settings.ehr_bearer_token.get_secret_value()) if settings.ehr_bearer_token else NoAuth()
    if not settings.ehr_token_url or not settings.ehr_client_id:
        raise ValueError(
            f"FHIR_NER_EHR_AUTH={settings.ehr_auth} needs FHIR_NER_EHR_TOKEN_URL and FHIR_NER_EHR_CLIENT_ID"
        )
    if settings.ehr_auth == "client-credentials":
        if settings.ehr_client_secret is None:
            raise ValueError("FHIR_NER_EHR_AUTH=client-credentials needs FHIR_NER_EHR_CLIENT_SECRET")
        return ClientCredentials(
            settings.ehr_token_url,
            settings.ehr_client_id,
            settings.ehr_client_secret.get_secret_value(),
            settings.ehr_scope,
        )
    if settings.ehr_private_key_file is None:
        raise ValueError("FHIR_NER_EHR_AUTH=smart-backend needs FHIR_NER_EHR_PRIVATE_KEY_FILE")
    return SmartBackendServices(
        settings.ehr_token_url,
        settings.ehr_client_id,
        settings.ehr_private_key_file.read_text(encoding="utf-8"),
        key_id=settings.ehr_key_id,
        algorithm=settings.ehr_jwt_algorithm,
        scope=settings.ehr_scope or "system/DocumentReference.read system/*.write",
    )


class EhrClient:
    """A FHIR REST client bound to one base URL; it never follows a URL outside that base."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        auth: TokenProvider | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        max_transaction_entries: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.max_transaction_entries = max_transaction_entries
        self._client = httpx.Client(
            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}, timeout=timeout, verify=shared_tls_context()
        )
        self.auth: TokenProvider = auth or (StaticBearer(token) if token else NoAuth())
        self.retry = retry or RetryPolicy(attempts=1)
        self.breaker = breaker

    @classmethod
    def from_settings(cls, settings: Settings) -> EhrClient:
        """Auth, retries and the shared circuit breaker as configured; secrets only from settings."""
        from core.deps import get_redis

        return cls(
            settings.ehr_base_url,
            timeout=settings.ehr_timeout_seconds,
            auth=token_provider(settings),
            retry=RetryPolicy(attempts=settings.ehr_retry_attempts, max_delay=settings.ehr_retry_max_delay),
            breaker=CircuitBreaker(
                get_redis(),
                f"{settings.key_prefix}:ehr-breaker",
                threshold=settings.ehr_breaker_threshold,
                cooldown=settings.ehr_breaker_cooldown,
            ),
            max_transaction_entries=settings.ehr_max_transaction_entries,
        )

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One logical request: retried on 429 (Retry-After), 5xx and network errors with backoff and jitter;
        a 401 refreshes the access token once; the shared breaker stops calls while the EHR is down."""
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            if self.breaker is not None:
                try:
                    self.breaker.check()
                except CircuitOpenError as error:
                    raise EhrError(str(error)) from None
            headers = dict(kwargs.pop("headers", None) or {})
            try:
                token = self.auth.token()
            except EhrAuthError as error:  # token endpoint down: retry the job later; refused: final
                raise EhrError(str(error), error.status_code) from None
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                response = self._client.request(method, url, headers=headers, **kwargs)
            except httpx.HTTPError as error:
                failure: str = type(error).__name__
                response = None
            else:
                failure = f"HTTP {response.status_code}"
            kwargs["headers"] = headers
            if response is not None and response.status_code == 401 and not refreshed:
                refreshed = True
                self.auth.invalidate()
                continue
            transient = response is None or response.status_code == 429 or response.status_code >= 500
            if not transient:
                if self.breaker is not None:
                    self.breaker.record_success()
                assert response is not None
                return response
            if self.breaker is not None:
                self.breaker.record_failure()
            if attempt >= self.retry.attempts:
                if response is None:
                    raise EhrError(f"{method} {urlsplit(url).path}: {failure}")
                return response
            time.sleep(self.retry.delay(attempt, response.headers.get("Retry-After") if response else None))

    def url_for(self, path: str) -> str:
        url = urljoin(self.base_url, path)
        base = urlsplit(self.base_url)
        target = urlsplit(url)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc) or not target.path.startswith(base.path):
            raise EhrError("refusing to fetch a URL outside the configured EHR base URL", status_code=400)
        return url

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        response = self._send(method, self.url_for(path), json=body, params=params)
        if response.status_code >= 400:
            raise EhrError(f"{method} {path}: HTTP {response.status_code}", response.status_code)
        result: dict[str, Any] = response.json() if response.content else {}
        return result

    def read(self, path: str) -> dict[str, Any]:
        return self._request("GET", path)

    def fetch_text(self, path: str) -> bytes:
        response = self._send("GET", self.url_for(path), headers={"Accept": "*/*"})
        if response.status_code >= 400:
            raise EhrError(f"GET {path}: HTTP {response.status_code}", response.status_code)
        return response.content

    def respond(
        self, method: str, path: str, headers: dict[str, str] | None = None, params: dict[str, str] | None = None
    ) -> httpx.Response:
        """A request whose status and headers the caller reads itself (Bulk Data kick-off, status polling)."""
        return self._send(method, self.url_for(path), headers=dict(headers or {}), params=params)

    def stream_lines(self, path: str) -> Iterator[str]:
        """The lines of a (large) response body as they arrive: one request, no retries (the caller resumes)."""
        url = self.url_for(path)
        headers = {"Accept": "application/fhir+ndjson"}
        token = self.auth.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with self._client.stream("GET", url, headers=headers) as response:
            if response.status_code >= 400:
                raise EhrError(f"GET {urlsplit(url).path}: HTTP {response.status_code}", response.status_code)
            yield from response.iter_lines()

    def write(self, bundle: dict[str, Any], name: str) -> dict[str, Any]:
        """POST a transaction Bundle to the base URL and return the transaction-response.

        An EHR that caps transaction size (``FHIR_NER_EHR_MAX_TRANSACTION_ENTRIES``) gets consecutive parts
        (:func:`write_in_parts`); the answer is then one transaction-response covering every entry.
        """
        return write_in_parts(lambda part: self._request("POST", "", part), bundle, self.max_transaction_entries)

    def search(self, resource_type: str, params: dict[str, str], max_pages: int = 100) -> list[dict[str, Any]]:
        """All matches of a search, following ``next`` links (which must stay inside the base URL)."""
        found: list[dict[str, Any]] = []
        page = self._request("GET", resource_type, params=params)
        for _ in range(max_pages):
            found.extend(entry["resource"] for entry in page.get("entry") or [] if entry.get("resource"))
            following = next(
                (link.get("url") for link in page.get("link") or [] if link.get("relation") == "next"), None
            )
            if not following:
                return found
            page = self._request("GET", following)
        raise EhrError(f"search {resource_type} has more than {max_pages} pages", status_code=400)

    def derived_resources(
        self, namespace: str, document_id: str, resource_types: Sequence[str]
    ) -> list[dict[str, Any]]:
        from mappings.identity import document_tag_system

        tag = f"{document_tag_system(namespace)}|{document_id}"
        found: list[dict[str, Any]] = []
        for resource_type in resource_types:
            found.extend(self.search(resource_type, {"_tag": tag, "_count": "200"}))
        return found

    def close(self) -> None:
        self._client.close()


def _folder_location(entry: dict[str, Any], path: Path) -> str:
    """``Type/uuid`` from the entry's urn:uuid fullUrl, so the status names resources as an EHR would."""
    full_url = str(entry.get("fullUrl") or "")
    kind = str(entry.get("request", {}).get("url") or "").split("?")[0]
    return f"{kind}/{full_url.rsplit(':', 1)[-1]}" if full_url.startswith("urn:uuid:") else str(path)


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
            "entry": [
                {"response": {"status": "201 Created", "location": _folder_location(entry, path)}}
                for entry in bundle["entry"]
            ],
        }

    def derived_resources(
        self, namespace: str, document_id: str, resource_types: Sequence[str]
    ) -> list[dict[str, Any]]:
        return []  # no EHR to look in: every note version is written as if it were the first
