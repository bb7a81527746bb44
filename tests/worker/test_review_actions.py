"""Reviewer actions written to the test EHR by the worker (issue 16): confirm, reject, correct, add, each with a
Provenance naming the reviewer and the adapter; idempotent reruns; a rejected finding stays rejected through a
new revision of the note and a reprocess; the reviewed notes exported as BRAT that training reads back.

The tagger is the write-back tests' stub (fixed phrases), so these exercise the actions, not the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ehr.harness import FhirTestServer
from test_end_to_end import search
from test_writeback import (
    DERIVED_TYPES,
    note_document,
    retired,
    revise,
    stub_tag_note,
    stubbed_worker_env,
)

NAMESPACE = "urn:fhir-ner-adapter:review-test"
TEXT = "Paciente con fiebre y tos. Diagnóstico de neumonía. Refiere cefalea. Se realizó radiografía de tórax."
REVIEWER = "Dr Ana Ruiz"


@pytest.fixture()
def review_ehr(
    ehr: FhirTestServer, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FhirTestServer]:
    yield from stubbed_worker_env(ehr, monkeypatch, NAMESPACE)


def _store() -> Any:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings

    return ReviewStore(get_redis(), get_settings().key_prefix)


def _act(document_id: str, version: str, kind: str, said: str | None = None, **payload: Any) -> dict[str, Any]:
    """Record an action as the API does and run the worker's task body; returns the action as recorded."""
    from core.review import new_action
    from worker.review_actions import run_action

    store = _store()
    record = store.records(document_id)[version]
    mention = next((m for m in record["mentions"] if m["text"] == said), None) if said else None
    assert said is None or mention is not None
    action = new_action(document_id, version, kind, mention, payload, REVIEWER)
    store.put_action(action)
    done = run_action(action["id"])
    assert done is not None
    return done


def derived(ehr: FhirTestServer, document_id: str) -> dict[str, dict[str, Any]]:
    """Every resource derived from the note, by ``Type/id`` (this module's namespace)."""
    return {
        f"{kind}/{resource['id']}": resource
        for kind in DERIVED_TYPES
        for resource in search(ehr, f"{kind}?_tag={NAMESPACE}/document|{document_id}")
    }


def read(ehr: FhirTestServer, reference: str) -> dict[str, Any]:
    response = httpx.get(f"{ehr.base_url}/{reference}", timeout=10)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def _provenances(ehr: FhirTestServer, reference: str) -> list[dict[str, Any]]:
    return [p for p in search(ehr, f"Provenance?target={reference}") if len(p["agent"]) == 2]


