"""SMART App Launch (EHR launch) of the review pages (issue 16): the API against the test EHR's authorization server
(``tests/ehr/smart.mjs``): launch, PKCE, one-use state, the id_token checked against the EHR's JWKS, and a session
limited to the patient in context. Every failure is a page and no session."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from test_review_pages import NOTE_TEXT, seed_note

CLIENT_ID = "fhir-ner-review"
REDIRECT = "http://testserver/review/launch/callback"
DOCTOR = ("Practitioner/prac-1", "Dr Eva Launch")


@pytest.fixture()
def launch_env(app_env: dict[str, str], ehr: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from core.deps import reset_dependencies

    env = {
        "FHIR_NER_EHR_BASE_URL": ehr.base_url,
        "FHIR_NER_SMART_CLIENT_ID": CLIENT_ID,
        "FHIR_NER_SMART_REDIRECT_URL": REDIRECT,
        "FHIR_NER_RECOVERY_CHECK_SECONDS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FHIR_NER_REVIEW_TOKENS", raising=False)
    reset_dependencies()
    ehr.smart_client(CLIENT_ID, [REDIRECT])
    return {**app_env, **env}


@pytest.fixture()
def client(launch_env: dict[str, str]) -> Iterator[TestClient]:
    from adapter.app import create_app

    with TestClient(create_app(), follow_redirects=False) as test_client:
        yield test_client


def start(client: TestClient, ehr: Any, launch: str, iss: str | None = None) -> tuple[httpx.Response, dict[str, str]]:
    """/review/launch, then the EHR's authorize endpoint: (the adapter's redirect, the callback's query)."""
    response = client.get("/review/launch", params={"iss": iss or ehr.base_url, "launch": launch})
    assert response.status_code == 302, response.text
    back = httpx.get(response.headers["location"], follow_redirects=False, timeout=10)
    assert back.status_code == 302, back.text
    location = back.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return response, {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def sessions(launch_env: dict[str, str]) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(launch_env["FHIR_NER_REDIS_URL"])
    keys = client.keys(f"{launch_env['FHIR_NER_KEY_PREFIX']}:review:session:*")
    return [json.loads(client.get(key) or "{}") for key in keys]


def test_a_launch_from_the_ehr_opens_that_patients_view_as_the_practitioner(
    client: TestClient, ehr: Any, launch_env: dict[str, str]
) -> None:
    seed_note("note-1")
    launch = ehr.smart_launch("p-1", *DOCTOR)
    redirect, back = start(client, ehr, launch)

    asked = parse_qs(urlsplit(redirect.headers["location"]).query)
    assert redirect.headers["location"].startswith(f"{ehr.root_url}/smart/authorize?")
    assert {k: v[0] for k, v in asked.items() if k not in ("state", "code_challenge")} == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "scope": "launch openid fhirUser patient/*.rs",
        "aud": ehr.base_url,
        "launch": launch,
        "code_challenge_method": "S256",
    }
    assert back["state"] == asked["state"][0] and "code" in back

    landed = client.get("/review/launch/callback", params=back)
    assert landed.status_code == 200, landed.text
    assert landed.headers["refresh"] == "0; url=/review/patients/p-1"
    cookie = landed.headers["set-cookie"]
    assert "fhir_ner_review=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    # PKCE: the token endpoint got the verifier whose S256 is the challenge sent to authorize; a public client.
    token_form = ehr.smart_log()["token"][-1]["form"]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(token_form["code_verifier"].encode()).digest()).rstrip(b"=")
    assert challenge.decode() == asked["code_challenge"][0]
    assert token_form["client_id"] == CLIENT_ID and token_form["redirect_uri"] == REDIRECT

    view = client.get("/review/patients/p-1")
    assert view.status_code == 200
    assert "Dr Eva Launch" in view.text and "neumonía" in view.text
    policy = view.headers["content-security-policy"]
    assert f"frame-ancestors 'self' {ehr.root_url}" in policy and "script-src 'self'" in policy
    assert "x-frame-options" not in view.headers
    [session] = sessions(launch_env)
    assert session["smart"] is True and session["fhir_user"] == "Practitioner/prac-1" and session["patient"] == "p-1"

    # The session sees that patient only: the queue sends it to the patient view, others are refused.
    assert client.get("/review").headers["location"] == "/review/patients/p-1"
    assert client.get("/review/notes/note-1").status_code == 200
    seed_note("note-2")
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    store = ReviewStore(get_redis(), get_settings().key_prefix)
    other = {**store.records("note-2")["1"], "subject": "Patient/p-2"}
    store.put_record("note-2", "1", other)
    refused = client.get("/review/notes/note-2")
    assert refused.status_code == 403 and NOTE_TEXT not in refused.text
    assert client.get("/review/patients/p-2").status_code == 403

    # A reviewer action carries the Practitioner for the Provenance.
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/review/notes/note-1").text)
    assert csrf
    done = client.post(
        "/review/notes/note-1/actions",
        data={"csrf": csrf.group(1), "version": "1", "kind": "confirm", "resource": "Condition/c1"},
    )
    assert done.status_code == 303
    [action] = store.actions("note-1")
    assert action["reviewer"] == "Dr Eva Launch" and action["reviewer_reference"] == "Practitioner/prac-1"

    # The state was good once.
    again = client.get("/review/launch/callback", params=back)
    assert again.status_code == 400 and "used already" in again.text
    assert "fhir_ner_review=" not in again.headers.get("set-cookie", "")


