"""The review pages (issue 16): login, queue, note view, playground. Server-rendered, no JavaScript build step.

Everything shown comes from Redis: note states (``core/state.py``) and the worker's review records
(``core/review.py``). What needs the worker (tagging the playground's text, retrying a dead letter) is a Celery
task sent by name (``core/jobs.py``); the API never loads the model and never calls the EHR.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

import adapter.review.render as render
from adapter.review.security import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Reviewer,
    check_csrf,
    current_reviewer,
    launched_csp,
    new_login_csrf,
    pages_on,
    review_store,
    reviewer_for_token,
    safe_next,
    set_login_csrf_cookie,
    set_session_cookie,
)
from core.deps import get_note_state, get_redis
from core.jobs import TASKS
from core.review import recent_notes
from core.settings import get_settings

HERE = Path(__file__).resolve().parent
STATIC = {"review.css": "text/css; charset=utf-8", "review.js": "text/javascript; charset=utf-8"}
STATUSES = ("queued", "processing", "done", "skipped", "dead-lettered", "failed")
LANGUAGES = ("", "es", "en", "it", "nl", "ro", "sv", "cs")
MAX_TRY_CHARS = 100_000
MAX_PROFILE_BYTES = 200_000

router = APIRouter(prefix="/review", include_in_schema=False)
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(HERE / "templates")),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.globals.update(
    label_class=render.label_class,
    codes_text=render.codes_text,
    short_system=render.short_system,
    assertion_marks=render.ASSERTION_MARKS,
)


def _when(timestamp: Any) -> str:
    try:
        return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return ""


templates.filters["when"] = _when


def page(
    name: str, request: Request, reviewer: Reviewer | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    html = templates.get_template(name).render(request_path=request.url.path, reviewer=reviewer, **context)
    response = HTMLResponse(html, status_code=status_code)
    if reviewer is not None and reviewer.launched:
        response.headers["Content-Security-Policy"] = launched_csp(get_settings())
    return response


def outside_launch(request: Request, reviewer: Reviewer, subjects: set[str]) -> Response | None:
    """A launched session sees only the patient the EHR had open: the refusal page for anything else."""
    if not reviewer.launched or subjects == {f"Patient/{reviewer.patient}"}:
        return None
    return page("outside_launch.html", request, reviewer, status_code=403)


def _send(task_kind: str, *args: Any) -> None:
    from core.celery_app import get_celery_app

    get_celery_app().send_task(TASKS[task_kind], args=list(args))


# Login -----------------------------------------------------------------------------------------------------------
@router.get("/login")
async def login_form(request: Request, next: str = "/review") -> Response:  # noqa: A002 - the query's name
    if not pages_on():
        return Response(status_code=404)
    csrf = new_login_csrf()
    response = page("login.html", request, None, next_path=safe_next(next), csrf=csrf, error=None)
    set_login_csrf_cookie(response, request, csrf)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    settings = get_settings()
    if not pages_on(settings):
        return Response(status_code=404)
    form = await request.form()
    next_path = safe_next(str(form.get("next") or "/review"))
    check_csrf(request, request.cookies.get(LOGIN_CSRF_COOKIE, ""), str(form.get("csrf") or ""))
    name = reviewer_for_token(str(form.get("token") or "").strip(), settings)
    if name is None:
        csrf = new_login_csrf()
        response = page(
            "login.html", request, None, status_code=401, next_path=next_path, csrf=csrf, error="Unknown token."
        )
        set_login_csrf_cookie(response, request, csrf)
        return response
    max_age = int(settings.review_session_hours * 3600)
    session_id, _ = review_store().open_session(name, max_age)
    redirect = RedirectResponse(next_path, status_code=303)
    set_session_cookie(redirect, request, session_id, max_age)
    redirect.delete_cookie(LOGIN_CSRF_COOKIE, path="/review")
    return redirect


@router.post("/logout")
async def logout(request: Request) -> Response:
    reviewer = current_reviewer(request)
    form = await request.form()
    check_csrf(request, reviewer.csrf, str(form.get("csrf") or ""))
    review_store().close_session(reviewer.session_id)
    response = RedirectResponse("/review/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/review")
    return response


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if not pages_on() or name not in STATIC:
        return Response(status_code=404)
    return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name])


# Queue -----------------------------------------------------------------------------------------------------------
@router.get("")
async def queue(request: Request, status: str = "", q: str = "", message: str = "") -> Response:
    reviewer = current_reviewer(request)
    if reviewer.launched:  # the queue lists every patient's notes
        return RedirectResponse(f"/review/patients/{reviewer.patient}", status_code=303)
    settings = get_settings()
    notes = recent_notes(get_redis(), settings.key_prefix, limit=500)
    counts = {name: sum(1 for n in notes if n.get("status") == name) for name in STATUSES}
    shown = [
        n
        for n in notes
        if (not status or n.get("status") == status) and (not q or q.lower() in str(n["document"]).lower())
    ][:200]
    return page(
        "queue.html",
        request,
        reviewer,
        notes=shown,
        counts=counts,
        total=len(notes),
        statuses=STATUSES,
        status=status if status in STATUSES else "",
        q=q,
        message=message if message in _MESSAGES else "",
        messages=_MESSAGES,
    )


_MESSAGES = {
    "retry-requested": "Retry requested: a worker sends the job back to its queue.",
    "retry-missing": "That job is no longer dead-lettered.",
    "action-queued": "Action queued: a worker writes it to the EHR (reload to see it done).",
    "action-exists": "That action was recorded already; it is not sent twice.",
}


@router.post("/dlq/retry")
async def retry_dead_letter(request: Request) -> Response:
    reviewer = current_reviewer(request)
    form = await request.form()
    check_csrf(request, reviewer.csrf, str(form.get("csrf") or ""))
    if reviewer.launched:
        return page("outside_launch.html", request, reviewer, status_code=403)
    letter_id = str(form.get("letter") or "")
    if not letter_id or len(letter_id) > 300:
        return RedirectResponse("/review?message=retry-missing", status_code=303)
    _send("retry_dead_letter", letter_id)
    return RedirectResponse("/review?message=retry-requested", status_code=303)


# Note view -------------------------------------------------------------------------------------------------------
@router.get("/notes/{document_id}")
async def note(request: Request, document_id: str, version: str = "", message: str = "") -> Response:
    reviewer = current_reviewer(request)
    return _note_page(request, reviewer, document_id, version, message=message if message in _MESSAGES else "")


def _note_page(
    request: Request,
    reviewer: Reviewer,
    document_id: str,
    version: str,
    status_code: int = 200,
    message: str = "",
    error: str | None = None,
) -> Response:
    statuses = get_note_state().get_status(document_id) if _valid_id(document_id) else {}
    store = review_store()
    # Actions before records: the worker writes an action's result into the record before it marks the action
    # done, so an action read as done always comes with its result in the record read after it.
    actions = store.actions(document_id) if _valid_id(document_id) else []
    records = store.records(document_id) if _valid_id(document_id) else {}
    if not records:
        actions = []
    if not statuses and not records:
        return page("missing.html", request, reviewer, status_code=404, what=f"DocumentReference/{document_id}")
    refused = outside_launch(request, reviewer, {str(r.get("subject")) for r in records.values()})
    if refused is not None:
        return refused
    versions = sorted(set(statuses) | set(records), key=render.version_key)
    latest = max(records, key=render.version_key) if records else None
    chosen = version if version in versions else (latest or versions[-1])
    record = records.get(chosen)
    pieces: list[dict[str, Any]] = []
    if record and record.get("text") is not None:
        pieces = render.segments(str(record["text"]), record["mentions"])
    ehr = (record or {}).get("ehr_base_url")
    history = [
        {
            "version": v,
            "status": statuses.get(v, {}),
            "record": records.get(v),
        }
        for v in versions
    ]
    # Actions are taken on the latest recorded version (what the EHR holds now), on its text.
    reviewable = bool(record and chosen == latest and record.get("text") is not None)
    return page(
        "note.html",
        request,
        reviewer,
        status_code=status_code,
        document_id=document_id,
        version=chosen,
        record=record,
        status=statuses.get(chosen, {}),
        pieces=pieces,
        history=history,
        ehr=ehr.rstrip("/") if ehr else None,
        labels=sorted({m["label"] for m in (record or {}).get("mentions", [])}),
        review={
            "on": reviewable,
            "csrf": reviewer.csrf,
            "document": document_id,
            "version": chosen,
            "by_target": store.note_actions(document_id) if records else {},
            "labels": render.KNOWN_LABELS,
            "systems": ACTION_SYSTEMS,
        },
        actions=actions,
        message=_MESSAGES.get(message, ""),
        error=error,
    )


#: Code systems a reviewer may pick for a corrected or added mention (the ones the shipped profile writes).
ACTION_SYSTEMS = {
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://www.cms.gov/Medicare/Coding/ICD10": "ICD-10-PCS",
    "http://snomed.info/sct": "SNOMED CT",
}
_CODE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")


def _span_payload(form: Any, text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(payload, None) for a valid start/end/label/code, else (None, what is wrong)."""
    try:
        start, end = int(str(form.get("start") or "")), int(str(form.get("end") or ""))
    except ValueError:
        return None, "Start and end must be character offsets (whole numbers)."
    if not 0 <= start < end <= len(text):
        return None, f"The span must lie inside the note text: 0 ≤ start < end ≤ {len(text)}."
    label = str(form.get("label") or "")
    if label not in render.KNOWN_LABELS:
        return None, f"Label must be one of {', '.join(render.KNOWN_LABELS)}."
    code = str(form.get("code") or "").strip()
    system = str(form.get("system") or "")
    if code and (len(code) > 20 or not set(code) <= _CODE_CHARS):
        return None, "A code is letters, digits, dots and dashes (at most 20)."
    if code and system not in ACTION_SYSTEMS:
        return None, "Choose the code's system."
    return {"start": start, "end": end, "label": label, "system": system if code else "", "code": code}, None


@router.post("/notes/{document_id}/actions")
async def note_action(request: Request, document_id: str) -> Response:
    """A reviewer's confirm / reject / correct / add: checked here, kept in Redis, written by a worker."""
    from core.review import ACTION_KINDS, new_action

    reviewer = current_reviewer(request)
    form = await request.form()
    check_csrf(request, reviewer.csrf, str(form.get("csrf") or ""))
    version = str(form.get("version") or "")
    kind = str(form.get("kind") or "")
    store = review_store()
    records = store.records(document_id) if _valid_id(document_id) and len(version) <= 64 else {}
    record = records.get(version)
    if record is None:
        return page("missing.html", request, reviewer, status_code=404, what=f"DocumentReference/{document_id}")
    refused = outside_launch(request, reviewer, {str(r.get("subject")) for r in records.values()})
    if refused is not None:
        return refused
    if version != max(records, key=render.version_key):
        error = "A newer version of this note has been processed since: act on the latest version."
        return _note_page(request, reviewer, document_id, "", 409, error=error)
    if kind not in ACTION_KINDS:
        return _note_page(request, reviewer, document_id, version, 400, error="Unknown action.")
    resource = str(form.get("resource") or "") if kind != "add" else ""
    mention = next((m for m in record.get("mentions", []) if resource and m.get("resource") == resource), None)
    if kind != "add" and mention is None:
        return page("missing.html", request, reviewer, status_code=404, what=resource[:100] or "that resource")
    payload: dict[str, Any] = {}
    if kind in ("correct", "add"):
        if record.get("text") is None:
            return _note_page(request, reviewer, document_id, version, 400, error="The note text is no longer held.")
        found, problem = _span_payload(form, str(record["text"]))
        if found is None:
            return _note_page(request, reviewer, document_id, version, 400, error=problem)
        payload = found
    action = new_action(document_id, version, kind, mention, payload, reviewer.name, reviewer.reference)
    identifier = str(action["id"])
    if store.put_action(action):
        _send("review_action", identifier)
        message = "action-queued"
    else:
        existing = store.action(identifier) or {}
        message = "action-exists"
        if existing.get("state") == "failed":  # sent again after a failure: try once more
            store.update_action(identifier, state="queued", message=None, reviewer=reviewer.name)
            _send("review_action", identifier)
            message = "action-queued"
    return RedirectResponse(f"/review/notes/{document_id}?version={version}&message={message}#actions", status_code=303)


# Patient view ----------------------------------------------------------------------------------------------------
@router.get("/patients/{patient_id}")
async def patient(request: Request, patient_id: str, refuted: bool = False) -> Response:
    reviewer = current_reviewer(request)
    refused = outside_launch(request, reviewer, {f"Patient/{patient_id}"})
    if refused is not None:
        return refused
    store = review_store()
    notes = store.patient_notes(patient_id) if _valid_id(patient_id) else []
    latest: list[dict[str, Any]] = []
    for document_id in notes:
        records = store.records(document_id)
        if records:
            latest.append(records[max(records, key=render.version_key)])
    if not latest:
        return page("missing.html", request, reviewer, status_code=404, what=f"Patient/{patient_id}")
    sections = render.problem_list(latest)
    hidden = sum(1 for group in sections["Condition"] if group["refuted"])
    if not refuted:
        sections["Condition"] = [group for group in sections["Condition"] if not group["refuted"]]
    return page(
        "patient.html",
        request,
        reviewer,
        patient_id=patient_id,
        sections=sections,
        notes=len(latest),
        refuted=refuted,
        hidden=hidden,
        ehr=(latest[0].get("ehr_base_url") or "").rstrip("/") or None,
    )


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isalnum() or c in "-." for c in value)


# Playground ------------------------------------------------------------------------------------------------------
@router.get("/try")
async def try_form(request: Request) -> Response:
    reviewer = current_reviewer(request)
    return page("try.html", request, reviewer, **_try_context())


