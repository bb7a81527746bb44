"""The review pages in a real browser (issue 16): Debian's chromium driven by Playwright, against the real API
(``fhir-ner serve``), a real worker (the tiny tagger) and the test EHR. Screenshots go to
``test-artifacts/review/`` (two of them are in the README).

Marker ``browser``; ``make test`` installs the browser (``tests/ensure-chromium.sh``).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
import redis
from conftest import REPO_ROOT, WorkerProcess
from ehr.harness import FhirTestServer
from test_end_to_end import backport_notification, create
from tiny_models import SAMPLE_NOTES

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = os.environ.get("FHIR_NER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "review"
REVIEWER, TOKEN = "Dr Ana Ruiz", "ana-browser-token-1"
NOTIFY_HEADERS = {"Authorization": "Bearer test-token", "Content-Type": "application/fhir+json"}
SMART_CLIENT = "fhir-ner-review"
BROKEN_PROFILE = "name: broken\nlabels:\n  DISEASE:\n    mapper: no-such-mapper\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    url: str
    ehr: FhirTestServer
    env: dict[str, str]
    patient: str
    notes: dict[str, tuple[str, str, str]]  # name -> (document id, version, text)

    def api(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={"Authorization": "Bearer test-token"}, timeout=10)


def _wait_done(stack: Stack, document_id: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        response = stack.api(f"/documents/{document_id}")
        if response.status_code == 200:
            last = response.json()
            if {v["status"] for v in last["versions"].values()} & {"done", "failed", "dead-lettered"}:
                assert "done" in {v["status"] for v in last["versions"].values()}, last
                return
        time.sleep(0.5)
    raise AssertionError(f"{document_id} not done: {last}")


def _note(ehr: FhirTestServer, patient: str, text: str) -> dict[str, Any]:
    return create(
        ehr,
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "docStatus": "final",
            "subject": {"reference": f"Patient/{patient}"},
            "date": "2026-11-20T09:30:00Z",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "language": "es",
                        "data": base64.b64encode(text.encode()).decode(),
                    }
                }
            ],
        },
    )


@pytest.fixture(scope="module")
def stack(
    fhir_server: FhirTestServer, tiny_tagger_path: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    fhir_server.reset()
    logs = tmp_path_factory.mktemp("review-browser")
    prefix = f"fhir-ner-test-{uuid.uuid4().hex[:10]}"
    env = {
        "FHIR_NER_ENVIRONMENT": "test",
        "FHIR_NER_REDIS_URL": redis_url,
        "FHIR_NER_KEY_PREFIX": prefix,
        "FHIR_NER_SUBSCRIPTION_TOKENS": "test-token",
        "FHIR_NER_IDENTIFIER_NAMESPACE": "urn:fhir-ner-adapter:test",
        "FHIR_NER_EHR_MAX_TRANSACTION_ENTRIES": "8",
        "FHIR_NER_EHR_BASE_URL": fhir_server.base_url,
        "FHIR_NER_MODEL_PATH": str(tiny_tagger_path),
        "FHIR_NER_TERMINOLOGY": "off",
        "FHIR_NER_RECOVERY_CHECK_SECONDS": "0",
        "FHIR_NER_REVIEW_TOKENS": f"{REVIEWER}:{TOKEN}",
        "FHIR_NER_REVIEW_TRY_TIMEOUT_SECONDS": "120",
        # SMART EHR launch (test_a_launch_from_the_ehr_lands_on_the_patient_view_as_the_practitioner).
        "FHIR_NER_SMART_CLIENT_ID": SMART_CLIENT,
    }
    worker = WorkerProcess(env, logs / "worker.log").start()
    port = _free_port()
    log = (logs / "api.log").open("ab")
    api = subprocess.Popen(
        [sys.executable, "-m", "adapter.cli", "serve", "--port", str(port)],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert api.poll() is None, (logs / "api.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.3)
        patient = create(fhir_server, {"resourceType": "Patient", "name": [{"family": "Prueba", "given": ["Ana"]}]})
        stack = Stack(url, fhir_server, env, patient["id"], {})
        for event, (name, text) in enumerate(
            [("first", SAMPLE_NOTES[0]), ("second", SAMPLE_NOTES[2]), ("third", SAMPLE_NOTES[3])], start=1
        ):
            document = _note(fhir_server, patient["id"], text)
            _notify(stack, document, event)
            stack.notes[name] = (document["id"], document["meta"]["versionId"], text)
        for document_id, _, _ in stack.notes.values():
            _wait_done(stack, document_id)
        yield stack
    finally:
        api.terminate()
        api.wait(timeout=20)
        worker.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"no browser at {CHROMIUM}: make test installs it (tests/ensure-chromium.sh)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture()
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    context = browser.new_context(base_url=stack.url, viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    yield opened
    context.close()


def shot(page: Any, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def log_in(page: Any, next_path: str = "/review") -> None:
    """With the keyboard only: the token field has focus, type, press Enter."""
    page.goto(f"/review/login?next={next_path}")
    # The browser runs `autofocus` at its next rendering update, which may come after the load event `goto`
    # waits for: wait for it (up to 5 s) rather than read the focus at once; no focus still fails the test.
    page.wait_for_function("document.activeElement && document.activeElement.id === 'token'", timeout=5000)
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "/review/login" not in url and url.endswith(next_path))


def test_without_login_every_page_redirects_to_the_login_and_serves_no_note_text(page: Any, stack: Stack) -> None:
    document_id, version, text = stack.notes["first"]
    for path in (
        "/review",
        f"/review/notes/{document_id}",
        f"/review/notes/{document_id}?version={version}",
        "/review/try",
    ):
        response = page.goto(path)
        assert response is not None and response.ok
        assert "/review/login" in page.url, path
        body = page.content()
        for mention in ("fiebre", "neumonía", "radiografía"):
            assert mention not in body
    shot(page, "login")
    # A wrong token: refused, still nothing shown.
    page.fill("#token", "not-the-token")
    page.keyboard.press("Enter")
    assert page.locator("[role=alert]").inner_text() == "Unknown token."
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert "fhir_ner_review" not in cookies


def test_a_processed_note_shows_each_mention_at_its_offsets(page: Any, stack: Stack) -> None:
    document_id, _, text = stack.notes["first"]
    log_in(page, f"/review/notes/{document_id}")
    cookie = next(c for c in page.context.cookies() if c["name"] == "fhir_ner_review")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # invisible to scripts
    marks = page.locator("mark.mention")
    assert marks.count() == 4
    for index in range(marks.count()):
        mark = marks.nth(index)
        start, end = int(mark.get_attribute("data-start")), int(mark.get_attribute("data-end"))
        assert mark.locator(".mention-text").inner_text() == text[start:end]
        label = mark.get_attribute("data-label")
        assert mark.locator(".tag").inner_text().startswith(label)  # written out, not only a colour
    # The whole note text is shown, in order, around the marks.
    shown = page.evaluate(
        """() => Array.from(document.querySelector('pre.note').childNodes).map(n =>
               n.nodeType === 3 ? n.textContent : n.querySelector('.mention-text').textContent).join('')"""
    )
    assert shown == text
    # Keyboard: Tab reaches the mentions; focus shows the details; Escape hides them.
    first = marks.first
    first.focus()
    tip = first.locator(".tip")
    assert tip.is_visible()
    assert "confidence" in tip.inner_text()
    assert "became Observation/" in tip.inner_text() or "became Condition/" in tip.inner_text()
    page.keyboard.press("Escape")
    assert not tip.is_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('mention')")
    # The side panel links every written resource on the EHR, and the Provenance; they exist there.
    links = page.locator("aside a[href^='http']")
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    assert any("/Provenance/" in h for h in hrefs)
    for href in hrefs:
        assert href.startswith(stack.ehr.base_url)
        assert httpx.get(href, timeout=10).status_code == 200
    assert "tiny-test" in page.locator("aside").inner_text()
    page.locator("mark.mention").nth(2).focus()
    shot(page, "note")


def test_the_note_view_reads_at_200_percent_zoom(browser: Any, stack: Stack) -> None:
    """200% zoom of a 1280-pixel window: a 640-CSS-pixel viewport at device scale 2. Nothing needs sideways
    scrolling and the text is still all there."""
    document_id, _, text = stack.notes["second"]
    context = browser.new_context(base_url=stack.url, viewport={"width": 640, "height": 900}, device_scale_factor=2)
    page = context.new_page()
    try:
        log_in(page, f"/review/notes/{document_id}")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert page.locator("pre.note").is_visible()
        for mark in page.locator("mark.mention .mention-text").all():
            assert mark.inner_text() in text
        # Negated, historical and hypothetical are written out (colour is never the only signal).
        tags = " ".join(t.inner_text() for t in page.locator("mark.mention .tag").all())
        assert "NEGATED" in tags.upper() and "HISTORICAL" in tags.upper() and "HYPOTHETICAL" in tags.upper()
        shot(page, "note-zoom-200")
    finally:
        context.close()


def test_the_queue_lists_the_notes_and_links_to_them(page: Any, stack: Stack) -> None:
    log_in(page)
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 3
    assert page.locator("table.queue .status").all_inner_texts() == ["done"] * 3
    page.select_option("#status", "dead-lettered")
    page.locator("form.filters button").click()
    assert page.locator("table.queue").count() == 0
    page.select_option("#status", "done")
    page.locator("form.filters button").click()
    assert page.locator("table.queue tbody tr").count() == 3
    shot(page, "queue")
    document_id = stack.notes["third"][0]
    page.locator(f"a[href='/review/notes/{document_id}']").click()
    page.wait_for_url(f"**/review/notes/{document_id}")
    assert page.locator("mark.mention").count() >= 1


def test_the_playground_shows_a_profile_error_for_broken_yaml_and_a_bundle_for_a_text(page: Any, stack: Stack) -> None:
    provenances_before = httpx.get(f"{stack.ehr.base_url}/Provenance", timeout=10).json().get("total")
    log_in(page, "/review/try")
    page.fill("#text", SAMPLE_NOTES[0])
    page.check("input[name=profile_choice][value=uploaded]")
    page.fill("#profile_yaml", BROKEN_PROFILE)
    page.locator("form.try button[type=submit]").click()
    error = page.locator("#profile-error")
    error.wait_for()
    assert "Error: uploaded profile: invalid mapping profile: <root>: Value error, label DISEASE" in error.inner_text()
    assert "unknown mapper 'no-such-mapper'" in error.inner_text()
    shot(page, "try-profile-error")
    # The same page, the shipped profile: the worker tags it; the Bundle is collapsible and validated.
    page.check("input[name=profile_choice][value=shipped]")
    page.select_option("#language", "es")
    page.locator("form.try button[type=submit]").click()
    page.locator("#validation").wait_for(timeout=150_000)
    assert page.locator("#validation").inner_text().startswith("Valid: valid FHIR R4 transaction Bundle")
    marks = page.locator("pre.note mark.mention .mention-text")
    assert sorted(marks.all_inner_texts()) == sorted(["fiebre", "tos", "neumonía", "radiografía de tórax"])
    bundle = page.locator("details.bundle")
    assert not bundle.locator("pre").is_visible()
    bundle.locator("summary").focus()
    page.keyboard.press("Enter")
    assert bundle.locator("pre").is_visible()
    written = json.loads(bundle.locator("pre").inner_text())
    assert written["type"] == "transaction"
    shot(page, "try")
    # Nothing was written.
    assert httpx.get(f"{stack.ehr.base_url}/Provenance", timeout=10).json().get("total") == provenances_before


def test_the_patient_view_lists_what_was_derived_with_links_to_the_sentences(page: Any, stack: Stack) -> None:
    document_id, _, text = stack.notes["first"]
    log_in(page, f"/review/notes/{document_id}")
    page.locator(f"a[href='/review/patients/{stack.patient}']").click()
    page.wait_for_url(f"**/review/patients/{stack.patient}")
    problems = page.locator("#h-Condition + p + ul.problems > li, #h-Condition ~ ul.problems > li")
    titles = [
        t.lower()
        for t in page.locator("section[aria-labelledby=h-Condition] .problems > li > strong").all_inner_texts()
    ]
    assert "neumonía" in titles and "diabetes mellitus" in titles
    assert problems.count() >= 2
    assert page.locator("section[aria-labelledby=h-Observation]").is_visible()
    assert page.locator("section[aria-labelledby=h-Procedure]").is_visible()
    shot(page, "patient")
    # Each line leads to the sentence it came from, and the highlighted mention there is the same words.
    source = page.locator("section[aria-labelledby=h-Condition] .sources a", has_text="neumonía").first
    said = source.locator("mark.said").inner_text()
    source.click()
    page.wait_for_url(f"**/review/notes/{document_id}?version=*")
    anchor = page.url.rsplit("#", 1)[1]
    assert page.locator(f"#{anchor} .mention-text").inner_text() == said == "neumonía"
    assert said in text


# Reviewer actions ------------------------------------------------------------------------------------------------
@dataclass
class Reviewed:
    document: dict[str, Any]
    text: str
    rejected: bool = False  # the reject test ran


@pytest.fixture(scope="module")
def reviewed(stack: Stack) -> Reviewed:
    """A note of its own for the action tests (they change what the EHR holds for it), processed like the rest."""
    text = SAMPLE_NOTES[0]
    document = _note(stack.ehr, stack.patient, text)
    _notify(stack, document, 4)
    _wait_version(stack, document["id"], document["meta"]["versionId"])
    return Reviewed(document, text)


def _notify(stack: Stack, document: dict[str, Any], event: int) -> None:
    response = httpx.post(
        f"{stack.url}/fhir/notify",
        content=json.dumps(backport_notification(document, event)),
        headers=NOTIFY_HEADERS,
        timeout=10,
    )
    assert response.status_code == 200, response.text


def _wait_version(stack: Stack, document_id: str, version: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        response = stack.api(f"/documents/{document_id}")
        if response.status_code == 200:
            last = response.json()["versions"].get(version)
            if last and last["status"] in ("done", "failed", "dead-lettered"):
                assert last["status"] == "done", last
                return
        time.sleep(0.5)
    raise AssertionError(f"{document_id}/{version} not done: {last}")


def _ehr(stack: Stack, path: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.ehr.base_url}/{path}", timeout=10)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def _row(page: Any, said: str) -> Any:
    return page.locator("table.mentions tbody tr", has=page.locator("td:nth-child(2)", has_text=said)).first


def _wait_action(page: Any, kind: str, timeout: float = 90) -> Any:
    """Reload the note view until the worker has done the action; returns the action's row."""
    deadline = time.monotonic() + timeout
    while True:
        rows = page.locator(f"table.actions tr[data-kind={kind}]")
        states = rows.locator(".action-state").all_inner_texts()
        if any(state in ("done", "failed") for state in states):
            assert "failed" not in states, rows.all_inner_texts()
            return rows.last
        assert time.monotonic() < deadline, f"{kind} not done: {states}"
        time.sleep(0.5)
        page.reload()


