"""Who may see the review pages: reviewer tokens, a session cookie, CSRF on every POST, and strict headers.

* The pages are off (404) unless ``FHIR_NER_REVIEW_TOKENS`` names at least one reviewer (``name:token`` pairs).
* Logging in with a reviewer's token opens a session kept in Redis; the browser holds only its random id, in an
  HttpOnly, SameSite=Strict cookie, Secure when the request came over HTTPS (directly or, behind a proxy, as
  ``X-Forwarded-Proto: https``).
* Every POST carries the session's CSRF token (a form field, or ``X-CSRF-Token``), compared in constant time;
  a POST whose ``Origin`` or ``Sec-Fetch-Site`` says it came from another site is refused as well. The login
  form has its own double-submit token.
* Every page is sent with a Content-Security-Policy that allows only this origin's own scripts and styles (no
  inline script), ``frame-ancestors 'none'``, no caching, and no referrer to other sites.
* A session opened by a SMART EHR launch (``adapter/review/smart.py``) is limited to the launch's patient, its
  pages may be framed by the EHR (``frame-ancestors`` its origins), and its cookie is ``SameSite=None; Secure;
  Partitioned`` over HTTPS so that it is sent inside the EHR's frame (see ``set_session_cookie``).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import Response

from core.deps import get_review_store
from core.settings import Settings, get_settings

SESSION_COOKIE = "fhir_ner_review"
LOGIN_CSRF_COOKIE = "fhir_ner_login_csrf"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it, browsers send "Origin: null" on form posts, and the origin check needs the real one.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

#: The pages' Redis store (pages.py and smart.py take it from here).
review_store = get_review_store


@dataclass(frozen=True)
class Reviewer:
    name: str
    session_id: str
    csrf: str
    #: A SMART launch's session: the patient in context (the only one it may see) and the user's FHIR reference.
    patient: str | None = None
    reference: str | None = None

    @property
    def launched(self) -> bool:
        return self.patient is not None


class PagesOffError(Exception):
    """The review pages are not configured: answer 404, as if they did not exist."""


class LoginRequiredError(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class CsrfError(Exception):
    """A POST without the session's CSRF token, or from another origin."""


def pages_on(settings: Settings | None = None) -> bool:
    settings = settings or get_settings()
    return bool(settings.reviewers()) or settings.smart_launch_on()


def reviewer_for_token(presented: str, settings: Settings) -> str | None:
    """The reviewer whose token this is; every token is compared, so timing says nothing about which."""
    found: str | None = None
    for name, token in settings.reviewers():
        if hmac.compare_digest(presented.encode(), token.encode()):
            found = found or name
    return found


def is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def safe_next(path: str | None) -> str:
    """Only a path inside the review pages (never another site) is followed after login."""
    if not path or not path.startswith("/review") or path.startswith("//") or "\\" in path:
        return "/review"
    parts = urlsplit(path)
    if parts.scheme or parts.netloc:
        return "/review"
    return path


def current_reviewer(request: Request) -> Reviewer:
    """The logged-in reviewer; raises when the pages are off or nobody is logged in."""
    settings = get_settings()
    if not pages_on(settings):
        raise PagesOffError()
    session_id = request.cookies.get(SESSION_COOKIE, "")
    session = review_store().session(session_id) if session_id else None
    if session is not None and session.get("smart"):
        # Launched from the EHR: good while launches are configured; limited to the launch's patient.
        if settings.smart_launch_on() and session.get("patient"):
            reference = session.get("fhir_user")
            return Reviewer(
                str(session["reviewer"]),
                session_id,
                str(session["csrf"]),
                patient=str(session["patient"]),
                reference=str(reference) if reference else None,
            )
        session = None
    if session is None or session.get("reviewer") not in {name for name, _ in settings.reviewers()}:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequiredError(target)
    return Reviewer(str(session["reviewer"]), session_id, str(session["csrf"]))


def launched_csp(settings: Settings) -> str:
    """The CSP of a launched session's pages: as strict, except that the EHR may frame them."""
    origins = settings.smart_frame_ancestors or [ehr_origin(settings.ehr_base_url)]
    return CSP.replace("frame-ancestors 'none'", "frame-ancestors 'self' " + " ".join(origins))


def ehr_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def same_origin(request: Request) -> bool:
    """The browser says the POST comes from this site (``Sec-Fetch-Site``, ``Origin``); a client that sends neither
    (not a browser) is judged by its CSRF token alone."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


def check_csrf(request: Request, expected: str, presented: str | None) -> None:
    if not same_origin(request):
        raise CsrfError()
    token = presented or request.headers.get("x-csrf-token") or ""
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise CsrfError()


def login_redirect(next_path: str) -> str:
    return f"/review/login?next={quote(safe_next(next_path), safe='/')}"


def set_session_cookie(
    response: Response, request: Request, session_id: str, max_age: int, launched: bool = False
) -> None:
    """Strict for a token login: its pages are only ever opened from this site. A launched session's pages are
    opened by the EHR, often in its own frame (a cross-site frame never gets a Strict or Lax cookie), so over HTTPS
    its cookie is ``SameSite=None; Secure; Partitioned`` (kept per top-level site, so browsers that block
    third-party cookies still keep it). POSTs stay guarded by the CSRF token and the origin check; over plain HTTP
    (development) ``SameSite=None`` is refused by browsers, so it is Lax."""
    https = is_https(request)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=max_age,
        path="/review",
        httponly=True,
        samesite=("none" if https else "lax") if launched else "strict",
        secure=https,
        partitioned=launched and https,
    )


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def set_login_csrf_cookie(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        value,
        max_age=1800,
        path="/review",
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )
