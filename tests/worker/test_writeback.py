"""Write-back against the FHIR test server (Medplum's R4 validator): create, replay, revise, retract.

The tagger is replaced by a stub that finds fixed phrases in the note, so these tests exercise the
mappings, the EHR searches and the transactions, not the model.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faults
import httpx
import pytest
from ehr.harness import FhirTestServer
from test_end_to_end import create, search

from mappings.bundle import ModelInfo, build_transaction, plan_transaction
from mappings.context import context_from_document_reference
from mappings.mentions import Mention
from mappings.profile import load_profile
from worker.ehr import EhrClient, EhrError, check_transaction_response

NAMESPACE = "urn:fhir-ner-adapter:wb-test"
MODEL = ModelInfo("stub-tagger", "rev-1")
GOLDEN = Path(__file__).resolve().parents[1] / "mappings" / "golden"
DERIVED_TYPES = ("Condition", "Observation", "Procedure", "FamilyMemberHistory")

# What the stub tagger finds: (label, phrase, assertion); every occurrence of the phrase, in any case, is a
# mention (of the phrase without its "sin ").
PHRASES: list[tuple[str, str, str]] = [
    ("DISEASE", "neumonía", "present"),
    ("DISEASE", "sin neumonía", "negated"),
    ("SYMPTOM", "fiebre", "present"),
    ("SYMPTOM", "tos", "present"),
    ("PROCEDURE", "radiografía de tórax", "present"),
]


def stub_tag_note(text: str, pipeline: Any = None, language: str | None = None) -> tuple[list[Mention], ModelInfo]:
    mentions: list[Mention] = []
    taken: list[tuple[int, int]] = []
    lowered = text.lower()  # same length as the text for these notes
    for label, phrase, assertion in sorted(PHRASES, key=lambda p: -len(p[1])):
        start = lowered.find(phrase)
        while start >= 0:
            end = start + len(phrase)
            if not any(s < end and start < e for s, e in taken):
                surface = phrase.removeprefix("sin ")
                offset = start + (len(phrase) - len(surface))
                mentions.append(Mention(label, offset, end, text[offset:end], 0.95, assertion))
                taken.append((start, end))
            start = lowered.find(phrase, end)
    return mentions, MODEL


def stub_tag_texts(
    pipeline: Any, texts: list[str], languages: list[str | None]
) -> tuple[list[list[Mention]], ModelInfo]:
    return [stub_tag_note(text)[0] for text in texts], MODEL


def stubbed_worker_env(
    ehr: FhirTestServer, monkeypatch: pytest.MonkeyPatch, namespace: str
) -> Iterator[FhirTestServer]:
    """The worker's tasks against the test EHR with the stub tagger and terminology off (shared with the
    review-action tests, which write under their own identifier namespace)."""
    from core.settings import get_settings
    from worker.runtime import reset_pipeline
    from worker.terminology import reset_terminology

    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", ehr.base_url)
    monkeypatch.setenv("FHIR_NER_IDENTIFIER_NAMESPACE", namespace)
    monkeypatch.setenv("FHIR_NER_TERMINOLOGY", "off")
    # One attempt per request: these tests drive the task-level retries (the client's own are in test_ehr_client).
    monkeypatch.setenv("FHIR_NER_EHR_RETRY_ATTEMPTS", "1")
    monkeypatch.delenv("FHIR_NER_WRITEBACK_DIR", raising=False)
    monkeypatch.delenv("FHIR_NER_MAPPING_PROFILE", raising=False)
    monkeypatch.setattr("worker.tasks.tag_note", stub_tag_note)
    monkeypatch.setattr("worker.tasks.tag_texts", stub_tag_texts)
    get_settings.cache_clear()
    reset_pipeline()
    reset_terminology()
    yield ehr
    get_settings.cache_clear()
    reset_pipeline()
    reset_terminology()


@pytest.fixture()
def writeback_env(
    ehr: FhirTestServer, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FhirTestServer]:
    yield from stubbed_worker_env(ehr, monkeypatch, NAMESPACE)


def put(ehr: FhirTestServer, resource: dict[str, Any]) -> dict[str, Any]:
    response = httpx.put(f"{ehr.base_url}/{resource['resourceType']}/{resource['id']}", json=resource, timeout=10)
    assert response.status_code == 200, response.text
    updated: dict[str, Any] = response.json()
    return updated


def note_document(ehr: FhirTestServer, text: str) -> dict[str, Any]:
    """A note about a new patient, created in the EHR."""
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba"}]})
    return faults.note_document(ehr, patient["id"], text)


def encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def revise(ehr: FhirTestServer, document: dict[str, Any], text: str) -> dict[str, Any]:
    revised = json.loads(json.dumps(document))
    revised["content"][0]["attachment"]["data"] = encode(text)
    return put(ehr, revised)


def derived(ehr: FhirTestServer, document_id: str) -> dict[str, dict[str, Any]]:
    """Every derived resource of the note, by ``Type/id``."""
    found: dict[str, dict[str, Any]] = {}
    for kind in DERIVED_TYPES:
        for resource in search(ehr, f"{kind}?_tag={NAMESPACE}/document|{document_id}"):
            found[f"{kind}/{resource['id']}"] = resource
    return found


def retired(resource: dict[str, Any]) -> bool:
    if resource["resourceType"] == "Condition":
        return bool(resource["verificationStatus"]["coding"][0]["code"] == "entered-in-error")
    return bool(resource["status"] == "entered-in-error")


def live_texts(ehr: FhirTestServer, document_id: str) -> list[str]:
    return sorted(r["code"]["text"] for r in derived(ehr, document_id).values() if not retired(r))


def fhir_posts(ehr: FhirTestServer) -> list[dict[str, Any]]:
    return [r for r in ehr.requests_log() if r["method"] in ("POST", "PUT")]


# --------------------------------------------------------------------------------------------------
# Every golden Bundle passes the server's R4 validator, and creates exactly its resources
# --------------------------------------------------------------------------------------------------
def test_every_golden_bundle_is_accepted_by_the_fhir_server(ehr: FhirTestServer) -> None:
    for path in sorted(GOLDEN.glob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))["expected"]
        if not bundle["entry"]:
            continue
        response = httpx.post(ehr.base_url, json=bundle, timeout=30)
        assert response.status_code == 200, f"{path.name}: {response.text[:2000]}"
        outcome = check_transaction_response(bundle, response.json())
        # The model's Device is created once, by the first Bundle; every other entry is new each time.
        assert len([c for c in outcome.created if not c.startswith("Device/")]) == len(bundle["entry"]) - 1
        again = check_transaction_response(bundle, httpx.post(ehr.base_url, json=bundle, timeout=30).json())
        assert again.created == [] and len(again.existing) == len(bundle["entry"]), path.name


# --------------------------------------------------------------------------------------------------
# The worker: first version, replay, revision, late delivery, retraction
# --------------------------------------------------------------------------------------------------
def test_a_note_its_replay_its_revision_and_its_retraction(writeback_env: FhirTestServer) -> None:
    from worker.tasks import process_document, retract_document

    ehr = writeback_env
    v1_text = "Paciente con fiebre y tos. Diagnóstico de neumonía. Se realizó radiografía de tórax."
    document = note_document(ehr, v1_text)
    doc_id = document["id"]
    assert document["meta"]["versionId"] == "1"

    # Version 1: four mentions → four resources, the Device and one Provenance.
    first = process_document(document, "1")
    assert first["mentions"] == 4
    assert sorted(r.split("/")[0] for r in first["resources"]) == [
        "Condition",
        "Device",
        "Observation",
        "Observation",
        "Procedure",
        "Provenance",
    ]
    assert first["retired"] == [] and first["kept"] == []
    assert live_texts(ehr, doc_id) == ["fiebre", "neumonía", "radiografía de tórax", "tos"]
    v1_resources = derived(ehr, doc_id)
    (provenance,) = search(ehr, f"Provenance?entity=DocumentReference/{doc_id}/_history/1")
    assert sorted(t["reference"] for t in provenance["target"]) == sorted(v1_resources)

    # Replay of version 1: nothing is written at all.
    ehr.clear_requests_log()
    replay = process_document(document, "1")
    assert replay["resources"] == [] and sorted(replay["kept"]) == sorted(v1_resources)
    assert fhir_posts(ehr) == []

    # Version 2: a sentence is inserted before everything (offsets move), "tos" is gone, "sin neumonía" is new
    # (the same disease, now negated), "radiografía de tórax" and "fiebre" stay.
    v2_text = "Evolución favorable. Paciente con fiebre, sin neumonía. Se realizó radiografía de tórax."
    v2_doc = revise(ehr, document, v2_text)
    assert v2_doc["meta"]["versionId"] == "2"
    second = process_document(v2_doc, "2")
    by_text = {r["code"]["text"]: ref for ref, r in v1_resources.items()}
    assert sorted(second["retired"]) == sorted([by_text["tos"], by_text["neumonía"]])
    assert sorted(second["kept"]) == sorted([by_text["fiebre"], by_text["radiografía de tórax"]])
    # The refuted Condition and the version's Provenances; the Device exists already.
    assert sorted(r.split("/")[0] for r in second["resources"]) == ["Condition", "Provenance", "Provenance"]
    assert [r.split("/")[0] for r in second["existing"]] == ["Device"]
    after = derived(ehr, doc_id)
    for ref in second["kept"]:
        assert after[ref] == v1_resources[ref]  # left alone: same version, same content
    retired_condition = after[by_text["neumonía"]]
    assert retired(retired_condition) and "clinicalStatus" not in retired_condition
    assert after[by_text["tos"]]["status"] == "entered-in-error"
    (refuted,) = [r for r in after.values() if r["resourceType"] == "Condition" and not retired(r)]
    assert refuted["verificationStatus"]["coding"][0]["code"] == "refuted"
    (nullify,) = [
        p
        for p in search(ehr, f"Provenance?entity=DocumentReference/{doc_id}/_history/2")
        if p["activity"]["coding"][0]["code"] == "NULLIFY"
    ]
    assert sorted(t["reference"] for t in nullify["target"]) == sorted(second["retired"])

    # Replay of version 2 and a late delivery of version 1: nothing written.
    ehr.clear_requests_log()
    assert process_document(v2_doc, "2")["resources"] == []
    late = process_document(document, "1")
    assert "superseded" in late["skipped"]
    assert fhir_posts(ehr) == []

    # Retraction (version 3, entered-in-error): everything still live is retired, the rest is not touched.
    retracted = put(ehr, {**v2_doc, "status": "entered-in-error"})
    before = derived(ehr, doc_id)
    outcome = process_document(retracted, retracted["meta"]["versionId"])
    live_before = sorted(ref for ref, r in before.items() if not retired(r))
    assert outcome["retracted"] is True and sorted(outcome["retired"]) == live_before
    final = derived(ehr, doc_id)
    assert all(retired(r) for r in final.values())
    for ref, resource in before.items():
        if retired(resource):
            assert final[ref]["meta"]["versionId"] == resource["meta"]["versionId"]
    # Retracting again writes nothing.
    ehr.clear_requests_log()
    assert retract_document(doc_id, "3")["retired"] == []
    assert fhir_posts(ehr) == []


def test_repeated_mentions_keep_their_identity_by_occurrence(writeback_env: FhirTestServer) -> None:
    from worker.tasks import process_document

    ehr = writeback_env
    document = note_document(ehr, "Dolor abdominal y fiebre.")
    process_document(document, "1")
    assert live_texts(ehr, document["id"]) == ["fiebre"]
    # Written differently (case) and elsewhere, plus a second occurrence: the first is kept, one is added.
    v2 = revise(ehr, document, "Ayer FIEBRE. Hoy fiebre otra vez.")
    second = process_document(v2, "2")
    assert len(second["kept"]) == 1 and second["retired"] == []
    assert live_texts(ehr, document["id"]) == ["fiebre", "fiebre"]
    # Back to one occurrence: the second is retired, the first stays.
    v3 = revise(ehr, v2, "Persiste la fiebre.")
    third = process_document(v3, "3")
    assert third["kept"] == second["kept"] and len(third["retired"]) == 1
    assert live_texts(ehr, document["id"]) == ["fiebre"]


def test_a_profile_change_rewrites_what_it_changes_in_place_and_nothing_else(
    writeback_env: FhirTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reprocessing with another profile: a resource whose mention is the same but whose content the profile
    changes is updated under its id (a new version, the Provenance naming the new profile); the others are
    left alone, and a second run rewrites nothing."""
    import yaml

    from core.deps import get_redis
    from core.settings import get_settings
    from mappings.bundle import profile_fingerprint
    from worker.runtime import get_profile, reset_pipeline
    from worker.tasks import process_document

    ehr = writeback_env
    document = note_document(ehr, "Paciente con fiebre. Diagnóstico de neumonía. Se realizó radiografía de tórax.")
    doc_id = document["id"]
    process_document(document, "1")
    before = derived(ehr, doc_id)
    assert sorted(r.split("/")[0] for r in before) == ["Condition", "Observation", "Procedure"]
    old_profile = profile_fingerprint(get_profile())

    # The new profile files symptoms under another category: same mention, same resource, other content.
    data = yaml.safe_load(Path("mappings/profiles/default.yaml").read_text(encoding="utf-8"))
    data["labels"]["SYMPTOM"]["params"]["category"] = "vital-signs"
    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setenv("FHIR_NER_MAPPING_PROFILE", str(profile_file))
    get_settings.cache_clear()
    reset_pipeline()
    new_profile = profile_fingerprint(get_profile())
    assert new_profile != old_profile
    # What `fhir-ner reprocess` leaves for the note version it queues (core/backfill.py).
    settings = get_settings()
    get_redis().set(f"{settings.key_prefix}:bulk:note:{doc_id}:1", "reprocess-test")

    outcome = process_document(document, "1")
    after = derived(ehr, doc_id)
    assert set(after) == set(before), "a resource was created or lost instead of updated in place"
    (observation,) = [ref for ref in before if ref.startswith("Observation/")]
    assert outcome["rewritten"] == [observation] and outcome["retired"] == []
    assert sorted(outcome["kept"]) == sorted(before)
    assert after[observation]["category"][0]["coding"][0]["code"] == "vital-signs"
    assert after[observation]["meta"]["versionId"] == "2" and not retired(after[observation])
    for ref in before:
        if ref != observation:  # unchanged: not rewritten, no new version
            assert after[ref] == before[ref]
    provenances = search(ehr, f"Provenance?entity=DocumentReference/{doc_id}/_history/1")
    (latest,) = [p for p in provenances if any(new_profile in policy for policy in p.get("policy", []))]
    assert latest["activity"]["coding"][0]["code"] == "CREATE"
    assert MODEL.revision in latest["agent"][0]["who"]["display"]
    assert sorted(t["reference"] for t in latest["target"]) == sorted(before)

    # The same note again under the same profile: nothing is rewritten, no Provenance is added.
    again = process_document(document, "1")
    assert again["rewritten"] == [] and again["retired"] == []
    assert derived(ehr, doc_id) == after
    assert len(search(ehr, f"Provenance?entity=DocumentReference/{doc_id}/_history/1")) == len(provenances)