def test_a_reviewer_confirms_a_condition_and_the_ehr_holds_it_with_their_provenance(
    page: Any, stack: Stack, reviewed: Reviewed
) -> None:
    document_id = reviewed.document["id"]
    log_in(page, f"/review/notes/{document_id}")
    row = _row(page, "neumonía")
    condition = row.locator("td:nth-child(7) a").first.inner_text()
    assert condition.startswith("Condition/")
    # By keyboard: focus the button, press Enter; the form posts and comes back to the note.
    row.locator("button.confirm").focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**message=action-queued*")
    assert "Action queued" in page.locator("[role=status]").inner_text()
    done = _wait_action(page, "confirm")
    assert REVIEWER in done.inner_text() and condition in done.inner_text()
    resource = _ehr(stack, condition)
    assert resource["verificationStatus"]["coding"][0]["code"] == "confirmed"
    link = done.locator("a[href*='/Provenance/']").get_attribute("href")
    assert link.startswith(stack.ehr.base_url)
    provenance = _ehr(stack, link.removeprefix(stack.ehr.base_url).lstrip("/"))
    assert provenance["target"] == [{"reference": condition}]
    assert [a["who"]["display"] for a in provenance["agent"]] == [REVIEWER, "fhir-ner-adapter"]
    assert "(confirmed)" in _row(page, "neumonía").inner_text()
    # "Use the selection" fills the add form's offsets from words selected in the note (labels and tips skipped).
    page.evaluate(
        """() => { const note = document.querySelector('pre.note'); const marks = note.querySelectorAll('mark');
                   const text = marks[1].nextSibling; const range = document.createRange();
                   range.setStart(marks[0].querySelector('.mention-text').firstChild, 0); range.setEnd(text, 3);
                   const selection = window.getSelection(); selection.removeAllRanges(); selection.addRange(range); }"""
    )
    page.locator("#use-selection").click()
    start, end = int(page.locator("#add-start").input_value()), int(page.locator("#add-end").input_value())
    assert reviewed.text[start:end] == "fiebre y tos. D"
    assert page.locator("#selection-text").inner_text() == "“fiebre y tos. D”"
    # The screenshot of the note view with its action controls (one correction form open).
    _row(page, "radiografía").locator("details.correct summary").click()
    shot(page, "note-actions")


