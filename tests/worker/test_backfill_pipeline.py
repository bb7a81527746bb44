"""Backfill and reprocess through real parts: the ``fhir-ner`` command as a process (killed with ``kill -9`` mid-run),
real Celery workers with the tiny tagger, Redis, and the test EHR holding 10,000 generated notes.

The population is 10,000 notes; each test processes a window of it (a few dozen to a few hundred notes) through
the tagger, so the module stays within a few minutes on CI's two cores."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, WorkerProcess
from ehr.harness import FhirTestServer
from faults import DERIVED_TYPES, all_of, duplicate_identifiers, wait_until
from test_backfill import POPULATION, TEXTS

pytestmark = [pytest.mark.backfill, pytest.mark.timeout(600)]
NAMESPACE = "urn:fhir-ner-adapter:test"


@pytest.fixture(scope="module")
def population(fhir_server: FhirTestServer) -> Iterator[dict[str, Any]]:
    fhir_server.reset()
    yield fhir_server.populate(POPULATION, TEXTS, patients=40, seed=23)
    fhir_server.reset()


@pytest.fixture()
def env(
    app_env: dict[str, str],
    fhir_server: FhirTestServer,
    population: dict[str, Any],
    tiny_tagger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    from core.deps import reset_dependencies

    values = {
        **app_env,
        "FHIR_NER_EHR_BASE_URL": fhir_server.base_url,
        "FHIR_NER_TERMINOLOGY": "off",
        "FHIR_NER_MODEL_PATH": str(tiny_tagger_path),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    reset_dependencies()
    fhir_server.configure_export(supported=True, polls=1, retryAfter=1, perFile=1000, fileBase=None)
    return values


@pytest.fixture()
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def start_worker(
    workers: list[WorkerProcess], env: dict[str, str], log: Path, model: Path | None = None
) -> WorkerProcess:
    worker = WorkerProcess({**env, **({"FHIR_NER_MODEL_PATH": str(model)} if model else {})}, log)
    workers.append(worker)
    return worker.start()


def command(env: dict[str, str], verb: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "adapter.cli", verb, *args, "--quiet"],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def window(population: dict[str, Any], since: str, until: str) -> list[dict[str, Any]]:
    return [d for d in population["documents"] if since <= d["date"] < until]


def processable(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] in ("current", "revised")]


def run_record(name_prefix: str = "backfill-") -> dict[str, Any]:
    from core.backfill import BulkState
    from core.deps import get_redis
    from core.settings import get_settings

    runs = [r for r in BulkState(get_redis(), get_settings().key_prefix).runs() if r["name"].startswith(name_prefix)]
    assert len(runs) <= 1, [r["name"] for r in runs]
    return runs[0] if runs else {}


def statuses(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from core.deps import get_note_state

    state = get_note_state()
    return {d["id"]: state.get_status(d["id"]).get(d["version"], {}) for d in documents}


def all_done(documents: list[dict[str, Any]]) -> bool:
    return all(record.get("status") == "done" for record in statuses(documents).values())


def notes_done_in_logs(*logs: Path) -> Counter[str]:
    """How many times the workers finished each note version ("note done" log lines)."""
    done: Counter[str] = Counter()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"note done"' in line:
                done[json.loads(line)["document_version"]] += 1
    return done


def live_derived(ehr: FhirTestServer, document_ids: set[str]) -> dict[str, list[Any]]:
    """For each note: our resources derived from it (parsed: mention key, retired or live)."""
    from mappings.revisions import parse_derived

    held: dict[str, list[Any]] = {}
    for resource_type in DERIVED_TYPES:
        for resource in all_of(ehr, resource_type):
            for document_id in document_ids:
                derived = parse_derived(resource, NAMESPACE, document_id)
                if derived is not None:
                    held.setdefault(document_id, []).append(derived)
    return held


def provenances_by_note(ehr: FhirTestServer) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for provenance in all_of(ehr, "Provenance"):
        entity = provenance["entity"][0]["what"]["reference"]
        found.setdefault(entity.split("/")[1], []).append(provenance)
    return found


# -------------------------------------------------------------------------------------------------- backfill
def test_backfill_killed_mid_run_resumes_and_processes_every_note_once(
    env: dict[str, str],
    fhir_server: FhirTestServer,
    population: dict[str, Any],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    since, until = "2024-01-01", "2024-02-01"
    notes = window(population, since, until)
    wanted = processable(notes)
    assert len(wanted) > 90
    worker = start_worker(workers, env, tmp_path / "worker.log")
    args = ("--since", since, "--until", until, "--rate", "40/s", "--source", "export")
    first = command(env, "backfill", *args, log=tmp_path / "backfill-1.log")
    wait_until(lambda: run_record().get("queued", 0) >= 60, 120, 0.05, "the backfill queued nothing")
    first.send_signal(signal.SIGKILL)  # kill -9 mid-run
    first.wait()
    interrupted = run_record()
    assert interrupted["state"] == "running" and 60 <= interrupted["queued"] < len(wanted)

    second = command(env, "backfill", *args, log=tmp_path / "backfill-2.log")
    assert second.wait(timeout=180) == 0, (tmp_path / "backfill-2.log").read_text()[-2000:]
    wait_until(lambda: all_done(wanted), 300, 0.5, "not every note of the window was processed")

    record = run_record()
    assert record["state"] == "done" and record["source"] == "export"
    assert record["scanned"] == len(notes)
    assert record["queued"] == len(wanted), "a note was queued twice, or lost"
    assert record["skipped"] == len(notes) - len(wanted) and record["duplicates"] == 0
    assert len(fhir_server.export_jobs()) == 1, "the second run did not resume the first run's export"
    done = notes_done_in_logs(worker.log_path)
    assert {f"{d['id']}/{d['version']}": done[f"{d['id']}/{d['version']}"] for d in wanted} == {
        f"{d['id']}/{d['version']}": 1 for d in wanted
    }, "a note was processed more than once, or not at all"
    provenances = provenances_by_note(fhir_server)
    assert all(len(provenances.get(d["id"], [])) <= 1 for d in wanted)
    assert sum(1 for d in wanted if provenances.get(d["id"])) >= len(wanted) // 7  # es/en notes give mentions
    assert duplicate_identifiers(fhir_server, NAMESPACE) == []
    skipped = statuses([d for d in notes if d not in wanted])
    assert {r["status"] for r in skipped.values()} == {"skipped"}

    # The same command again finds everything already processed: nothing is queued.
    third = command(env, "backfill", *args, "--name", "again", log=tmp_path / "backfill-3.log")
    assert third.wait(timeout=120) == 0
    again = run_record("backfill-again")
    assert (again["queued"], again["duplicates"]) == (0, len(notes))


def test_backfill_never_exceeds_its_rate_at_the_ehr(
    env: dict[str, str],
    fhir_server: FhirTestServer,
    population: dict[str, Any],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    from worker.backfill import Run, RunOptions, parse_when

    since, until = "2023-06-01", "2023-06-11"
    wanted = processable(window(population, since, until))
    assert len(wanted) >= 20
    start_worker(workers, env, tmp_path / "worker.log")
    fhir_server.clear_requests_log()
    rate = 3.0
    record = Run(RunOptions(since=parse_when(since), until=parse_when(until), rate=rate, source="search")).execute()
    assert record["queued"] == len(wanted)
    wait_until(lambda: all_done(wanted), 300, 0.5, "not every note was processed")
    log = fhir_server.requests_log()
    # Each note the backfill queued costs the EHR one search for what earlier versions derived (Condition first);
    # in no second are there more of them than the rate allows.
    per_note = sorted(r["time"] for r in log if r["path"].endswith("/Condition") and "_tag=" in r["url"])
    assert len(per_note) == len(wanted)
    busiest = max(sum(1 for t in per_note if start <= t < start + 1000) for start in per_note)
    assert busiest <= rate, f"{busiest} notes' requests within one second at --rate {rate}/s"
    span = (per_note[-1] - per_note[0]) / 1000
    assert span >= (len(wanted) - 1) / rate * 0.9


def test_live_notifications_go_ahead_of_the_backfill(
    env: dict[str, str],
    fhir_server: FhirTestServer,
    population: dict[str, Any],
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient
    from faults import note_document, notify
    from tiny_models import SAMPLE_NOTES

    from adapter.app import create_app
    from worker.backfill import Run, RunOptions, parse_when

    since, until = "2022-03-01", "2022-04-01"
    bulk = processable(window(population, since, until))
    # The backfill queues its notes while no worker runs: they wait, at the bulk priority.
    record = Run(RunOptions(since=parse_when(since), until=parse_when(until), rate=500.0, source="search")).execute()
    assert record["queued"] == len(bulk) > 80
    patient = population["patients"][0]
    live = [note_document(fhir_server, patient, SAMPLE_NOTES[i % 2]) for i in range(5)]
    with TestClient(create_app()) as client:
        for number, document in enumerate(live, start=1):
            assert notify(client, document, number) == 200
    live_docs = [{"id": d["id"], "version": d["meta"]["versionId"]} for d in live]
    start_worker(workers, env, tmp_path / "worker.log")
    wait_until(lambda: all_done(live_docs), 180, 0.2, "the live notes were not processed")
    finished_live = max(r["updated"] for r in statuses(live_docs).values())
    bulk_done = sorted(r["updated"] for r in statuses(bulk).values() if r.get("status") == "done")
    # Only what the worker already held when the live notes came can finish before them.
    assert len([t for t in bulk_done if t < finished_live]) <= 3, (len(bulk_done), finished_live)
    wait_until(lambda: all_done(bulk), 300, 0.5, "the backfill did not finish after the live notes")


# -------------------------------------------------------------------------------------------------- reprocess
def second_model(tiny_encoder: Path, folder: Path) -> Path:
    """Another checkpoint: trained less, it reads "radiografía" where the first read "radiografía de tórax"."""
    from tiny_models import train_tiny_tagger

    model = train_tiny_tagger(tiny_encoder, folder, steps=15)
    config_file = model / "tagger_config.json"
    config = json.loads(config_file.read_text())
    config["model_revision"] = "tiny-test-b"
    config_file.write_text(json.dumps(config))
    return model


def expected_keys(fhir_server: FhirTestServer, notes: list[dict[str, Any]], model: Path) -> dict[str, set[str]]:
    """The mention keys each note's current version gives with ``model`` (computed here, with the same code)."""
    import httpx

    from mappings.bundle import map_mentions
    from mappings.context import context_from_document_reference
    from mappings.profile import load_profile
    from worker.nlp.tagger import ClinicalTagger, TaggerPipeline
    from worker.tasks import tag_note

    pipeline = TaggerPipeline(ClinicalTagger.from_pretrained(model))
    profile = load_profile()
    keys: dict[str, set[str]] = {}
    for note in notes:
        document = httpx.get(f"{fhir_server.base_url}/DocumentReference/{note['id']}", timeout=10).json()
        attachment = document["content"][0]["attachment"]
        text = base64.b64decode(attachment["data"]).decode()
        mentions, info = tag_note(text, pipeline, language=attachment["language"])
        context = context_from_document_reference(document)
        keys[note["id"]] = {m.mention_key for m in map_mentions(context, mentions, profile, info, NAMESPACE)}
    return keys