def test_confirm_reject_correct_and_add_write_the_ehr_with_the_reviewers_provenance(
    review_ehr: FhirTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.feedback_cli import export_feedback, feedback_name
    from worker.nlp.corpus import read_brat_folder
    from worker.review_actions import run_action
    from worker.tasks import process_document

    ehr = review_ehr
    document = note_document(ehr, TEXT)
    doc_id = document["id"]
    process_document(document, "1")
    record = _store().records(doc_id)["1"]
    by_text = {m["text"]: m for m in record["mentions"]}
    condition, cough, fever = (by_text[t]["resource"] for t in ("neumonía", "tos", "fiebre"))

    # Confirm: verificationStatus confirmed, tagged, and a Provenance naming the reviewer and the adapter Device.
    confirmed = _act(doc_id, "1", "confirm", "neumonía")
    assert confirmed["state"] == "done", confirmed
    resource = read(ehr, condition)
    assert resource["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert resource["clinicalStatus"]["coding"][0]["code"] == "active"
    (provenance,) = _provenances(ehr, condition)
    assert provenance["activity"]["coding"][0]["code"] == "UPDATE"
    reviewer, adapter = provenance["agent"]
    assert reviewer["who"]["display"] == REVIEWER
    assert reviewer["type"]["coding"][0]["code"] == "verifier"
    assert adapter["who"]["display"] == "fhir-ner-adapter"
    assert read(ehr, adapter["who"]["reference"])["resourceType"] == "Device"
    assert provenance["entity"][0]["what"]["reference"] == f"DocumentReference/{doc_id}/_history/1"
    assert confirmed["provenance"] == f"Provenance/{provenance['id']}"
    # A rerun writes nothing new: same resource version, one Provenance.
    version_before = resource["meta"]["versionId"]
    assert run_action(confirmed["id"])["state"] == "done"
    assert read(ehr, condition)["meta"]["versionId"] == version_before
    assert len(_provenances(ehr, condition)) == 1

    # Reject: entered-in-error, and NULLIFY.
    rejected = _act(doc_id, "1", "reject", "tos")
    assert rejected["state"] == "done", rejected
    assert retired(read(ehr, cough))
    (nullify,) = _provenances(ehr, cough)
    assert nullify["activity"]["coding"][0]["code"] == "NULLIFY"
    assert run_action(rejected["id"])["state"] == "done"
    assert len(_provenances(ehr, cough)) == 1
    # Confirming what was rejected fails with a reason, and writes nothing.
    refused = _act(doc_id, "1", "confirm", "tos")
    assert refused["state"] == "failed" and "entered-in-error" in refused["message"]
    assert retired(read(ehr, cough))

    # Correct a code: the resource is mapped again from the corrected mention and PUT in place.
    start = TEXT.index("fiebre")
    corrected = _act(
        doc_id,
        "1",
        "correct",
        "fiebre",
        start=start,
        end=start + len("fiebre"),
        label="SYMPTOM",
        system="http://hl7.org/fhir/sid/icd-10-cm",
        code="R50.9",
    )
    assert corrected["state"] == "done", corrected
    observation = read(ehr, fever)
    assert observation["code"]["coding"] == [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "R50.9"}]
    assert {"system": f"{NAMESPACE}/review", "code": "corrected"} in [
        {k: t[k] for k in ("system", "code")} for t in observation["meta"]["tag"]
    ]
    # A span correction moves the derivation offsets; a label that maps to another type replaces the resource.
    span = TEXT.index("radiografía de tórax")
    relabelled = _act(
        doc_id, "1", "correct", "radiografía de tórax", start=span, end=span + len("radiografía"), label="PROCEDURE"
    )
    assert relabelled["state"] == "done", relabelled
    xray = read(ehr, by_text["radiografía de tórax"]["resource"])
    assert xray["code"]["text"] == "radiografía"
    offsets = {e["url"]: e for e in xray["extension"][0]["extension"]}
    assert offsets["length"]["valueInteger"] == len("radiografía")
    headache = TEXT.index("cefalea")
    to_condition = _act(doc_id, "1", "correct", "fiebre", start=start, end=start + 6, label="DISEASE")
    assert to_condition["state"] == "done", to_condition
    assert retired(read(ehr, fever))
    new_condition = read(ehr, to_condition["created_resource"])
    assert new_condition["resourceType"] == "Condition" and new_condition["code"]["text"] == "fiebre"

    # Add: a mention the model missed becomes a resource through the same mapper, with the reviewer's CREATE.
    added = _act(doc_id, "1", "add", start=headache, end=headache + len("cefalea"), label="SYMPTOM")
    assert added["state"] == "done", added
    new = read(ehr, added["created_resource"])
    assert new["resourceType"] == "Observation" and new["code"]["text"] == "cefalea"
    assert new["status"] == "preliminary" and new["subject"]["reference"] == document["subject"]["reference"]
    (created,) = _provenances(ehr, added["created_resource"])
    assert created["activity"]["coding"][0]["code"] == "CREATE"
    assert created["agent"][0]["type"]["coding"][0]["code"] == "author"
    count = len(derived(ehr, doc_id))
    assert run_action(added["id"])["created_resource"] == added["created_resource"]
    assert len(derived(ehr, doc_id)) == count

    # The note view's record says what the EHR now holds.
    shown = {m["text"]: m for m in _store().records(doc_id)["1"]["mentions"]}
    assert shown["neumonía"]["status"] == "confirmed" and shown["tos"]["status"] == "entered-in-error"
    assert shown["cefalea"]["resource"] == added["created_resource"]

    # A new revision of the note (the same findings, a sentence added) and a rerun of it: the rejected cough is
    # not written again, the confirmed and corrected resources stay as the reviewer left them, the added one stays.
    v2 = revise(ehr, document, TEXT + " Sin cambios.")
    for _ in range(2):
        outcome = process_document(v2, "2")
        live = {ref: r for ref, r in derived(ehr, doc_id).items() if not retired(r)}
        texts = sorted(r["code"]["text"] for r in live.values())
        assert texts == ["cefalea", "fiebre", "neumonía", "radiografía"], outcome
        assert read(ehr, condition)["verificationStatus"]["coding"][0]["code"] == "confirmed"
        assert read(ehr, by_text["radiografía de tórax"]["resource"])["code"]["text"] == "radiografía"
        assert retired(read(ehr, cough)) and retired(read(ehr, fever))
    v2_record = {m["text"]: m for m in _store().records(doc_id)["2"]["mentions"]}
    assert v2_record["tos"]["resource"] is None
    assert v2_record["tos"]["reason"] == "not written: a reviewer rejected this finding"
    # What the reviewer added is listed on the new version too, at its words in the new text.
    kept = v2_record["cefalea"]
    assert kept["resource"] == added["created_resource"] and kept["reviewed"] == "added"
    assert (TEXT + " Sin cambios.")[kept["start"] : kept["end"]] == "cefalea" and kept["label"] == "SYMPTOM"

    # A reprocess of that version by a newer model (what `fhir-ner reprocess` queues: the same write stage, its
    # Provenance attesting the new model): still no cough, the reviewer's resources unchanged.
    from core.deps import get_redis
    from core.settings import get_settings
    from mappings.bundle import ModelInfo

    def newer_model(text: str, pipeline: Any = None, language: str | None = None) -> Any:
        return stub_tag_note(text)[0], ModelInfo("stub-tagger", "rev-2")

    monkeypatch.setattr("worker.tasks.tag_note", newer_model)
    get_redis().set(f"{get_settings().key_prefix}:bulk:note:{doc_id}:2", "reprocess-test")
    before = {ref: r["meta"]["versionId"] for ref, r in derived(ehr, doc_id).items()}
    process_document(v2, "2")
    after = derived(ehr, doc_id)
    assert sorted(r["code"]["text"] for r in after.values() if not retired(r)) == [
        "cefalea",
        "fiebre",
        "neumonía",
        "radiografía",
    ]
    assert {ref: r["meta"]["versionId"] for ref, r in after.items()} == before  # nothing rewritten or re-created
    attested = [
        p for p in search(ehr, f"Provenance?entity=DocumentReference/{doc_id}/_history/2") if len(p["agent"]) == 1
    ]
    assert any("rev-2" in p["agent"][0]["who"]["display"] for p in attested)

    # The reviewed note as a training document, exported as BRAT that training's reader reads back.
    assert export_feedback(tmp_path / "feedback") == 1
    (document_read,) = read_brat_folder(tmp_path / "feedback")
    assert document_read.doc_id == feedback_name(doc_id) and doc_id not in document_read.doc_id
    assert document_read.text == TEXT
    spans = [(s.label, s.text) for s in document_read.spans]
    assert spans == [
        ("DISEASE", "fiebre"),
        ("DISEASE", "neumonía"),
        ("SYMPTOM", "cefalea"),
        ("PROCEDURE", "radiografía"),
    ]
    assert export_feedback(tmp_path / "again", delete=True) == 1
    assert _store().feedback() == {}


def test_a_launched_practitioners_action_names_them_in_the_provenance(review_ehr: FhirTestServer) -> None:
    """A reviewer who came by a SMART EHR launch is the Practitioner the id_token's fhirUser named."""
    from core.review import new_action
    from worker.review_actions import run_action
    from worker.tasks import process_document

    ehr = review_ehr
    practitioner = httpx.post(
        f"{ehr.base_url}/Practitioner",
        json={"resourceType": "Practitioner", "name": [{"text": "Dr Eva Launch"}]},
        headers={"Content-Type": "application/fhir+json"},
        timeout=10,
    ).json()
    document = note_document(ehr, TEXT)
    process_document(document, "1")
    store = _store()
    mention = next(m for m in store.records(document["id"])["1"]["mentions"] if m["text"] == "neumonía")
    reference = f"Practitioner/{practitioner['id']}"
    action = new_action(document["id"], "1", "confirm", mention, {}, "Dr Eva Launch", reference)
    store.put_action(action)
    assert run_action(action["id"])["state"] == "done"
    (provenance,) = _provenances(ehr, mention["resource"])
    assert provenance["agent"][0]["who"] == {"reference": reference, "display": "Dr Eva Launch"}
    assert read(ehr, reference)["resourceType"] == "Practitioner"


def test_an_action_is_marked_done_only_after_the_notes_record_shows_its_result(
    review_ehr: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review page reloaded between the two writes must never show the action done beside the old state.
    from core.review import ReviewStore
    from worker.tasks import process_document

    document = note_document(review_ehr, TEXT)
    doc_id = document["id"]
    process_document(document, "1")
    seen: list[str] = []
    original = ReviewStore.update_action

    def update_action(self: ReviewStore, action_id: str, **changes: Any) -> Any:
        if changes.get("state") == "done":
            mention = next(m for m in self.records(doc_id)["1"]["mentions"] if m["text"] == "neumonía")
            seen.append(str(mention.get("reviewed")))
        return original(self, action_id, **changes)

    monkeypatch.setattr(ReviewStore, "update_action", update_action)
    assert _act(doc_id, "1", "confirm", "neumonía")["state"] == "done"
    assert seen == ["confirmed"]