def test_a_rejected_resource_stays_entered_in_error_through_a_revision_of_the_note(
    page: Any, stack: Stack, reviewed: Reviewed
) -> None:
    document_id = reviewed.document["id"]
    log_in(page, f"/review/notes/{document_id}")
    row = _row(page, "fiebre")
    observation = row.locator("td:nth-child(7) a").first.inner_text()
    row.locator("button.reject").click()
    page.wait_for_url("**message=action-queued*")
    _wait_action(page, "reject")
    assert _ehr(stack, observation)["status"] == "entered-in-error"
    assert "(entered-in-error)" in _row(page, "fiebre").inner_text()
    reviewed.rejected = True
    # A new revision of the note says the same and more: the worker writes it, but not the rejected finding.
    revised = json.loads(json.dumps(_ehr(stack, f"DocumentReference/{document_id}")))
    text = reviewed.text + " Control en una semana."
    revised["content"][0]["attachment"]["data"] = base64.b64encode(text.encode()).decode()
    response = httpx.put(f"{stack.ehr.base_url}/DocumentReference/{document_id}", json=revised, timeout=10)
    assert response.status_code == 200, response.text
    version = response.json()["meta"]["versionId"]
    _notify(stack, response.json(), 5)
    _wait_version(stack, document_id, version)
    assert _ehr(stack, observation)["status"] == "entered-in-error"
    tag = f"{stack.env['FHIR_NER_IDENTIFIER_NAMESPACE']}/document|{document_id}"
    live = [
        entry["resource"]
        for entry in httpx.get(f"{stack.ehr.base_url}/Observation", params={"_tag": tag}, timeout=10).json()["entry"]
        if entry["resource"]["status"] != "entered-in-error"
    ]
    assert "fiebre" not in [r["code"]["text"] for r in live]
    page.goto(f"/review/notes/{document_id}")
    assert f"version {version}" in page.locator("h1").inner_text()
    assert "not written: a reviewer rejected this finding" in _row(page, "fiebre").inner_text()