def test_only_resources_derived_from_this_note_are_touched(writeback_env: FhirTestServer) -> None:
    from worker.tasks import process_document, retract_document

    ehr = writeback_env
    mine = note_document(ehr, "Paciente con neumonía y fiebre.")
    other = note_document(ehr, "Paciente con fiebre.")
    process_document(mine, "1")
    process_document(other, "1")
    # Carrying our document tag is not enough: one resource derived from the other note, one without our
    # identifier. Neither is ours to retire.
    (observation,) = derived(ehr, other["id"]).values()
    forged = {k: v for k, v in observation.items() if k not in ("id", "meta")}
    forged["meta"] = {"tag": [{"system": f"{NAMESPACE}/document", "code": mine["id"]}]}
    forged = create(ehr, forged)
    foreign = {k: v for k, v in forged.items() if k not in ("id", "meta", "identifier")}
    foreign["meta"] = forged["meta"]
    foreign["extension"] = [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/derivation-reference",
            "extension": [
                {"url": "reference", "valueReference": {"reference": f"DocumentReference/{mine['id']}/_history/1"}}
            ],
        }
    ]
    foreign = create(ehr, foreign)
    outcome = retract_document(mine["id"], "2")
    assert sorted(r.split("/")[0] for r in outcome["retired"]) == ["Condition", "Observation"]
    assert f"Observation/{forged['id']}" not in outcome["retired"]
    assert f"Observation/{foreign['id']}" not in outcome["retired"]
    for resource in (forged, foreign, observation):
        assert search(ehr, f"Observation?_id={resource['id']}")[0]["status"] == "preliminary"