def test_the_provenance_names_the_launched_practitioner() -> None:
    from mappings.review import ReviewWrite, review_transaction

    write = ReviewWrite("confirm", "a1", "Dr Eva Launch", "note-1", "1", reviewer_reference="Practitioner/prac-1")
    bundle = review_transaction(write, "urn:fhir-ner-adapter:test", "2026-11-29T00:00:00Z")
    provenance = bundle["entry"][-1]["resource"]
    assert provenance["agent"][0]["who"] == {"reference": "Practitioner/prac-1", "display": "Dr Eva Launch"}


def test_another_iss_is_refused_before_anything_is_asked(
    client: TestClient, ehr: Any, launch_env: dict[str, str]
) -> None:
    launch = ehr.smart_launch("p-1", *DOCTOR)
    for iss in (
        "https://evil.example/fhir/R4",
        ehr.base_url.replace("/fhir/R4", "/fhir/R5"),
        ehr.root_url,
        f"{ehr.base_url}?x=1",
        f"{ehr.base_url}#x",
        ehr.base_url.replace("http://", "http://user@"),
        "",
    ):
        response = client.get("/review/launch", params={"iss": iss, "launch": launch})
        assert response.status_code == 403, iss
        assert "does not serve" in response.text and "location" not in response.headers
    assert ehr.smart_log()["authorize"] == []
    store = redis.Redis.from_url(launch_env["FHIR_NER_REDIS_URL"])
    assert not store.keys(f"{launch_env['FHIR_NER_KEY_PREFIX']}:review:launch:*")


def test_a_tampered_or_missing_state_or_another_browser_opens_no_session(
    client: TestClient, ehr: Any, launch_env: dict[str, str]
) -> None:
    _, back = start(client, ehr, ehr.smart_launch("p-1", *DOCTOR))
    for state in (back["state"][:-2] + "xx", "", "x" * 200):
        response = client.get("/review/launch/callback", params={**back, "state": state})
        assert response.status_code == 400 and "expired or was used already" in response.text
    # Started in this browser; the callback arrives in another one (no launch cookie): refused, and spent.
    client.cookies.clear()
    response = client.get("/review/launch/callback", params=back)
    assert response.status_code == 403 and "another browser" in response.text
    assert sessions(launch_env) == []
    assert ehr.smart_log()["token"] == []


def test_pkce_a_code_of_another_launch_is_refused_by_the_token_endpoint(
    client: TestClient, ehr: Any, launch_env: dict[str, str]
) -> None:
    _, first = start(client, ehr, ehr.smart_launch("p-1", *DOCTOR))
    _, second = start(TestClient(client.app, follow_redirects=False), ehr, ehr.smart_launch("p-1", *DOCTOR))
    # The first launch's state (its verifier) with another browser's code: the verifier does not match its challenge.
    response = client.get("/review/launch/callback", params={"code": second["code"], "state": first["state"]})
    assert response.status_code == 502 and "invalid_grant" in response.text
    assert "fhir_ner_review=" not in response.headers.get("set-cookie", "")
    assert sessions(launch_env) == []


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"tokenError": "access_denied"}, "refused the authorization code (HTTP 400: access_denied)"),
        ({"claims": {"aud": "another-app"}}, "InvalidAudienceError"),
        ({"claims": {"iss": "https://evil.example/fhir"}}, "InvalidIssuerError"),
        ({"claims": {"exp": 1_000_000}}, "ExpiredSignatureError"),
        ({"claims": {"fhirUser": "https://evil.example/fhir/Practitioner/x"}}, "no fhirUser of this EHR"),
        ({"user": "Patient/p-1"}, "Only clinicians"),
    ],
)
def test_a_token_or_id_token_that_does_not_check_out_opens_no_session(
    client: TestClient, ehr: Any, launch_env: dict[str, str], extra: dict[str, Any], said: str
) -> None:
    user, name = DOCTOR
    launch = ehr.smart_launch("p-1", extra.pop("user", user), name, **extra)
    _, back = start(client, ehr, launch)
    response = client.get("/review/launch/callback", params=back)
    assert response.status_code in (403, 502)
    assert said in response.text, response.text
    assert "fhir_ner_review=" not in response.headers.get("set-cookie", "")
    assert sessions(launch_env) == []