def test_a_corrected_span_is_in_the_feedback_export(
    page: Any, stack: Stack, reviewed: Reviewed, tmp_path: Path
) -> None:
    from worker.nlp.corpus import read_brat_folder

    document_id = reviewed.document["id"]
    log_in(page, f"/review/notes/{document_id}")
    row = _row(page, "radiografía de tórax")
    row.locator("details.correct summary").click()
    start = int(row.locator("input[name=start]").input_value())
    end_field = row.locator("input[name=end]")
    end_field.fill(str(start + len("radiografía")))
    end_field.press("Enter")  # submits the form
    page.wait_for_url("**message=action-queued*")
    _wait_action(page, "correct")
    assert "radiografía [" in _row(page, "radiografía").inner_text()
    folder = tmp_path / "feedback"
    subprocess.run(
        [sys.executable, "-m", "adapter.cli", "feedback", "export", str(folder)],
        env={**os.environ, **stack.env},
        cwd=REPO_ROOT,
        check=True,
        timeout=120,
    )
    (document,) = read_brat_folder(folder)
    assert document_id not in document.doc_id
    spans = {(s.label, s.text) for s in document.spans}
    assert ("PROCEDURE", "radiografía") in spans and ("PROCEDURE", "radiografía de tórax") not in spans
    if reviewed.rejected:  # by the test before: the rejection holds for the later version's training document
        assert ("SYMPTOM", "fiebre") not in spans