def test_a_failed_search_or_transaction_writes_nothing_and_is_retried(
    writeback_env: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.tasks import process_document

    ehr = writeback_env
    document = note_document(ehr, "Paciente con neumonía y fiebre.")
    ehr.fail_next(1, 503)  # the first search
    with pytest.raises(EhrError) as error:
        process_document(document, "1")
    assert error.value.transient and error.value.status_code == 503
    # Only this patch is undone afterwards (monkeypatch.undo() would also bring the real model back).
    with monkeypatch.context() as patch:
        patch.setattr(EhrClient, "derived_resources", lambda *args: [])  # no searches: the POST comes first
        ehr.fail_next(1, 503)
        with pytest.raises(EhrError) as error:
            process_document(document, "1")
        assert error.value.transient
        assert derived(ehr, document["id"]) == {}
    assert len(process_document(document, "1")["resources"]) == 4  # Condition, Observation, Device, Provenance


def test_a_resource_changed_since_the_search_fails_the_transaction_as_transient(writeback_env: FhirTestServer) -> None:
    ehr = writeback_env
    document = note_document(ehr, "Paciente con tos.")
    from worker.tasks import process_document

    process_document(document, "1")
    v2 = revise(ehr, document, "Paciente sin síntomas.")
    client = EhrClient(ehr.base_url)
    existing = client.derived_resources(NAMESPACE, document["id"], DERIVED_TYPES)
    (observation,) = existing
    put(ehr, {**observation, "status": "final"})  # someone else edits it meanwhile
    plan = plan_transaction(
        context_from_document_reference(v2),
        [],
        load_profile(),
        MODEL,
        NAMESPACE,
        "2026-11-20T10:00:00Z",
        existing=existing,
    )
    with pytest.raises(EhrError) as error:
        client.write(plan.bundle, "x")
    assert error.value.status_code == 412 and error.value.transient
    client.close()


def test_a_mismatched_transaction_response_is_an_error() -> None:
    bundle = build_transaction(
        context_from_document_reference(
            {"resourceType": "DocumentReference", "id": "d", "subject": {"reference": "Patient/p"}}
        ),
        [Mention("DISEASE", 0, 4, "asma")],
        load_profile(),
        MODEL,
        NAMESPACE,
        "2026-11-20T10:00:00Z",
    )
    ok = {"response": {"status": "201 Created", "location": "Condition/1/_history/1"}}
    with pytest.raises(EhrError, match="answered 1 of 3"):
        check_transaction_response(bundle, {"resourceType": "Bundle", "type": "transaction-response", "entry": [ok]})
    failed = {"response": {"status": "400 Bad Request"}}
    with pytest.raises(EhrError, match="entry 1"):
        check_transaction_response(
            bundle, {"resourceType": "Bundle", "type": "transaction-response", "entry": [ok, failed, ok]}
        )
    with pytest.raises(EhrError, match="OperationOutcome"):
        check_transaction_response(bundle, {"resourceType": "OperationOutcome"})


def test_a_next_stage_that_finishes_the_note_at_once_leaves_it_done(
    writeback_env: FhirTestServer, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stage queues the next, whose worker may finish the note before the sender has gone on (a busy
    machine deschedules it). The sender's "processing" must not land after that "done": here every next stage
    runs to the end inside ``_send``, the worst ordering, and the note ends done."""
    from core.deps import get_note_state, reset_dependencies
    from core.settings import get_settings
    from worker.tasks import PROCESS_NOTE, TAG_NOTES, WRITE_NOTE, process_note, tag_jobs, write_note

    def next_stage_runs_at_once(task: str, doc: str, version: str) -> None:
        {PROCESS_NOTE: process_note.run, WRITE_NOTE: write_note.run}.get(task, lambda *job: tag_jobs([job]))(
            doc, version
        )
        assert task in (PROCESS_NOTE, TAG_NOTES, WRITE_NOTE)

    monkeypatch.setattr("worker.tasks._send", next_stage_runs_at_once)
    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", writeback_env.base_url)
    monkeypatch.setenv("FHIR_NER_IDENTIFIER_NAMESPACE", NAMESPACE)
    get_settings.cache_clear()
    reset_dependencies()
    document = note_document(writeback_env, "Neumonía.")
    state = get_note_state()
    state.store_note(document["id"], "1", document)

    assert process_note.run(document["id"], "1") == {"handoff": "waiting for the model"}
    record = state.get_status(document["id"])["1"]
    assert record["status"] == "done" and record["mentions"] == 1
    assert not state.advance_status(document["id"], "1", "processing", stage="writing")
    assert state.get_status(document["id"])["1"] == record


def test_a_retry_of_a_stage_never_reopens_a_note_another_delivery_finished(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deliveries of a write stage: one finishes the note while the other fails on a busy EHR (503) and is
    retried. The retry's "queued" must not replace "done"; without another delivery it is recorded."""
    from celery.exceptions import Retry

    from core.deps import get_note_state
    from worker import tasks
    from worker.ehr import EhrError

    state = get_note_state()

    def finished_elsewhere_then_busy(document_id: str, version_id: str) -> dict[str, Any]:
        state.set_status(document_id, version_id, "done", mentions=1)
        raise EhrError("503 from the EHR", 503)

    def busy(document_id: str, version_id: str) -> dict[str, Any]:
        raise EhrError("503 from the EHR", 503)

    for stage, expected in ((finished_elsewhere_then_busy, "done"), (busy, "queued")):
        monkeypatch.setattr(tasks, "finish_note", stage)
        state.set_status("doc-retry", "1", "processing", stage="writing")
        with pytest.raises(Retry):
            tasks.write_note.run("doc-retry", "1")
        assert state.get_status("doc-retry")["1"]["status"] == expected


def test_the_three_stages_hand_on_by_id_and_record_the_outcome_in_the_note_status(
    writeback_env: FhirTestServer, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.deps import get_note_state, get_redis, reset_dependencies
    from core.settings import get_settings
    from worker.tasks import process_note, retract_note, tag_jobs, write_note

    sent: list[tuple[str, str, str]] = []
    monkeypatch.setattr("worker.tasks._send", lambda task, doc, version: sent.append((task, doc, version)))
    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", writeback_env.base_url)
    monkeypatch.setenv("FHIR_NER_IDENTIFIER_NAMESPACE", NAMESPACE)
    get_settings.cache_clear()
    reset_dependencies()
    document = note_document(writeback_env, "Neumonía.")
    doc_id = document["id"]
    state = get_note_state()
    state.store_note(doc_id, "1", document)

    process_note.run(doc_id, "1")  # I/O: read the note, keep its text, queue it for the model
    assert sent == [("worker.tasks.tag_notes", doc_id, "1")]
    assert state.get_status(doc_id)["1"] | {"updated": 0} == {
        "status": "processing",
        "stage": "waiting for the model",
        "updated": 0,
    }
    work_key = f"{app_env['FHIR_NER_KEY_PREFIX']}:work:{doc_id}:1"
    assert get_redis().hget(work_key, "text") == "Neumonía.".encode()

    assert tag_jobs([(doc_id, "1")]) == {(doc_id, "1")}  # inference: mentions kept, text dropped
    assert sent[-1] == ("worker.tasks.write_note", doc_id, "1")
    assert get_redis().hget(work_key, "text") is None
    assert state.get_status(doc_id)["1"]["stage"] == "writing"

    write_note.run(doc_id, "1")  # I/O: write back
    record = state.get_status(doc_id)["1"]
    assert record["status"] == "done" and record["mentions"] == 1
    assert sorted(r.split("/")[0] for r in record["resources"]) == ["Condition", "Device", "Provenance"]
    conditions = [r for r in record["resources"] if r.startswith("Condition/")]
    assert not get_redis().exists(work_key)

    sends = len(sent)
    for stage in (write_note.run, process_note.run):  # delivered again after the note was finished: nothing to do
        stage(doc_id, "1")
    assert tag_jobs([(doc_id, "1")]) == {(doc_id, "1")}
    assert len(sent) == sends and state.get_status(doc_id)["1"]["status"] == "done"
    state.set_status(doc_id, "1", "processing", stage="writing")
    write_note.run(doc_id, "1")  # its input gone before the note was finished: the job starts over
    assert sent[-1] == ("worker.tasks.process_note", doc_id, "1")
    process_note.run(doc_id, "1")
    tag_jobs([(doc_id, "1")])
    write_note.run(doc_id, "1")
    record = state.get_status(doc_id)["1"]
    assert record["status"] == "done" and record["resources"] == [] and conditions[0] in record["kept"]

    retract_note.run(doc_id, "2")
    record = state.get_status(doc_id)["2"]
    assert record["status"] == "done" and record["retracted"] is True
    assert record["retired"] == conditions


# --------------------------------------------------------------------------------------------------
# fhir-ner extract: the Bundle a note would produce, without an EHR
# --------------------------------------------------------------------------------------------------
def test_extract_prints_the_transaction_bundle_of_a_note(
    tiny_tagger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner
    from tiny_models import SAMPLE_NOTES

    from adapter.cli import main
    from core.settings import get_settings
    from mappings.bundle import validate_r4

    monkeypatch.setenv("FHIR_NER_TERMINOLOGY", "lexical")
    get_settings.cache_clear()
    note = tmp_path / "consulta 7.txt"
    note.write_text(SAMPLE_NOTES[1], encoding="utf-8")  # the English sample: ICD-10-CM matches its text
    args = ["extract", str(note), "--lang", "en", "--subject", "Patient/p42", "--model", str(tiny_tagger_path)]
    result = CliRunner().invoke(main, args)
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.stdout)
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        validate_r4(entry["resource"])
    kinds = sorted(e["resource"]["resourceType"] for e in bundle["entry"])
    assert kinds == ["Condition", "Device", "Observation", "Observation", "Procedure", "Provenance"]
    condition = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition")
    assert condition["subject"] == {"reference": "Patient/p42"}
    assert condition["code"]["text"] == "pneumonia"
    assert condition["code"]["coding"][0]["code"] == "J18.9"
    assert condition["extension"][0]["extension"][0]["valueReference"]["reference"] == (
        "DocumentReference/consulta-7/_history/1"
    )
    bad = CliRunner().invoke(main, ["extract", str(note), "--subject", "Encounter/1", "--model", str(tiny_tagger_path)])
    assert bad.exit_code == 1 and "expected Patient/ID" in bad.output


# --------------------------------------------------------------------------------------------------
# EHRs that cap transactions: the write-back goes in consecutive parts
# --------------------------------------------------------------------------------------------------
def test_a_large_write_back_goes_in_parts_to_an_ehr_that_caps_transactions(
    writeback_env: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings
    from worker.tasks import process_document

    text = " ".join(["Neumonía con fiebre y tos; radiografía de tórax."] * 3)  # 12 mentions, 14 entries
    document = note_document(writeback_env, text)
    monkeypatch.delenv("FHIR_NER_EHR_MAX_TRANSACTION_ENTRIES", raising=False)
    get_settings.cache_clear()
    with pytest.raises(EhrError, match="HTTP 400"):  # Medplum: "requires strict isolation but has too many entries"
        process_document(document, "1")
    assert derived(writeback_env, document["id"]) == {}  # the refused transaction wrote nothing

    monkeypatch.setenv("FHIR_NER_EHR_MAX_TRANSACTION_ENTRIES", "8")
    get_settings.cache_clear()
    writeback_env.clear_requests_log()
    outcome = process_document(document, "1")
    assert sum(1 for r in writeback_env.requests_log() if r["method"] == "POST") == 2
    assert len(outcome["resources"]) == 14  # the Device, 12 resources, the Provenance
    held = derived(writeback_env, document["id"])
    provenance = search(writeback_env, f"Provenance?entity=DocumentReference/{document['id']}/_history/1")
    assert len(provenance) == 1
    targets = sorted(t["reference"] for t in provenance[0]["target"])
    assert targets == sorted(held) and len(targets) == 12  # the second part points at the first part's ids
    assert provenance[0]["agent"][0]["who"]["reference"].startswith("Device/")


def test_write_in_parts_resolves_references_to_earlier_parts() -> None:
    from worker.ehr import write_in_parts

    entries = [
        {"fullUrl": f"urn:uuid:{n}", "resource": {"resourceType": "Condition"}, "request": {"method": "POST"}}
        for n in range(5)
    ]
    entries.append(
        {
            "fullUrl": "urn:uuid:p",
            "resource": {"resourceType": "Provenance", "target": [{"reference": f"urn:uuid:{n}"} for n in range(5)]},
            "request": {"method": "POST"},
        }
    )
    posted: list[dict[str, Any]] = []

    def post(part: dict[str, Any]) -> dict[str, Any]:
        posted.append(part)
        offset = sum(len(p["entry"]) for p in posted[:-1])
        return {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [
                {"response": {"status": "201 Created", "location": f"Condition/c{offset + i}/_history/1"}}
                for i in range(len(part["entry"]))
            ],
        }

    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = write_in_parts(post, bundle, 4)
    assert [len(p["entry"]) for p in posted] == [4, 2]
    assert [t["reference"] for t in posted[1]["entry"][1]["resource"]["target"]] == [
        "Condition/c0",
        "Condition/c1",
        "Condition/c2",
        "Condition/c3",
        "urn:uuid:4",  # in the same part: the EHR resolves it
    ]
    assert len(response["entry"]) == 6 and response["type"] == "transaction-response"
    assert entries[5]["resource"]["target"][0] == {"reference": "urn:uuid:0"}  # the plan itself is unchanged
    assert write_in_parts(post, bundle, None) is not None and len(posted[-1]["entry"]) == 6


def test_a_note_that_breaks_the_model_is_dead_lettered_alone_and_its_batch_goes_on(
    writeback_env: FhirTestServer, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.deps import get_note_state, reset_dependencies
    from worker.tasks import dead_letter_store, tag_jobs, work_store
    from worker.work import TaggingInput

    def tag_unless_poisoned(
        pipeline: Any, texts: list[str], languages: list[str | None]
    ) -> tuple[list[list[Mention]], ModelInfo]:
        if any("\\x00" in text for text in texts):
            raise ValueError("the model cannot read this note")
        return stub_tag_texts(pipeline, texts, languages)

    sent: list[tuple[str, str, str]] = []
    monkeypatch.setattr("worker.tasks.tag_texts", tag_unless_poisoned)
    monkeypatch.setattr("worker.tasks.get_pipeline", lambda: None)
    monkeypatch.setattr("worker.tasks._send", lambda task, doc, version: sent.append((task, doc, version)))
    reset_dependencies()
    document = {"resourceType": "DocumentReference", "id": "x"}
    for doc_id, text in (("good-1", "Neumonía."), ("bad", "Neumonía\\x00"), ("good-2", "Fiebre y tos.")):
        work_store().put_input(doc_id, "1", TaggingInput({**document, "id": doc_id}, 0, text, "es"))
    jobs = [("good-1", "1"), ("bad", "1"), ("good-2", "1")]
    assert tag_jobs(jobs) == set(jobs)  # every message is dealt with: none loops back to the queue
    assert sorted(sent) == [("worker.tasks.write_note", "good-1", "1"), ("worker.tasks.write_note", "good-2", "1")]
    assert work_store().get_output("good-2", "1").mentions[0].text == "Fiebre"  # type: ignore[union-attr]
    letter = dead_letter_store().get("tag_notes:bad:1")
    assert letter is not None and letter.error == "ValueError: the model cannot read this note"
    assert get_note_state().get_status("bad")["1"]["status"] == "dead-lettered"