def test_an_id_token_signed_by_another_key_is_refused(client: TestClient, ehr: Any, launch_env: dict[str, str]) -> None:
    """The signature is checked: an id_token re-signed with a key of our own (same kid) does not pass."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from adapter.review.smart import LaunchError, _id_token_claims
    from core.settings import get_settings

    settings = get_settings()
    jwks_uri = f"{ehr.root_url}/smart/jwks"
    kid = httpx.get(jwks_uri).json()["keys"][0]["kid"]
    pending = {"jwks_uri": jwks_uri, "issuer": ehr.base_url}
    claims = {"iss": ehr.base_url, "aud": CLIENT_ID, "sub": "x", "iat": 2_000_000_000, "exp": 4_000_000_000}
    forged = jwt.encode(claims, rsa.generate_private_key(65537, 2048), algorithm="RS256", headers={"kid": kid})
    import asyncio

    with pytest.raises(LaunchError, match="InvalidSignatureError"):
        asyncio.run(_id_token_claims(forged, pending, settings))


def test_a_confidential_client_sends_its_secret_as_basic_auth(
    client: TestClient, ehr: Any, launch_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("FHIR_NER_SMART_CLIENT_SECRET", "s3cret with space")
    get_settings.cache_clear()
    ehr.smart_client(CLIENT_ID, [REDIRECT], client_secret="s3cret with space")
    seed_note("note-1")
    _, back = start(client, ehr, ehr.smart_launch("p-1", *DOCTOR))
    assert client.get("/review/launch/callback", params=back).status_code == 200
    [token] = ehr.smart_log()["token"]
    assert token["basic"] == CLIENT_ID and "client_id" not in token["form"]
    assert client.get("/review/patients/p-1").status_code == 200


def test_endpoints_off_the_ehrs_origin_are_refused(launch_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from adapter.review.smart import LaunchError, _checked_url
    from core.settings import Settings

    settings = Settings(ehr_base_url="https://ehr.example/fhir/R4", smart_allowed_origins="https://auth.example")
    assert _checked_url("https://ehr.example/oauth/authorize", "x", settings) == "https://ehr.example/oauth/authorize"
    assert _checked_url("https://auth.example/token", "x", settings) == "https://auth.example/token"
    for url in (
        "https://evil.example/authorize",
        "http://ehr.example/oauth/authorize",
        "https://ehr.example:8443/authorize",
        "https://user@ehr.example/authorize",
        "https://ehr.example/a/../authorize",
        "/oauth/authorize",
        None,
    ):
        with pytest.raises(LaunchError):
            _checked_url(url, "x", settings)


def test_launch_is_off_without_a_client_id(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from adapter.app import create_app
    from core.deps import reset_dependencies

    monkeypatch.setenv("FHIR_NER_REVIEW_TOKENS", "Ana:ana-token-123456")
    reset_dependencies()
    with TestClient(create_app(), follow_redirects=False) as test_client:
        assert test_client.get("/review/launch", params={"iss": "x", "launch": "y"}).status_code == 404
        assert test_client.get("/review/launch/callback", params={"code": "x", "state": "y"}).status_code == 404


def test_two_launches_in_one_browser_do_not_undo_each_other(
    client: TestClient, ehr: Any, launch_env: dict[str, str]
) -> None:
    seed_note("note-1")
    _, first = start(client, ehr, ehr.smart_launch("p-1", *DOCTOR))
    _, second = start(client, ehr, ehr.smart_launch("p-1", *DOCTOR))
    assert client.get("/review/launch/callback", params=first).status_code == 200
    assert client.get("/review/launch/callback", params=second).status_code == 200
    assert len(sessions(launch_env)) == 2
