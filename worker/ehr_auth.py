"""How the worker authenticates to the EHR: a static bearer token, OAuth2 client credentials, or
SMART Backend Services (a ``private_key_jwt`` client assertion signed with RS384 or ES384).

Access tokens are cached until shortly before they expire and refreshed on demand; a 401 from the
EHR invalidates the cached token once so a revoked token is replaced rather than retried forever.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from functools import cache
from typing import Any, Protocol

import httpx

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REFRESH_MARGIN_SECONDS = 30.0


@cache
def shared_tls_context() -> ssl.SSLContext:
    """The verifying TLS context every EHR client of this process uses: httpx's default (certifi's CA bundle, or
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), made once. httpx builds one per client otherwise, reading the CA bundle
    each time: ~18 ms of CPU for each note's writer, a third of the I/O worker's CPU for a note. An SSL context is
    safe to share between threads and clients."""
    return httpx.create_ssl_context()


class EhrAuthError(RuntimeError):
    """The authorisation server refused us or answered nonsense; the message names no secret.

    ``status_code`` is the token endpoint's answer (None: unreachable): the EHR client turns an outage of the
    token endpoint (unreachable, 429, 5xx) into a retryable error, and a refusal (401, 400) into a final one.
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TokenProvider(Protocol):
    def token(self) -> str | None: ...

    def invalidate(self) -> None: ...


class NoAuth:
    def token(self) -> str | None:
        return None

    def invalidate(self) -> None:
        return None


class StaticBearer:
    def __init__(self, token: str) -> None:
        self._token = token

    def token(self) -> str | None:
        return self._token

    def invalidate(self) -> None:
        return None  # nothing to refresh: a static token is what it is


class _CachedTokenProvider:
    """Fetches an access token from a token endpoint and caches it until it is about to expire."""

    def __init__(self, token_url: str, scope: str | None, timeout: float = 10.0) -> None:
        self.token_url = token_url
        self.scope = scope
        self.timeout = timeout
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self.fetches = 0

    def _form(self) -> dict[str, str]:
        raise NotImplementedError

    def _auth(self) -> httpx.Auth | None:
        return None

    def token(self) -> str | None:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at - REFRESH_MARGIN_SECONDS:
                self._token, lifetime = self._fetch()
                self._expires_at = time.monotonic() + lifetime
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials", **self._form()}
        if self.scope:
            form["scope"] = self.scope
        try:
            response = httpx.post(
                self.token_url, data=form, auth=self._auth(), timeout=self.timeout, verify=shared_tls_context()
            )
        except httpx.HTTPError as error:
            raise EhrAuthError(f"token endpoint unreachable: {type(error).__name__}") from None
        self.fetches += 1
        if response.status_code != 200:
            raise EhrAuthError(f"token endpoint answered HTTP {response.status_code}", response.status_code)
        try:
            body: dict[str, Any] = response.json()
            access_token = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            raise EhrAuthError("token endpoint answered without an access_token") from None
        return access_token, float(body.get("expires_in") or 300)


class ClientCredentials(_CachedTokenProvider):
    """OAuth2 client credentials with a shared secret (HTTP Basic at the token endpoint)."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None) -> None:
        super().__init__(token_url, scope)
        self.client_id = client_id
        self._secret = client_secret

    def _form(self) -> dict[str, str]:
        return {}

    def _auth(self) -> httpx.Auth | None:
        return httpx.BasicAuth(self.client_id, self._secret)


class SmartBackendServices(_CachedTokenProvider):
    """SMART Backend Services: a short-lived JWT signed with our private key proves who we are."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        private_key_pem: str,
        key_id: str | None = None,
        algorithm: str = "RS384",
        scope: str | None = "system/DocumentReference.read system/*.write",
    ) -> None:
        if algorithm not in ("RS384", "ES384"):
            raise ValueError("SMART Backend Services signs with RS384 or ES384")
        super().__init__(token_url, scope)
        self.client_id = client_id
        self.key_id = key_id
        self.algorithm = algorithm
        self._key = private_key_pem

    def client_assertion(self) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": now + 300,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers = {"typ": "JWT", **({"kid": self.key_id} if self.key_id else {})}
        return str(jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers))

    def _form(self) -> dict[str, str]:
        return {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": self.client_assertion()}
