"""The review pages (issue 16): ``install_review_pages(app)`` adds them to the API (off unless configured)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter.review.security import PAGE_HEADERS, CsrfError, LoginRequiredError, PagesOffError, login_redirect

__all__ = ["install_review_pages"]


def install_review_pages(app: FastAPI) -> None:
    from adapter.review.pages import router
    from adapter.review.smart import router as launch_router

    app.include_router(launch_router)
    app.include_router(router)

    @app.exception_handler(PagesOffError)
    async def _off(request: Request, exc: PagesOffError) -> Response:
        return Response(status_code=404)

    @app.exception_handler(LoginRequiredError)
    async def _login(request: Request, exc: LoginRequiredError) -> Response:
        return RedirectResponse(login_redirect(exc.next_path), status_code=303)

    @app.exception_handler(CsrfError)
    async def _csrf(request: Request, exc: CsrfError) -> Response:
        return HTMLResponse(
            "<!doctype html><title>Refused</title><p>This form has expired or came from another site. "
            '<a href="/review">Back to the review pages</a>.</p>',
            status_code=403,
        )

    app.add_middleware(_PageHeadersMiddleware)


class _PageHeadersMiddleware:
    """The review pages' security headers. A plain ASGI middleware that lets every other path through untouched:
    ``@app.middleware("http")`` would run each request, /fhir/notify included, in a task group of its own with
    its response streamed through memory channels (about 1 ms of CPU per notification; README, "Acknowledgement
    benchmark", and tests/adapter/test_bench_notify.py)."""

    _HEADERS = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in PAGE_HEADERS.items()]
    _FRAMING = frozenset({b"content-security-policy", b"x-frame-options"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/review" or path.startswith("/review/")):
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in self._HEADERS}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                # A launched session's page sets its own CSP (the EHR may frame it): keep that one, and no
                # X-Frame-Options, which cannot name an origin.
                own_csp = [(n, v) for n, v in headers if n.lower() == b"content-security-policy"]
                added = [(n, v) for n, v in self._HEADERS if not own_csp or n not in self._FRAMING]
                kept = [(n, v) for n, v in headers if n.lower() not in names]
                message = {**message, "headers": [*kept, *own_csp[:1], *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
