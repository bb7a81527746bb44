"""SMART App Launch (EHR launch) of the review pages: a clinician opens the patient view from inside the EHR.

``GET /review/launch?iss=&launch=`` (the launch URL registered with the EHR) checks that ``iss`` is our EHR
(``FHIR_NER_EHR_BASE_URL``), reads its ``.well-known/smart-configuration``, keeps a state with a PKCE verifier in
Redis (ten minutes, one use) and sends the browser to the EHR's authorization endpoint. ``GET
/review/launch/callback`` trades the code for a token (PKCE S256; with the client secret as HTTP Basic when one
is configured, else as a public client), checks the ``id_token``'s signature against the issuer's JWKS (PyJWT),
its issuer, audience and expiry, and opens a reviewer session named after the user (``fhirUser``, a Practitioner
or PractitionerRole of that EHR, and the token's ``name``), limited to the ``patient`` in context. Any failure
is a page that says what went wrong, and no session.

The access token is not kept: the pages read Redis, never the EHR, so the launch serves only to learn who the user
is and which patient the EHR has open. Every URL fetched must lie on the EHR's origin or one of
``FHIR_NER_SMART_ALLOWED_ORIGINS`` (``core.origin.EhrBase``: no user info, no dot segments, no redirects).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit, urlunsplit

import httpx
import jwt
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from adapter.review.pages import page
from adapter.review.security import (
    ehr_origin,
    is_https,
    launched_csp,
    review_store,
    set_session_cookie,
)
from core.origin import EhrBase, OutsideEhrError, parse_reference
from core.review import LAUNCH_TTL_SECONDS
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/review/launch", include_in_schema=False)

LAUNCH_COOKIE = "fhir_ner_launch_"
#: Who may open the review pages from the EHR: clinicians, not patients or their relatives.
USER_TYPES = ("Practitioner", "PractitionerRole")
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "ES256", "ES384"]
_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LaunchError(Exception):
    """The launch cannot go on; ``message`` is shown to the user (never a secret, never a patient id)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def _error_page(request: Request, error: LaunchError, state: str = "") -> Response:
    logger.warning("SMART launch refused (%s)", error.message)
    response = page("launch_error.html", request, None, status_code=error.status_code, message=error.message)
    response.headers["Content-Security-Policy"] = launched_csp(get_settings())
    if state:
        response.delete_cookie(_launch_cookie(state), path="/review/launch")
    return response


def _allowed(settings: Settings) -> list[EhrBase]:
    origins = [ehr_origin(settings.ehr_base_url), *settings.smart_allowed_origins]
    return [EhrBase(origin + "/") for origin in origins]


def _checked_url(value: Any, what: str, settings: Settings) -> str:
    """An absolute http(s) URL on an allowed origin, or :class:`LaunchError`."""
    if isinstance(value, str) and value:
        for base in _allowed(settings):
            try:
                resolved = base.resolve(value)
            except OutsideEhrError:
                continue
            if "://" in value:
                return resolved
    raise LaunchError(f"The EHR's SMART configuration gives no usable {what} on an allowed origin.", 502)


def _same_base(iss: str, base: str) -> bool:
    def normal(url: str) -> tuple[str, str, str]:
        parts = urlsplit(url.strip())
        return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")

    parts = urlsplit(iss)
    plain = not (parts.query or parts.fragment or "@" in parts.netloc)
    return bool(iss) and plain and normal(iss) == normal(base)


def _timeout(settings: Settings) -> float:
    return min(settings.ehr_timeout_seconds, 10.0)


async def _get_json(url: str, settings: Settings, what: str) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=_timeout(settings), follow_redirects=False) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as error:
        raise LaunchError(f"The EHR's {what} could not be read ({type(error).__name__}).", 502) from error
    if response.status_code != 200:
        raise LaunchError(f"The EHR's {what} answered HTTP {response.status_code}.", 502)
    try:
        body = response.json()
    except ValueError as error:
        raise LaunchError(f"The EHR's {what} is not JSON.", 502) from error
    if not isinstance(body, dict):
        raise LaunchError(f"The EHR's {what} is not a JSON object.", 502)
    return body


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _launch_cookie(state: str) -> str:
    """One cookie per launch (named after its state), so two launches in two tabs do not undo each other."""
    return LAUNCH_COOKIE + _digest(state)[:16]


def _set_launch_cookie(response: Response, request: Request, state: str, value: str) -> None:
    """Binds the callback to the browser that started the launch (no login CSRF with someone else's code). Sent
    on the EHR's redirect back, which is a cross-site navigation, possibly inside the EHR's frame: hence
    ``SameSite=None; Partitioned`` over HTTPS (Lax over plain HTTP, where browsers refuse None)."""
    https = is_https(request)
    response.set_cookie(
        _launch_cookie(state),
        value,
        max_age=LAUNCH_TTL_SECONDS,
        path="/review/launch",
        httponly=True,
        samesite="none" if https else "lax",
        secure=https,
        partitioned=https,
    )


@router.get("")
async def launch(request: Request, iss: str = "", launch: str = "") -> Response:
    settings = get_settings()
    if not settings.smart_launch_on():
        return Response(status_code=404)
    try:
        if not _same_base(iss, settings.ehr_base_url):
            raise LaunchError(
                "This launch came from a FHIR server this adapter does not serve (iss must be its EHR, "
                "FHIR_NER_EHR_BASE_URL).",
                403,
            )
        if not launch or len(launch) > 2000:
            raise LaunchError("The EHR sent no launch context (launch parameter).")
        base = settings.ehr_base_url.rstrip("/")
        config = await _get_json(f"{base}/.well-known/smart-configuration", settings, "SMART configuration")
        authorize = _checked_url(config.get("authorization_endpoint"), "authorization endpoint", settings)
        token = _checked_url(config.get("token_endpoint"), "token endpoint", settings)
        jwks = _checked_url(config.get("jwks_uri"), "jwks_uri (needed to check the id_token)", settings)
        methods = config.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise LaunchError("The EHR does not support PKCE with S256.", 502)
        issuer = config.get("issuer") if isinstance(config.get("issuer"), str) else base
    except LaunchError as error:
        return _error_page(request, error)
    state, verifier, binding = secrets.token_urlsafe(32), secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    redirect_uri = settings.smart_redirect_url or str(request.url_for("smart_callback"))
    review_store().put_launch(
        state,
        {
            "verifier": verifier,
            "binding": _digest(binding),
            "token_endpoint": token,
            "jwks_uri": jwks,
            "issuer": issuer,
            "redirect_uri": redirect_uri,
        },
    )
    target = _with_query(
        authorize,
        {
            "response_type": "code",
            "client_id": str(settings.smart_client_id),
            "redirect_uri": redirect_uri,
            "scope": settings.smart_scope,
            "state": state,
            "aud": iss,
            "launch": launch,
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
        },
    )
    response = RedirectResponse(target, status_code=302)
    _set_launch_cookie(response, request, state, binding)
    return response


@router.get("/callback", name="smart_callback")
async def callback(request: Request, code: str = "", state: str = "", error: str = "") -> Response:
    settings = get_settings()
    if not settings.smart_launch_on():
        return Response(status_code=404)
    try:
        pending = review_store().take_launch(state)
        if pending is None:
            raise LaunchError("This launch has expired or was used already: open the app from the EHR again.")
        binding = request.cookies.get(_launch_cookie(state), "")
        if not binding or not hmac.compare_digest(_digest(binding), str(pending["binding"])):
            raise LaunchError("This launch was started in another browser: open the app from the EHR again.", 403)
        if error:
            raise LaunchError(f"The EHR did not authorize the launch ({error[:100]}).", 403)
        if not code or len(code) > 4000:
            raise LaunchError("The EHR sent no authorization code.")
        answer = await _exchange(code, pending, settings)
        patient = answer.get("patient")
        if not isinstance(patient, str) or not _PATIENT_ID.match(patient):
            raise LaunchError("The EHR's token names no patient in context: open the app from a patient's chart.")
        claims = await _id_token_claims(answer.get("id_token"), pending, settings)
        user = _fhir_user(claims.get("fhirUser"), settings)
        name = _display_name(claims, user)
    except LaunchError as failure:
        return _error_page(request, failure, state if len(state) <= 100 else "")
    max_age = int(settings.review_session_hours * 3600)
    session_id, _ = review_store().open_session(name, max_age, smart=True, patient=patient, fhir_user=user)
    # A page of our own rather than a redirect: a redirect after the EHR's cross-site one would not carry a Strict
    # or Lax cookie in every browser; this page's navigation starts on our own origin.
    target = f"/review/patients/{patient}"
    response = page("launched.html", request, None, target=target, user_name=name)
    response.headers["Content-Security-Policy"] = launched_csp(settings)
    response.headers["Refresh"] = f"0; url={target}"
    set_session_cookie(response, request, session_id, max_age, launched=True)
    response.delete_cookie(_launch_cookie(state), path="/review/launch")
    logger.info("SMART launch opened a review session")
    return response


