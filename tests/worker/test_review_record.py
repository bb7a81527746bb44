"""The worker's review record (issue 16): after a write-back, Redis holds the note text, every mention at its exact
characters, and what each mention became (a resource, or why none)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from tiny_models import SAMPLE_NOTES

PROFILE = """
name: reviewed
labels:
  DISEASE: {mapper: condition}
  SYMPTOM: {mapper: observation, drop_assertions: [negated]}
"""


def _document(document_id: str, text: str, version: str = "1") -> dict[str, object]:
    return {
        "resourceType": "DocumentReference",
        "id": document_id,
        "meta": {"versionId": version},
        "status": "current",
        "docStatus": "final",
        "subject": {"reference": "Patient/p-7"},
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "language": "es",
                    "data": base64.b64encode(text.encode()).decode(),
                }
            }
        ],
    }


@pytest.fixture()
def worker_env(
    app_env: dict[str, str], tiny_tagger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    from core.deps import reset_dependencies
    from worker.runtime import reset_pipeline

    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE)
    monkeypatch.setenv("FHIR_NER_MODEL_PATH", str(tiny_tagger_path))
    monkeypatch.setenv("FHIR_NER_WRITEBACK_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("FHIR_NER_MAPPING_PROFILE", str(profile))
    monkeypatch.setenv("FHIR_NER_TERMINOLOGY", "off")
    reset_dependencies()
    reset_pipeline()
    return tmp_path / "out"


def test_a_processed_note_leaves_a_review_record_with_each_mention_and_what_it_became(worker_env: Path) -> None:
    from core.deps import get_redis
    from core.review import ReviewStore
    from core.settings import get_settings
    from worker.tasks import process_document

    text = SAMPLE_NOTES[2]  # "No presenta disnea. Antecedentes de diabetes mellitus. Se programa colecistectomía."
    result = process_document(_document("doc-r", text), "1")
    store = ReviewStore(get_redis(), get_settings().key_prefix)
    record = store.records("doc-r")["1"]
    assert record["text"] == text
    assert record["subject"] == "Patient/p-7"
    assert record["model"]["revision"] == "tiny-test"
    by_text = {m["text"]: m for m in record["mentions"]}
    assert set(by_text) == {"disnea", "diabetes mellitus", "colecistectomía"}
    for mention in record["mentions"]:
        assert text[mention["start"] : mention["end"]] == mention["text"]
    disease = by_text["diabetes mellitus"]
    assert disease["resource"] in result["resources"]
    assert disease["resource"].startswith("Condition/")
    assert disease["outcome"] == "written" and disease["assertion"] == "historical"
    assert by_text["disnea"]["resource"] is None
    assert by_text["disnea"]["reason"] == "dropped by profile: negated mentions of SYMPTOM are not written"
    assert by_text["colecistectomía"]["reason"] == "dropped by profile: label PROCEDURE is not in profile reviewed"
    assert record["provenance"] and record["provenance"].startswith("Provenance/")
    assert store.patient_notes("p-7") == ["doc-r"]
    assert store.get_text("doc-r", "1") is None  # the read stage's copy moved into the record
    ttl = get_redis().ttl(store.key("note", "doc-r"))
    assert 0 < ttl <= 14 * 24 * 3600


def test_the_review_record_never_reaches_the_logs(worker_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    from worker.tasks import process_document

    caplog.set_level("DEBUG")
    process_document(_document("doc-l", SAMPLE_NOTES[0]), "1")
    logged = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert "neumonía" not in logged and "fiebre" not in logged