def test_reprocess_after_a_model_switch_leaves_one_current_set_per_note(
    env: dict[str, str],
    fhir_server: FhirTestServer,
    population: dict[str, Any],
    workers: list[WorkerProcess],
    tiny_encoder: Path,
    tiny_tagger_path: Path,
    tmp_path: Path,
) -> None:
    from worker.backfill import Run, RunOptions, parse_when, profile_fingerprint

    since, until = "2021-05-01", "2021-05-15"
    notes = processable(window(population, since, until))
    with_mentions = [n for n in notes if n["language"] in ("es", "en")]
    assert len(with_mentions) >= 8
    first = start_worker(workers, env, tmp_path / "worker-a.log")
    Run(RunOptions(since=parse_when(since), until=parse_when(until), rate=500.0, source="search")).execute()
    wait_until(lambda: all_done(notes), 300, 0.5, "the backfill did not finish")
    before = live_derived(fhir_server, {n["id"] for n in notes})
    first.stop()

    model_b = second_model(tiny_encoder, tmp_path / "model-b")
    shutil.rmtree(tmp_path / "model-b-unused", ignore_errors=True)
    start_worker(workers, env, tmp_path / "worker-b.log", model=model_b)
    options = RunOptions(
        kind="reprocess",
        since=parse_when(since),
        until=parse_when(until),
        rate=500.0,
        source="search",
        fingerprint=f"tiny-test-b|{profile_fingerprint()}",
    )
    record = Run(options).execute()
    assert record["queued"] == len(notes) and record["up_to_date"] == 0

    def reread() -> bool:
        return all(r.get("status") == "done" and r.get("model") == "tiny-test-b" for r in statuses(notes).values())

    wait_until(reread, 300, 0.5, "not every note was read again by the new model")
    expected = expected_keys(fhir_server, notes, model_b)
    after = live_derived(fhir_server, {n["id"] for n in notes})
    provenances = provenances_by_note(fhir_server)
    changed = 0
    for note in notes:
        held = after.get(note["id"], [])
        live = [d for d in held if not d.retired]
        assert sorted(d.mention_key for d in live) == sorted(expected[note["id"]]), note
        # Kept resources are the very ones the first model wrote (same ids and identifiers).
        earlier = {d.id for d in before.get(note["id"], []) if not d.retired}
        assert {d.id for d in live if d.mention_key in {e.mention_key for e in before.get(note["id"], [])}} <= earlier
        for stale in (d for d in held if d.retired):
            status = stale.resource.get("verificationStatus", {}).get("coding", [{}])[0].get("code")
            assert "entered-in-error" in (stale.resource.get("status"), status)
        changed += sum(1 for d in held if d.retired)
        if expected[note["id"]]:
            names = [p["agent"][0]["who"].get("display", "") for p in provenances.get(note["id"], [])]
            assert any("tiny-test-b" in name for name in names), names
    assert changed >= sum(1 for n in with_mentions if n["language"] == "es")  # "radiografía de tórax" retired
    assert duplicate_identifiers(fhir_server, NAMESPACE) == []

    # Run again: every note is up to date, nothing is queued.
    again = Run(RunOptions(**{**options.__dict__, "name": "again"})).execute()
    assert (again["queued"], again["up_to_date"]) == (0, len(notes))