async def _exchange(code: str, pending: dict[str, Any], settings: Settings) -> dict[str, Any]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": str(pending["redirect_uri"]),
        "code_verifier": str(pending["verifier"]),
    }
    headers = {"Accept": "application/json"}
    if settings.smart_client_secret is not None:
        # client_secret_basic: both parts form-encoded first (RFC 6749, 2.3.1).
        pair = (
            f"{quote_plus(str(settings.smart_client_id))}:{quote_plus(settings.smart_client_secret.get_secret_value())}"
        )
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form["client_id"] = str(settings.smart_client_id)
    try:
        async with httpx.AsyncClient(timeout=_timeout(settings), follow_redirects=False) as client:
            response = await client.post(str(pending["token_endpoint"]), data=form, headers=headers)
    except httpx.HTTPError as failure:
        raise LaunchError(f"The EHR's token endpoint could not be reached ({type(failure).__name__}).", 502) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        reason = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), str) else None
        said = f": {reason[:100]}" if reason else ""
        raise LaunchError(f"The EHR refused the authorization code (HTTP {response.status_code}{said}).", 502)
    if not body.get("access_token") or str(body.get("token_type", "")).lower() != "bearer":
        raise LaunchError("The EHR's token response has no bearer access token.", 502)
    return body


async def _id_token_claims(id_token: Any, pending: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The id_token's claims, once its signature (the issuer's JWKS), issuer, audience and expiry check out."""
    if not isinstance(id_token, str) or not id_token:
        raise LaunchError("The EHR's token response has no id_token (the openid and fhirUser scopes are needed).", 502)
    jwks = await _get_json(str(pending["jwks_uri"]), settings, "JWKS")
    try:
        header = jwt.get_unverified_header(id_token)
        keys = [key for key in jwt.PyJWKSet.from_dict(jwks).keys if key.key_id == header.get("kid")]
        if not keys:
            raise LaunchError("The id_token is signed with a key the EHR's JWKS does not list.", 502)
        claims: dict[str, Any] = jwt.decode(
            id_token,
            keys[0].key,
            algorithms=ID_TOKEN_ALGORITHMS,
            audience=str(settings.smart_client_id),
            issuer=str(pending["issuer"]),
            leeway=60,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.PyJWTError as failure:
        raise LaunchError(f"The id_token does not check out ({type(failure).__name__}).", 502) from None
    return claims


def _fhir_user(value: Any, settings: Settings) -> str:
    """``Type/id`` of the user, who must be a clinician of our EHR."""
    try:
        ref = parse_reference(value, EhrBase(settings.ehr_base_url)) if isinstance(value, str) else None
    except OutsideEhrError:
        ref = None
    if ref is None:
        raise LaunchError("The id_token names no fhirUser of this EHR.", 403)
    if ref.resource_type not in USER_TYPES:
        raise LaunchError("Only clinicians (a Practitioner or PractitionerRole) may open the review pages.", 403)
    return ref.relative


def _display_name(claims: dict[str, Any], user: str) -> str:
    """The user's name as the token gives it (shown on the pages and written into Provenance)."""
    name = claims.get("name")
    if not isinstance(name, str) or not name.strip():
        parts = [claims.get("given_name"), claims.get("family_name")]
        name = " ".join(p for p in parts if isinstance(p, str) and p.strip())
    if not name.strip():
        name = claims.get("preferred_username") if isinstance(claims.get("preferred_username"), str) else user
    return _CONTROL.sub(" ", str(name)).strip()[:200] or user