def _try_context(**overrides: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "languages": LANGUAGES,
        "text": "",
        "language": "",
        "profile_choice": "shipped",
        "profile_yaml": "",
        "profile_error": None,
        "error": None,
        "result": None,
        "pieces": [],
        "bundle_json": "",
        "timeout": get_settings().review_try_timeout_seconds,
    }
    context.update(overrides)
    return context


@router.post("/try")
async def try_text(request: Request) -> Response:
    import json

    from mappings.profile import ProfileError
    from mappings.uploaded import parse_uploaded_profile

    reviewer = current_reviewer(request)
    form = await request.form()
    check_csrf(request, reviewer.csrf, str(form.get("csrf") or ""))
    text = str(form.get("text") or "")
    language = str(form.get("language") or "")
    language = language if language in LANGUAGES else ""
    choice = "uploaded" if form.get("profile_choice") == "uploaded" else "shipped"
    profile_yaml = str(form.get("profile_yaml") or "")
    upload = form.get("profile_file")
    if choice == "uploaded" and upload is not None and not isinstance(upload, str):
        raw = await upload.read(MAX_PROFILE_BYTES + 1)
        if raw:
            profile_yaml = raw.decode("utf-8", "replace")
    context = _try_context(text=text, language=language, profile_choice=choice, profile_yaml=profile_yaml)
    if not text.strip():
        return page("try.html", request, reviewer, status_code=400, **{**context, "error": "Paste a text first."})
    if len(text) > MAX_TRY_CHARS or len(profile_yaml) > MAX_PROFILE_BYTES:
        error = f"At most {MAX_TRY_CHARS} characters of text and {MAX_PROFILE_BYTES} bytes of profile."
        return page("try.html", request, reviewer, status_code=413, **{**context, "error": error})
    if choice == "uploaded":
        try:
            parse_uploaded_profile(profile_yaml)
        except ProfileError as error:
            # As `fhir-ner extract --profile` prints it.
            return page("try.html", request, reviewer, status_code=400, **{**context, "profile_error": f"{error}"})
    store = review_store()
    request_id = store.put_try(
        {"text": text, "language": language or None, "profile_yaml": profile_yaml if choice == "uploaded" else None}
    )
    _send("review_try", request_id)
    deadline = time.monotonic() + get_settings().review_try_timeout_seconds
    result = None
    while time.monotonic() < deadline:
        result = store.take_try_result(request_id)
        if result is not None:
            break
        await asyncio.sleep(0.2)
    if result is None:
        context["error"] = (
            "No worker answered in time. The playground needs a worker serving the inference queue "
            "(fhir-ner worker --queues inference)."
        )
        return page("try.html", request, reviewer, status_code=504, **context)
    if result.get("profile_error"):
        context["profile_error"] = result["profile_error"]
        return page("try.html", request, reviewer, status_code=400, **context)
    if result.get("error"):
        return page("try.html", request, reviewer, status_code=500, **{**context, "error": result["error"]})
    return page(
        "try.html",
        request,
        reviewer,
        **{
            **context,
            "result": result,
            "pieces": render.segments(text, result["mentions"]),
            "bundle_json": json.dumps(result["bundle"], indent=2, ensure_ascii=False),
        },
    )
