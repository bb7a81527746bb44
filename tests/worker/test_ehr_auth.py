"""EHR authentication against a real token endpoint on loopback that verifies what we send."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from worker.ehr_auth import CLIENT_ASSERTION_TYPE, ClientCredentials, EhrAuthError, SmartBackendServices, StaticBearer


class TokenServer:
    """A minimal OAuth2 token endpoint: checks Basic credentials or a signed client assertion."""

    def __init__(self) -> None:
        self.public_key: Any = None
        self.requests: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:  # noqa: N802
                form = {
                    k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()
                }
                server.requests.append({"form": form, "authorization": self.headers.get("Authorization")})
                status, body = server.answer(form, self.headers.get("Authorization"), self.path)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, form: dict[str, str], authorization: str | None, path: str) -> tuple[int, dict[str, Any]]:
        if self.fail_with:
            return self.fail_with, {"error": "server_error"}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        if "client_assertion" in form:
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                return 400, {"error": "invalid_client"}
            try:
                claims = jwt.decode(
                    form["client_assertion"], self.public_key, algorithms=["RS384", "ES384"], audience=self.url
                )
            except jwt.PyJWTError:
                return 401, {"error": "invalid_client"}
            if claims["iss"] != "adapter" or claims["sub"] != "adapter" or not claims.get("jti"):
                return 401, {"error": "invalid_client"}
        elif authorization != "Basic " + base64.b64encode(b"adapter:s3cret").decode():
            return 401, {"error": "invalid_client"}
        return 200, {"access_token": f"token-{len(self.requests)}", "token_type": "bearer", "expires_in": 300}

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture()
def token_server() -> Iterator[TokenServer]:
    server = TokenServer()
    yield server
    server.close()


def test_static_bearer_is_passed_through() -> None:
    assert StaticBearer("abc").token() == "abc"


def test_client_credentials_fetches_once_caches_and_refreshes_after_invalidate(token_server: TokenServer) -> None:
    provider = ClientCredentials(token_server.url, "adapter", "s3cret", scope="system/*.read")
    assert provider.token() == "token-1"
    assert provider.token() == "token-1"
    assert provider.fetches == 1
    assert token_server.requests[0]["form"]["scope"] == "system/*.read"
    provider.invalidate()
    assert provider.token() == "token-2"


def test_wrong_secret_and_server_errors_raise_without_leaking_the_secret(token_server: TokenServer) -> None:
    with pytest.raises(EhrAuthError, match="HTTP 401") as error:
        ClientCredentials(token_server.url, "adapter", "wrong").token()
    assert "wrong" not in str(error.value)
    token_server.fail_with = 503
    with pytest.raises(EhrAuthError, match="HTTP 503"):
        ClientCredentials(token_server.url, "adapter", "s3cret").token()


def _pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_smart_backend_services_client_assertion_is_accepted(token_server: TokenServer, algorithm: str) -> None:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS384"
        else ec.generate_private_key(ec.SECP384R1())
    )
    token_server.public_key = key.public_key()
    provider = SmartBackendServices(token_server.url, "adapter", _pem(key), key_id="k1", algorithm=algorithm)
    assert provider.token() == "token-1"
    assertion = token_server.requests[0]["form"]["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == algorithm and header["kid"] == "k1"
    assert token_server.requests[0]["authorization"] is None  # the assertion is the credential


def test_smart_backend_services_with_the_wrong_key_is_refused(token_server: TokenServer) -> None:
    token_server.public_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EhrAuthError, match="HTTP 401"):
        SmartBackendServices(token_server.url, "adapter", _pem(other)).token()
    with pytest.raises(ValueError, match="RS384 or ES384"):
        SmartBackendServices(token_server.url, "adapter", _pem(other), algorithm="HS256")


def test_a_token_endpoint_outage_is_retryable_and_a_refusal_is_not(token_server: TokenServer) -> None:
    from worker.ehr import EhrClient, EhrError

    token_server.fail_with = 503
    client = EhrClient("http://127.0.0.1:9/fhir", auth=ClientCredentials(token_server.url, "adapter", "s3cret"))
    with pytest.raises(EhrError, match="HTTP 503") as outage:
        client.read("Patient/1")
    assert outage.value.transient  # the job is retried later, not dead-lettered at once
    token_server.fail_with = None
    refused = EhrClient("http://127.0.0.1:9/fhir", auth=ClientCredentials(token_server.url, "adapter", "wrong"))
    with pytest.raises(EhrError, match="HTTP 401") as refusal:
        refused.read("Patient/1")
    assert not refusal.value.transient
    unreachable = EhrClient("http://127.0.0.1:9/fhir", auth=ClientCredentials("http://127.0.0.1:9/token", "a", "b"))
    with pytest.raises(EhrError, match="unreachable") as down:
        unreachable.read("Patient/1")
    assert down.value.transient
