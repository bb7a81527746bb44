"""The receiver against real Redis: authentication, bad input as OperationOutcomes, de-duplication, note rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from receiver_helpers import AUTH, EHR_BASE, assert_outcome, backport, document, post

from core.jobs import RecordingJobQueue

pytest_plugins = ["receiver_fixtures"]


def statuses(api: TestClient, doc_id: str) -> dict[str, Any]:
    response = api.get(f"/documents/{doc_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    versions: dict[str, Any] = response.json()["versions"]
    return versions


def test_notification_is_queued_once_and_redeliveries_are_ignored(api: TestClient, jobs: RecordingJobQueue) -> None:
    assert post(api, backport(document())).status_code == 200
    replay = post(api, backport(document()))
    assert replay.status_code == 200 and "0 queued" in replay.json()["issue"][0]["diagnostics"]
    assert jobs.of("process_note") == [("note-1", "1")]
    # A new version of the note is a new job, and is recorded as a revision of the first.
    assert post(api, backport(document(version="2"), event=2)).status_code == 200
    assert jobs.of("process_note") == [("note-1", "1"), ("note-1", "2")]
    versions = statuses(api, "note-1")
    assert {v: r["status"] for v, r in versions.items()} == {"1": "queued", "2": "queued"}
    assert versions["2"]["previous_versions"] == ["1"] and versions["2"]["subscription"] == "Subscription/s1"


def test_the_note_waits_in_redis_for_the_worker(api: TestClient, jobs: RecordingJobQueue) -> None:
    from core.deps import get_note_state

    post(api, backport(document()))
    stored = get_note_state().load_note("note-1", "1")
    assert stored is not None and stored["id"] == "note-1"


def test_rotation_tokens_and_wrong_tokens(api: TestClient, jobs: RecordingJobQueue) -> None:
    old = {**AUTH, "Authorization": "Bearer test-token-old"}
    assert post(api, backport(document()), old).status_code == 200
    assert "token" in assert_outcome(post(api, backport(document("n2")), {**AUTH, "Authorization": "Bearer x"}), 401)
    assert_outcome(post(api, backport(document("n3")), {"Content-Type": "application/fhir+json"}), 401)
    assert_outcome(post(api, backport(document("n4")), {**AUTH, "Authorization": "Basic dGVzdC10b2tlbg=="}), 401)
    unauthorised = post(api, backport(document("n5")), {**AUTH, "Authorization": "Bearer test-token-older"})
    assert unauthorised.headers["WWW-Authenticate"] == "Bearer"
    assert jobs.of("process_note") == [("note-1", "1")]


def test_medplum_signature(
    receiver_env: dict[str, str], jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapter.app import create_app
    from core.deps import reset_dependencies

    monkeypatch.setenv("FHIR_NER_SIGNATURE_SECRETS", "old-secret,medplum-secret")
    monkeypatch.delenv("FHIR_NER_SUBSCRIPTION_TOKENS")
    reset_dependencies()
    raw = json.dumps(document()).encode()
    signature = hmac.new(b"medplum-secret", raw, hashlib.sha256).hexdigest()
    plain = {"Content-Type": "application/fhir+json"}
    with TestClient(create_app()) as client:
        assert post(client, raw, {**plain, "X-Signature": signature}).status_code == 200
        # Signed with one secret, the body changed on the way: refused.
        tampered = raw.replace(b"current", b"current ")
        assert_outcome(post(client, tampered, {**plain, "X-Signature": signature}), 401)
        assert_outcome(post(client, raw, {**plain, "X-Signature": "00" * 32}), 401)
        assert_outcome(post(client, raw, plain), 401)
    assert jobs.of("process_note") == [("note-1", "1")]


def test_signature_is_checked_even_beside_a_valid_token(
    receiver_env: dict[str, str], jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapter.app import create_app
    from core.deps import reset_dependencies

    monkeypatch.setenv("FHIR_NER_SIGNATURE_SECRETS", "medplum-secret")
    reset_dependencies()
    with TestClient(create_app()) as client:
        assert post(client, backport(document())).status_code == 200  # the token alone is enough
        assert_outcome(post(client, backport(document("n2")), {**AUTH, "X-Signature": "bad"}), 401)
    assert jobs.of("process_note") == [("note-1", "1")]


@pytest.mark.parametrize(
    ("body", "status", "phrase"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"[" * 100_000, 400, "not valid JSON"),
        ({"resourceType": "Patient"}, 400, "expected a notification Bundle"),
        ({"resourceType": "Bundle", "type": "history", "entry": []}, 400, "no status entry"),
        ({"resourceType": "Bundle", "type": "history", "entry": [{"fullUrl": "x"}]}, 400, "no status resource"),
        ({"resourceType": "Bundle", "type": "searchset", "entry": []}, 400, "not a subscription notification"),
        ({"resourceType": "Bundle", "type": "message", "entry": []}, 400, "MessageHeader"),
        ([1, 2, 3], 400, "JSON object"),
    ],
)
def test_bad_input_gets_an_operation_outcome_and_nothing_is_queued(
    api: TestClient, jobs: RecordingJobQueue, body: Any, status: int, phrase: str
) -> None:
    assert phrase in assert_outcome(post(api, body), status)
    assert jobs.jobs == []


def test_unknown_notification_type_and_invalid_fhir_are_refused(api: TestClient, jobs: RecordingJobQueue) -> None:
    bad_type = backport(document())
    bad_type["entry"][0]["resource"]["parameter"][3]["valueCode"] = "party"
    assert "unknown notification type" in assert_outcome(post(api, bad_type), 400)
    invalid = backport(document(status=42))
    assert "invalid Bundle" in assert_outcome(post(api, invalid), 400)
    bad_number = backport(document(), event=1)
    bad_number["entry"][0]["resource"]["parameter"][4]["valueString"] = "many"
    assert "not an integer" in assert_outcome(post(api, bad_number), 400)
    assert jobs.jobs == []


def test_invalid_base64_attachment_is_refused(api: TestClient, jobs: RecordingJobQueue) -> None:
    doc = document()
    doc["content"][0]["attachment"]["data"] = "%%%not-base64%%%"
    assert_outcome(post(api, backport(doc)), 400)
    bare = document()
    bare["content"][0]["attachment"]["data"] = "aGVsbG8"  # missing padding
    assert_outcome(post(api, bare), 400)
    assert jobs.jobs == []


def test_wrong_content_type_and_oversize_body(
    api: TestClient, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_outcome(post(api, backport(document()), {**AUTH, "Content-Type": "text/plain"}), 415)
    assert_outcome(post(api, backport(document()), {"Authorization": "Bearer test-token"}), 415)
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_body_bytes", 100)
    assert_outcome(post(api, backport(document())), 413)
    # A chunked body without Content-Length is cut off at the limit too.
    chunks = iter([b"{" + b" " * 80, b" " * 80 + b"}"])
    streamed = api.post("/fhir/notify", content=chunks, headers=AUTH)
    assert_outcome(streamed, 413)
    assert jobs.jobs == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/fhir+json",
        "application/fhir+json; fhirVersion=4.0",
        "application/fhir+json;fhirVersion=4.3; charset=utf-8",
        "application/json",
        "Application/JSON; charset=UTF-8",
    ],
)
def test_content_types(api: TestClient, jobs: RecordingJobQueue, content_type: str) -> None:
    assert post(api, backport(document()), {**AUTH, "Content-Type": content_type}).status_code == 200
    assert jobs.of("process_note") == [("note-1", "1")]


def test_classic_rest_hook_post_and_put_of_the_bare_resource(api: TestClient, jobs: RecordingJobQueue) -> None:
    assert "rest" not in post(api, document("hook")).text
    put = api.put("/fhir/notify/DocumentReference/hook", content=json.dumps(document("hook", "2")), headers=AUTH)
    assert put.status_code == 200, put.text
    without_id = document("x", "3")
    del without_id["id"]
    assert (
        api.put("/fhir/notify/DocumentReference/hook", content=json.dumps(without_id), headers=AUTH).status_code == 200
    )
    mismatch = api.put("/fhir/notify/DocumentReference/other", content=json.dumps(document("hook", "4")), headers=AUTH)
    assert "does not match" in assert_outcome(mismatch, 400)
    not_a_note = api.put("/fhir/notify/DocumentReference/hook", content=json.dumps(backport()), headers=AUTH)
    assert_outcome(not_a_note, 400)
    bad_id = api.put("/fhir/notify/DocumentReference/a$b", content=json.dumps(document("hook")), headers=AUTH)
    assert_outcome(bad_id, 400)
    assert jobs.of("process_note") == [("hook", "1"), ("hook", "2"), ("hook", "3")]


def test_r5_document_reference_by_content_type(api: TestClient, jobs: RecordingJobQueue) -> None:
    r5 = {**document("r5note"), "docStatus": "final"}
    headers = {**AUTH, "Content-Type": "application/fhir+json; fhirVersion=5.0"}
    assert post(api, r5, headers).status_code == 200
    assert jobs.of("process_note") == [("r5note", "1")]


def test_notes_we_do_not_process_are_recorded_as_skipped(api: TestClient, jobs: RecordingJobQueue) -> None:
    post(api, backport(document("draft", docStatus="preliminary")))
    pdf = document("pdf")
    pdf["content"][0]["attachment"]["contentType"] = "application/pdf"
    post(api, backport(pdf))
    post(api, backport(document("old", status="superseded")))
    answer = post(api, backport(document("draft2", docStatus="preliminary"), event=4))
    assert "skipped: docStatus is 'preliminary'" in answer.text
    assert jobs.jobs == []
    draft = statuses(api, "draft")["1"]
    assert draft["status"] == "skipped" and "preliminary" in draft["reason"]
    assert "application/pdf" in statuses(api, "pdf")["1"]["reason"]
    assert "superseded" in statuses(api, "old")["1"]["reason"]


def test_preliminary_notes_when_configured(
    api: TestClient, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "accept_preliminary", True)
    post(api, backport(document("draft", docStatus="preliminary")))
    assert jobs.of("process_note") == [("draft", "1")]


def test_html_and_xhtml_notes_are_read_other_types_skipped(api: TestClient, jobs: RecordingJobQueue) -> None:
    html = document("html", text="<p>Paciente con <b>fiebre</b></p>")
    html["content"][0]["attachment"]["contentType"] = "text/html; charset=utf-8"
    xhtml = document("xhtml", text='<div xmlns="http://www.w3.org/1999/xhtml">tos</div>')
    xhtml["content"][0]["attachment"]["contentType"] = "application/xhtml+xml"
    rtf = document("rtf")
    rtf["content"][0]["attachment"]["contentType"] = "application/rtf"
    post(api, backport([html, xhtml, rtf], event=[1, 2, 3]))
    assert jobs.of("process_note") == [("html", "1"), ("xhtml", "1")]
    assert "application/rtf" in statuses(api, "rtf")["1"]["reason"]


def test_entered_in_error_is_passed_on_as_a_retraction(api: TestClient, jobs: RecordingJobQueue) -> None:
    post(api, backport(document()))
    post(api, backport(document(version="2", status="entered-in-error"), event=2))
    post(api, backport(document(version="2", status="entered-in-error"), event=2))  # redelivered
    assert jobs.of("process_note") == [("note-1", "1")]
    assert jobs.of("retract_note") == [("note-1", "2")]
    record = statuses(api, "note-1")["2"]
    assert record["status"] == "queued" and record["action"] == "retract"


def test_attachment_urls_outside_the_ehr_are_refused(api: TestClient, jobs: RecordingJobQueue) -> None:
    inside = document("inside")
    inside["content"][0]["attachment"] = {"contentType": "text/plain", "url": f"{EHR_BASE}/Binary/1"}
    relative = document("relative")
    relative["content"][0]["attachment"] = {"contentType": "text/plain", "url": "Binary/2"}
    outside = document("outside")
    outside["content"][0]["attachment"] = {"contentType": "text/plain", "url": "http://evil.example/steal"}
    answer = post(api, backport([inside, relative, outside], event=[1, 2, 3]))
    assert answer.status_code == 200 and "1 refused" in answer.text
    assert jobs.of("process_note") == [("inside", "1"), ("relative", "1")]
    assert "outside the configured EHR base URL" in statuses(api, "outside")["1"]["reason"]


def test_id_only_focus(api: TestClient, jobs: RecordingJobQueue) -> None:
    versioned = f"{EHR_BASE}/DocumentReference/a/_history/3"
    current = "DocumentReference/b"
    elsewhere = "https://other.example/fhir/DocumentReference/c"
    encounter = f"{EHR_BASE}/Encounter/e"
    answer = post(api, backport(None, [1, 2, 3, 4], focus=[versioned, current, elsewhere, encounter]))
    assert answer.status_code == 200
    assert jobs.of("process_note") == [("a", "3")]
    assert jobs.of("resolve_note") == [("b", "Subscription/s1")]
    assert "1 refused" in answer.text and "1 not a note" in answer.text
    assert "other.example" in answer.text  # the refusal names the URL, never note text
    # Redelivered: the same events create no second job.
    post(api, backport(None, [1, 2, 3, 4], focus=[versioned, current, elsewhere, encounter]))
    assert len(jobs.jobs) == 2


def test_authorization_hint_is_kept_beside_the_job_not_in_it(api: TestClient, jobs: RecordingJobQueue) -> None:
    from core.deps import get_note_state

    bundle = backport(None, 1, focus=["DocumentReference/b"])
    bundle["entry"][0]["resource"]["parameter"][5]["part"] += [
        {"name": "authorization-type", "valueCoding": {"code": "authorization_base"}},
        {"name": "authorization-value", "valueString": "secret-hint"},
    ]
    post(api, bundle)
    assert jobs.of("resolve_note") == [("b", "Subscription/s1")]
    assert "secret-hint" not in repr(jobs.jobs)
    assert get_note_state().load_hint("b") == ("authorization_base", "secret-hint")


def test_empty_payload_enqueues_a_recovery(api: TestClient, jobs: RecordingJobQueue) -> None:
    post(api, backport(None, 1, focus=[None]))
    post(api, backport(None, 2, focus=[None]))
    post(api, backport(None, 2, focus=[None]))  # redelivered
    [first, second] = jobs.of("recover_events")
    assert first[:3] == ("Subscription/s1", 1, 1) and second[:3] == ("Subscription/s1", 2, 2)
    assert first[3] == second[3] == 1795167000.0  # the event's time: the _lastUpdated fallback starts there


def test_queue_down_answers_503_and_the_retry_is_accepted(
    api: TestClient, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(jobs, "send", broken)
    answer = post(api, backport(document()))
    assert_outcome(answer, 503)
    assert answer.headers["Retry-After"] == "5"
    assert_outcome(post(api, backport(None, 2, focus=["DocumentReference/b"])), 503)
    assert statuses(api, "note-1")["1"]["status"] == "failed"
    monkeypatch.undo()
    assert post(api, backport(document())).status_code == 200
    assert post(api, backport(None, 2, focus=["DocumentReference/b"])).status_code == 200
    assert jobs.of("process_note") == [("note-1", "1")]
    assert jobs.of("resolve_note") == [("b", "Subscription/s1")]


def test_health_readiness_metrics_and_openapi(api: TestClient, jobs: RecordingJobQueue) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json()["redis"] == "ok"
    assert api.get("/documents/unknown", headers=AUTH).status_code == 404
    assert api.get("/documents/unknown").status_code == 401
    assert api.get("/subscriptions").status_code == 401
    post(api, backport(document()))
    post(api, b"{", AUTH)
    metrics = api.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    text = metrics.text
    for name in (
        'fhir_ner_notifications_total{outcome="accepted",type="event-notification"}',
        'fhir_ner_notifications_total{outcome="invalid",type="unknown"}',
        "fhir_ner_notification_ack_seconds_bucket",
        "fhir_ner_queue_depth",
        "fhir_ner_gaps_detected_total",
        "fhir_ner_gaps_recovered_total",
        'fhir_ner_notes_total{outcome="queued"}',
    ):
        assert name in text, name
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/fhir/notify", "/fhir/notify/DocumentReference/{document_id}", "/documents/{document_id}"} <= set(paths)
    assert {"/healthz", "/readyz", "/metrics", "/subscriptions"} <= set(paths)
    notify = paths["/fhir/notify"]["post"]
    assert "application/fhir+json" in notify["requestBody"]["content"]
    assert {"200", "400", "401", "413", "415", "503"} <= set(notify["responses"])


def test_a_note_over_the_length_limit_is_skipped_not_cut(
    api: TestClient, jobs: RecordingJobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_note_chars", 10)
    assert post(api, backport(document("long"))).status_code == 200
    assert jobs.jobs == []
    record = statuses(api, "long")["1"]
    assert record["status"] == "skipped" and "over the limit of 10" in record["reason"]


def test_notes_without_version_get_a_content_version(api: TestClient, jobs: RecordingJobQueue) -> None:
    post(api, document("nov", version=None))
    post(api, document("nov", version=None))
    post(api, document("nov", version=None, text="Otra nota."))
    versions = [v for _, v in jobs.of("process_note")]
    assert len(versions) == 2 and all(v.startswith("h") for v in versions)


def test_documents_without_a_usable_id_are_refused(api: TestClient, jobs: RecordingJobQueue) -> None:
    no_id = document()
    del no_id["id"]
    assert "without an id" in assert_outcome(post(api, backport(no_id)), 400)
    assert jobs.jobs == []


def test_note_text_never_reaches_errors(api: TestClient, jobs: RecordingJobQueue) -> None:
    secret = "Paciente con fiebre y tos."
    doc = document(text=secret)
    doc[secret] = 1  # an unknown key named after the note text
    answer = post(api, backport(doc))
    assert answer.status_code == 400 and secret not in answer.text
    doc = document()
    doc["content"][0]["attachment"]["data"] = base64.b64encode(secret.encode()).decode() + "!"
    answer = post(api, backport(doc))
    assert answer.status_code == 400 and secret not in answer.text
