"""The review pages from the API's side (issue 16): off unless configured, login, session cookie, CSRF, CSP, and no
note text for anyone not logged in. The worker's records are seeded into Redis as the worker writes them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

NOTE_TEXT = "Paciente con fiebre y tos. Diagnóstico de neumonía. No presenta disnea."
SECRET = "neumonía"
REVIEWERS = "Dr Ana Ruiz:ana-token-123456,Bob:bob-token-654321"


def _mention(index: int, label: str, word: str, **extra: Any) -> dict[str, Any]:
    start = NOTE_TEXT.index(word)
    return {
        "index": index,
        "label": label,
        "start": start,
        "end": start + len(word),
        "text": word,
        "confidence": 0.91,
        "assertion": "present",
        "codes": [],
        "resource": None,
        "resource_type": None,
        "mention_key": None,
        "status": None,
        "outcome": "none",
        "reason": None,
        **extra,
    }


def seed_note(document_id: str = "note-1", version: str = "1") -> dict[str, Any]:
    from core.deps import get_note_state, get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    record = {
        "document": document_id,
        "version": version,
        "subject": "Patient/p-1",
        "date": None,
        "language": "es",
        "attachment": "DocumentReference.content[0].attachment",
        "text": NOTE_TEXT,
        "mentions": [
            _mention(
                0,
                "SYMPTOM",
                "fiebre",
                resource="Observation/o1",
                resource_type="Observation",
                outcome="written",
                status="preliminary",
            ),
            _mention(1, "SYMPTOM", "tos", resource="Observation/o2", resource_type="Observation", outcome="written"),
            _mention(
                2,
                "DISEASE",
                "neumonía",
                resource="Condition/c1",
                resource_type="Condition",
                outcome="written",
                status="unconfirmed",
                codes=[{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J18.9", "display": "Pneumonia"}],
            ),
            _mention(
                3,
                "SYMPTOM",
                "disnea",
                assertion="negated",
                reason="dropped by profile: negated mentions of SYMPTOM are not written",
            ),
        ],
        "model": {"name": "tiny", "revision": "tiny-test"},
        "provenance": "Provenance/pv1",
        "retired": [],
        "superseded_by": None,
        "profile": "default",
        "ehr_base_url": "http://ehr.example/fhir",
        "recorded": 1.0,
    }
    ReviewStore(get_redis(), get_settings().key_prefix).put_record(document_id, version, record)
    get_note_state().set_status(document_id, version, "done", mentions=4, resources=["Condition/c1"])
    return record


@pytest.fixture()
def review_env(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from core.deps import reset_dependencies

    monkeypatch.setenv("FHIR_NER_REVIEW_TOKENS", REVIEWERS)
    monkeypatch.setenv("FHIR_NER_REVIEW_TRY_TIMEOUT_SECONDS", "0.6")
    monkeypatch.setenv("FHIR_NER_RECOVERY_CHECK_SECONDS", "0")
    reset_dependencies()
    return {**app_env, "FHIR_NER_REVIEW_TOKENS": REVIEWERS}


@pytest.fixture()
def client(review_env: dict[str, str]) -> Iterator[TestClient]:
    from adapter.app import create_app

    with TestClient(create_app(), follow_redirects=False) as test_client:
        yield test_client


def login(client: TestClient, token: str = "ana-token-123456", next_path: str = "/review") -> Any:
    form = client.get("/review/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf
    return client.post("/review/login", data={"token": token, "csrf": csrf.group(1), "next": next_path})


def page_csrf(client: TestClient, path: str = "/review") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found
    return found.group(1)


PAGES = [
    "/review",
    "/review/notes/note-1",
    "/review/notes/note-1?version=1",
    "/review/patients/p-1",
    "/review/patients/p-1?refuted=true",
    "/review/try",
]


def test_the_pages_are_off_unless_reviewer_tokens_are_configured(app_env: dict[str, str]) -> None:
    from adapter.app import create_app

    seed_note()
    with TestClient(create_app(), follow_redirects=False) as client:
        for path in [*PAGES, "/review/login", "/review/static/review.css"]:
            response = client.get(path)
            assert response.status_code == 404, path
            assert SECRET not in response.text
        assert client.post("/review/login", data={"token": "x"}).status_code == 404


def test_without_login_every_page_redirects_to_the_login_and_serves_no_note_text(client: TestClient) -> None:
    seed_note()
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/review/login?next=/review")
        assert SECRET not in response.text and "fiebre" not in response.text
    # A forged or expired session cookie is no login either.
    client.cookies.set("fhir_ner_review", "forged", path="/review")
    assert client.get("/review/notes/note-1").status_code == 303
    for path in ["/review/try", "/review/dlq/retry", "/review/logout"]:
        response = client.post(path, data={"text": "x"})
        assert response.status_code == 303, path


def test_login_sets_a_strict_httponly_session_cookie_and_goes_where_it_was_asked(client: TestClient) -> None:
    seed_note()
    response = login(client, next_path="/review/notes/note-1")
    assert response.status_code == 303
    assert response.headers["location"] == "/review/notes/note-1"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("fhir_ner_review="))
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/review" in cookie
    assert "Secure" not in cookie  # plain HTTP here
    page = client.get("/review/notes/note-1")
    assert page.status_code == 200
    assert SECRET in page.text
    assert "Dr Ana Ruiz" in page.text


def test_the_cookie_is_secure_behind_https(client: TestClient) -> None:
    form = client.get("/review/login", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in form.headers["set-cookie"]
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf
    login_cookie = form.cookies["fhir_ner_login_csrf"]  # a Secure cookie: the client keeps it for HTTPS only
    response = client.post(
        "/review/login",
        data={"token": "bob-token-654321", "csrf": csrf.group(1)},
        headers={"X-Forwarded-Proto": "https", "Cookie": f"fhir_ner_login_csrf={login_cookie}"},
    )
    assert response.status_code == 303
    assert "Secure" in next(c for c in response.headers.get_list("set-cookie") if c.startswith("fhir_ner_review="))


def test_a_wrong_token_or_a_login_without_its_csrf_token_is_refused(client: TestClient) -> None:
    assert login(client, token="ana-token-1234567").status_code == 401
    assert login(client, token="").status_code == 401
    client.get("/review/login")
    no_csrf = client.post("/review/login", data={"token": "ana-token-123456"})
    assert no_csrf.status_code == 403
    assert "fhir_ner_review=" not in no_csrf.headers.get("set-cookie", "")
    # Next is followed only inside the review pages.
    response = login(client, next_path="https://evil.example/")
    assert response.headers["location"] == "/review"


def test_every_page_carries_a_content_security_policy(client: TestClient) -> None:
    seed_note()
    responses = [client.get("/review/login")]
    login(client)
    responses += [client.get(path) for path in PAGES[:-1]]
    responses.append(client.get("/review/static/review.js"))
    for response in responses:
        assert response.status_code == 200
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
    # No inline script anywhere, so the policy costs nothing.
    for response in responses[:-1]:
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text)
        assert " on" + "click=" not in response.text


def test_every_post_needs_the_session_csrf_token(client: TestClient) -> None:
    from core.celery_app import broker_queue_key
    from core.deps import get_redis

    login(client)
    csrf = page_csrf(client)
    for path, data in [
        ("/review/dlq/retry", {"letter": "process_note:note-1:1"}),
        ("/review/try", {"text": "fiebre"}),
        ("/review/logout", {}),
    ]:
        assert client.post(path, data=data).status_code == 403, path
        assert client.post(path, data={**data, "csrf": "wrong"}).status_code == 403, path
        foreign = client.post(path, data={**data, "csrf": csrf}, headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403, path
        cross_site = client.post(path, data={**data, "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"})
        assert cross_site.status_code == 403, path
    assert get_redis().llen(broker_queue_key("io")) == 0  # nothing was sent
    # The header form works for scripts.
    response = client.post("/review/dlq/retry", data={"letter": "x"}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 303
    # Logging out ends the session on the server, not only in the browser.
    old_cookie = client.cookies.get("fhir_ner_review")
    assert client.post("/review/logout", data={"csrf": csrf}).status_code == 303
    client.cookies.set("fhir_ner_review", old_cookie or "", path="/review")
    assert client.get("/review").status_code == 303


def test_the_note_view_highlights_each_mention_at_its_exact_characters(client: TestClient) -> None:
    record = seed_note()
    login(client)
    page = client.get("/review/notes/note-1").text
    marks = re.findall(
        r'<mark class="mention ([^"]+)" id="m-(\d+)" tabindex="0" data-start="(\d+)" data-end="(\d+)"[^>]*>'
        r'<span class="mention-text">([^<]*)</span><span class="tag" aria-hidden="true">([^<]*)</span>',
        page,
    )
    assert len(marks) == 4
    for classes, _, start, end, text, tag in marks:
        assert NOTE_TEXT[int(start) : int(end)] == text
        label = next(m["label"] for m in record["mentions"] if m["text"] == text)
        assert f"label-{label}" in classes
        assert tag.startswith(label)  # the label is written out, not only a colour
    assert "SYMPTOM · negated" in page
    assert "assert-negated" in page
    # Details for hover and focus: confidence, code and display, what it became or why not.
    assert "confidence 0.91" in page
    assert "J18.9 Pneumonia (ICD-10-CM)" in page
    assert "became Condition/c1 (unconfirmed)" in page
    assert "dropped by profile: negated mentions of SYMPTOM are not written" in page
    # The side panel: resources on the EHR, the Provenance, the model.
    assert 'href="http://ehr.example/fhir/Condition/c1"' in page
    assert 'href="http://ehr.example/fhir/Provenance/pv1"' in page
    assert "tiny-test" in page
    # The whole text is there, escaped.
    assert "Diagnóstico de " in page


def test_the_note_view_lists_versions_and_what_each_retired(client: TestClient) -> None:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    record = seed_note()
    second = {
        **record,
        "version": "2",
        "retired": [{"reference": "Observation/o2", "text": "tos", "from_version": "1"}],
    }
    ReviewStore(get_redis(), get_settings().key_prefix).put_record("note-1", "2", second)
    login(client)
    page = client.get("/review/notes/note-1").text
    assert "version 2" in page and "version 1" in page
    assert "retired:" in page and "Observation/o2" in page
    assert client.get("/review/notes/nope").status_code == 404
    assert client.get("/review/notes/..%2F..").status_code == 404


def test_note_text_is_escaped(client: TestClient) -> None:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    record = seed_note()
    ReviewStore(get_redis(), get_settings().key_prefix).put_record(
        "note-x",
        "1",
        {**record, "document": "note-x", "text": "<script>alert(1)</script> " + NOTE_TEXT, "mentions": []},
    )
    login(client)
    page = client.get("/review/notes/note-x").text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_queue_lists_recent_notes_filters_them_and_retries_dead_letters(client: TestClient) -> None:
    from core.celery_app import broker_queue_key
    from core.deps import get_note_state, get_redis

    seed_note()
    state = get_note_state()
    state.set_status("note-2", "3", "skipped", reason="docStatus preliminary")
    state.set_status("note-3", "1", "dead-lettered", reason="EHR down", dead_letter="process_note:note-3:1")
    login(client)
    page = client.get("/review").text
    for expected in (
        "note-1",
        "note-2",
        "note-3",
        "docStatus preliminary",
        "dead-lettered",
        'href="/review/notes/note-2"',
    ):
        assert expected in page
    filtered = client.get("/review", params={"status": "dead-lettered"}).text
    assert "note-3" in filtered and "/review/notes/note-1" not in filtered
    assert "note-2" in client.get("/review", params={"q": "2"}).text
    assert SECRET not in page  # the queue shows states, never text
    letter = re.search(r'name="letter" value="([^"]+)"', filtered)
    assert letter and letter.group(1) == "process_note:note-3:1"
    response = client.post("/review/dlq/retry", data={"letter": letter.group(1), "csrf": page_csrf(client)})
    assert response.status_code == 303
    assert "retry-requested" in response.headers["location"]
    messages = get_redis().lrange(broker_queue_key("io"), 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "worker.review_tasks.retry_dead_letter"
    assert "Retry requested" in client.get(response.headers["location"]).text


def test_the_playground_shows_profile_errors_like_the_cli_and_says_when_no_worker_answers(client: TestClient) -> None:
    from core.celery_app import broker_queue_key
    from core.deps import get_redis

    login(client)
    csrf = page_csrf(client, "/review/try")
    broken = client.post(
        "/review/try",
        data={
            "csrf": csrf,
            "text": "fiebre",
            "profile_choice": "uploaded",
            "profile_yaml": "name: x\nlabels: [1, 2]\n",
        },
    )
    assert broken.status_code == 400
    assert "Error: uploaded profile: invalid mapping profile: labels" in broken.text
    not_yaml = client.post(
        "/review/try",
        data={"csrf": csrf, "text": "fiebre", "profile_choice": "uploaded"},
        files={"profile_file": ("p.yaml", b"name: [unclosed", "text/yaml")},
    )
    assert not_yaml.status_code == 400
    assert "Error: uploaded profile: not valid YAML" in not_yaml.text
    files = client.post(
        "/review/try",
        data={
            "csrf": csrf,
            "text": "fiebre",
            "profile_choice": "uploaded",
            "profile_yaml": "name: x\ncode_systems: [{name: a, file: /etc/passwd}]\nlabels: {}\n",
        },
    )
    assert files.status_code == 400 and "cannot be uploaded" in files.text
    assert get_redis().llen(broker_queue_key("inference")) == 0  # nothing sent for a broken profile
    waiting = client.post("/review/try", data={"csrf": csrf, "text": "Paciente con fiebre."})
    assert waiting.status_code == 504
    assert "needs a worker serving the inference queue" in waiting.text
    messages = get_redis().lrange(broker_queue_key("inference"), 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "worker.review_tasks.try_text"
    assert "fiebre" not in json.dumps(message)  # the text waits in Redis, never in the task message


def test_the_patient_view_groups_conditions_by_code_hides_refuted_ones_and_links_to_sentences(
    client: TestClient,
) -> None:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    record = seed_note()
    store = ReviewStore(get_redis(), get_settings().key_prefix)
    text = "Control. Persiste neumonía basal. Sin asma."
    start, asthma = text.index("neumonía"), text.index("asma")
    second = {
        **record,
        "document": "note-2",
        "text": text,
        "mentions": [
            {**record["mentions"][2], "index": 0, "start": start, "end": start + 8, "resource": "Condition/c2"},
            {
                **record["mentions"][2],
                "index": 1,
                "text": "asma",
                "start": asthma,
                "end": asthma + 4,
                "assertion": "negated",
                "status": "refuted",
                "resource": "Condition/c3",
                "codes": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J45.909", "display": "Asthma"}],
            },
        ],
    }
    store.put_record("note-2", "1", second)
    login(client)
    page = client.get("/review/patients/p-1").text
    # One line for pneumonia, with both sentences it came from, linked to the mention in each note.
    assert page.count("<strong>J18.9 Pneumonia</strong>") == 1
    assert 'href="/review/notes/note-1?version=1#m-2"' in page
    assert 'href="/review/notes/note-2?version=1#m-0"' in page
    assert 'Persiste <mark class="said">neumonía</mark> basal.' in page
    assert 'Diagnóstico de <mark class="said">neumonía</mark>.' in page
    # Refuted asthma is hidden unless asked for.
    assert "J45.909" not in page and "1 refuted condition(s) hidden" in page
    shown = client.get("/review/patients/p-1", params={"refuted": "true"}).text
    assert "J45.909 Asthma" in shown and "refuted" in shown
    # Observations and procedures have their own sections.
    assert "Observations" in page and "fiebre" in page
    assert client.get("/review/patients/nobody").status_code == 404


def test_review_tokens_must_be_name_token_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from core.settings import Settings

    for value in ("just-a-token-1234", ":nameless-token", "short:abc"):
        monkeypatch.setenv("FHIR_NER_REVIEW_TOKENS", value)
        with pytest.raises(ValidationError) as error:
            Settings()
        assert value.split(":")[-1] not in str(error.value)  # the secret is never echoed
        assert "FHIR_NER_REVIEW_TOKENS takes name:token pairs" in str(error.value)
    monkeypatch.setenv("FHIR_NER_REVIEW_TOKENS", " Ana : token-aaaa-1 ,Bob:token-bbbb-2")
    assert Settings().reviewers() == [("Ana", "token-aaaa-1"), ("Bob", "token-bbbb-2")]


# Reviewer actions -------------------------------------------------------------------------------------------------
def _action_form(client: TestClient, **fields: str) -> dict[str, str]:
    return {"csrf": page_csrf(client, "/review/notes/note-1"), "version": "1", **fields}


def test_the_note_view_offers_confirm_reject_correct_and_add_on_the_latest_version(client: TestClient) -> None:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    record = seed_note()
    login(client)
    page = client.get("/review/notes/note-1").text
    # A confirm and a reject form per written resource, a correct form, and the add form; none for disnea.
    assert page.count('name="kind" value="confirm"') == 3
    assert page.count('name="kind" value="reject"') == 3
    assert page.count('name="kind" value="correct"') == 3
    assert page.count('name="kind" value="add"') == 1
    assert 'aria-label="Confirm neumonía (Condition/c1)"' in page
    assert '<label for="add-start">Start</label>' in page and 'id="add-start"' in page
    # Each form carries the session's CSRF token.
    assert page.count(f'name="csrf" value="{page_csrf(client)}"') >= 11
    # An older version is shown without controls (actions go on what the EHR holds now).
    ReviewStore(get_redis(), get_settings().key_prefix).put_record("note-1", "2", {**record, "version": "2"})
    old = client.get("/review/notes/note-1", params={"version": "1"}).text
    assert 'value="confirm"' not in old
    stale = client.post(
        "/review/notes/note-1/actions", data=_action_form(client, kind="confirm", resource="Condition/c1")
    )
    assert stale.status_code == 409 and "act on the latest version" in stale.text


def test_an_action_needs_login_and_the_csrf_token(client: TestClient) -> None:
    from core.celery_app import broker_queue_key
    from core.deps import get_redis

    seed_note()
    data = {"version": "1", "kind": "confirm", "resource": "Condition/c1"}
    assert client.post("/review/notes/note-1/actions", data=data).status_code == 303  # to the login
    login(client)
    csrf = page_csrf(client)
    assert client.post("/review/notes/note-1/actions", data=data).status_code == 403
    assert client.post("/review/notes/note-1/actions", data={**data, "csrf": "wrong"}).status_code == 403
    foreign = client.post(
        "/review/notes/note-1/actions", data={**data, "csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    assert get_redis().llen(broker_queue_key("io")) == 0


def test_an_action_on_a_resource_of_another_note_or_an_unknown_note_is_a_404(client: TestClient) -> None:
    from core.celery_app import broker_queue_key
    from core.deps import get_redis

    seed_note()
    login(client)
    form = _action_form(client, kind="reject")
    for path, resource in [
        ("/review/notes/note-1/actions", "Condition/not-in-this-note"),
        ("/review/notes/note-1/actions", ""),
        ("/review/notes/nope/actions", "Condition/c1"),
    ]:
        response = client.post(path, data={**form, "resource": resource})
        assert response.status_code == 404, (path, resource)
        assert "Not found" in response.text or "not found" in response.text.lower()
    other_version = {**form, "version": "9", "resource": "Condition/c1"}
    assert client.post("/review/notes/note-1/actions", data=other_version).status_code == 404
    assert get_redis().llen(broker_queue_key("io")) == 0


def test_a_double_submit_is_one_action_and_one_task(client: TestClient) -> None:
    from core.celery_app import broker_queue_key
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    seed_note()
    login(client)
    form = _action_form(client, kind="confirm", resource="Condition/c1")
    first = client.post("/review/notes/note-1/actions", data=form)
    assert first.status_code == 303
    assert first.headers["location"] == "/review/notes/note-1?version=1&message=action-queued#actions"
    again = client.post("/review/notes/note-1/actions", data=form)
    assert again.headers["location"].endswith("message=action-exists#actions")
    store = ReviewStore(get_redis(), get_settings().key_prefix)
    (action,) = store.actions("note-1")
    assert action["kind"] == "confirm" and action["state"] == "queued" and action["reviewer"] == "Dr Ana Ruiz"
    assert action["mention"]["label"] == "DISEASE"
    messages = get_redis().lrange(broker_queue_key("io"), 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "worker.review_actions.apply_action"
    assert json.loads(__import__("base64").b64decode(message["body"]))[0] == [action["id"]]  # the id only
    assert SECRET not in json.dumps(message)
    page = client.get(first.headers["location"]).text
    assert "Action queued" in page and "confirm: <strong>queued</strong>" in page
    # A failed action sent again is tried again; a done one is not.
    store.update_action(action["id"], state="failed", message="the EHR did not take it")
    assert "failed" in client.get("/review/notes/note-1").text
    client.post("/review/notes/note-1/actions", data=form)
    assert store.action(action["id"])["state"] == "queued"
    assert get_redis().llen(broker_queue_key("io")) == 2


def test_corrections_and_additions_are_checked_against_the_note_text(client: TestClient) -> None:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    seed_note()
    login(client)
    form = _action_form(client)
    bad = [
        ({"kind": "add", "start": "5", "end": "3", "label": "DISEASE"}, "The span must lie inside the note text"),
        ({"kind": "add", "start": "0", "end": "999", "label": "DISEASE"}, "The span must lie inside the note text"),
        ({"kind": "add", "start": "a", "end": "3", "label": "DISEASE"}, "whole numbers"),
        ({"kind": "add", "start": "0", "end": "3", "label": "DRUG"}, "Label must be one of"),
        ({"kind": "add", "start": "0", "end": "3", "label": "DISEASE", "code": "<x>"}, "A code is letters"),
        ({"kind": "fix", "resource": "Condition/c1"}, "Unknown action."),
    ]
    for fields, problem in bad:
        response = client.post("/review/notes/note-1/actions", data={**form, **fields})
        assert response.status_code == 400, fields
        assert problem in response.text
    store = ReviewStore(get_redis(), get_settings().key_prefix)
    assert store.actions("note-1") == []
    start = NOTE_TEXT.index("Diagnóstico de neumonía")
    good = {
        "kind": "correct",
        "resource": "Condition/c1",
        "start": str(start),
        "end": str(start + len("Diagnóstico de neumonía")),
        "label": "DISEASE",
        "system": "http://hl7.org/fhir/sid/icd-10-cm",
        "code": "J18.9",
    }
    assert client.post("/review/notes/note-1/actions", data={**form, **good}).status_code == 303
    (action,) = store.actions("note-1")
    assert action["payload"] == {
        "start": start,
        "end": start + 23,
        "label": "DISEASE",
        "system": "http://hl7.org/fhir/sid/icd-10-cm",
        "code": "J18.9",
    }


def test_the_patient_view_marks_what_a_reviewer_confirmed_and_leaves_out_what_they_rejected(client: TestClient) -> None:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    record = seed_note()
    record["mentions"][2].update(status="confirmed", reviewed="confirmed")
    record["mentions"][0].update(status="entered-in-error", reviewed="rejected")
    ReviewStore(get_redis(), get_settings().key_prefix).put_record("note-1", "1", record)
    login(client)
    page = client.get("/review/patients/p-1").text
    assert "confirmed by a reviewer" in page
    assert "Observation/o1" not in page and "Observation/o2" in page


def test_the_note_view_reads_the_actions_before_the_record(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker writes an action's result into the record, then marks the action done: read in this order, a page
    # that shows an action done also shows its result (the other order showed "reject: done" beside "preliminary").
    from core.review import ReviewStore

    seed_note()
    login(client)
    reads: list[str] = []
    records, actions = ReviewStore.records, ReviewStore.actions

    def read_records(self: ReviewStore, document_id: str) -> Any:
        reads.append("records")
        return records(self, document_id)

    def read_actions(self: ReviewStore, document_id: str) -> Any:
        reads.append("actions")
        return actions(self, document_id)

    monkeypatch.setattr(ReviewStore, "records", read_records)
    monkeypatch.setattr(ReviewStore, "actions", read_actions)
    assert client.get("/review/notes/note-1").status_code == 200
    assert reads[:2] == ["actions", "records"]