def test_a_launch_from_the_ehr_lands_on_the_patient_view_as_the_practitioner(browser: Any, stack: Stack) -> None:
    """The EHR opens /review/launch; its authorization server sends the browser back with a code; the adapter
    lands on the launched patient's view with the practitioner's name. The adapter is opened as ``localhost`` and
    the EHR is ``127.0.0.1``: the EHR's redirect back is a cross-site navigation, as with a real EHR."""
    port = urlsplit(stack.url).port
    adapter = f"http://localhost:{port}"
    stack.ehr.smart_client(SMART_CLIENT, [f"{adapter}/review/launch/callback"])
    launch = stack.ehr.smart_launch(stack.patient, "Practitioner/prac-browser", "Dr Eva Launch")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"{adapter}/review/launch?{urlencode({'iss': stack.ehr.base_url, 'launch': launch})}")
        page.wait_for_url(f"{adapter}/review/patients/{stack.patient}", timeout=20000)
        assert page.locator(".who strong").inner_text() == "Dr Eva Launch"
        assert page.locator("section[aria-labelledby=h-Condition] .problems > li").count() >= 1
        assert [c["name"] for c in context.cookies() if c["name"].startswith("fhir_ner_launch_")] == []
        shot(page, "launched-patient")
        # The session is the patient's: the queue leads back to the patient view.
        page.goto(f"{adapter}/review")
        assert page.url == f"{adapter}/review/patients/{stack.patient}"
    finally:
        context.close()
