"""``fhir-ner backfill``: finding existing notes in the test EHR ($export and search) over a generated population of
10,000 notes, counting them (dry run), refusing URLs outside the EHR, 429s, the pacing. The runs through real
workers are in ``test_backfill_pipeline.py`` (marker ``backfill``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from ehr.harness import FhirTestServer

# Notes in several languages; the first two are the tiny tagger's own sentences, so it finds mentions in them.
TEXTS = [
    {"text": "Paciente con fiebre y tos. Diagnóstico de neumonía. Se realizó radiografía de tórax.", "language": "es"},
    {
        "text": "Patient with fever and cough. Diagnosis of pneumonia. A chest radiograph was performed.",
        "language": "en",
    },
    {"text": "Paziente con febbre e tosse. Diagnosi di polmonite.", "language": "it"},
    {"text": "Patiënt met koorts en hoest. Diagnose longontsteking.", "language": "nl"},
    {"text": "Pacient cu febră și tuse. Diagnostic de pneumonie.", "language": "ro"},
    {"text": "Patient med feber och hosta. Diagnos lunginflammation.", "language": "sv"},
    {"text": "Pacient s horečkou a kašlem. Diagnóza zápal plic.", "language": "cs"},
]
POPULATION = 10_000


@pytest.fixture(scope="module")
def population(fhir_server: FhirTestServer) -> Iterator[dict[str, Any]]:
    """10,000 notes written before the adapter was switched on (generated once for the module)."""
    fhir_server.reset()
    yield fhir_server.populate(POPULATION, TEXTS, patients=40, seed=11)
    fhir_server.reset()


@pytest.fixture()
def bulk_env(app_env: dict[str, str], fhir_server: FhirTestServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from core.deps import reset_dependencies

    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", fhir_server.base_url)
    reset_dependencies()
    fhir_server.configure_export(supported=True, polls=2, retryAfter=1, perFile=1000, fileBase=None)
    fhir_server.clear_requests_log()
    return {**app_env, "FHIR_NER_EHR_BASE_URL": fhir_server.base_url}


def expected_counts(documents: list[dict[str, Any]]) -> Counter[str]:
    """What a backfill does with each generated note: current and revised ones are processed; superseded ones
    and notes entered in error before anything was derived from them are skipped."""
    kinds = Counter(d["kind"] for d in documents)
    return Counter(queued=kinds["current"] + kinds["revised"], skipped=kinds["superseded"] + kinds["entered-in-error"])


def run(**options: Any) -> dict[str, Any]:
    from worker.backfill import Run, RunOptions, parse_when

    for bound in ("since", "until"):
        if isinstance(options.get(bound), str):
            options[bound] = parse_when(options[bound])
    return Run(RunOptions(**options)).execute()


def test_the_population_has_every_kind_of_note(population: dict[str, Any]) -> None:
    kinds = Counter(d["kind"] for d in population["documents"])
    assert len(population["documents"]) == POPULATION
    assert set(kinds) == {"current", "revised", "superseded", "entered-in-error"}
    assert {d["language"] for d in population["documents"]} == {t["language"] for t in TEXTS}
    assert all(d["version"] == "2" for d in population["documents"] if d["kind"] == "revised")


@pytest.mark.parametrize("source", ["export", "search"])
def test_dry_run_counts_every_note_and_queues_nothing(
    population: dict[str, Any], bulk_env: dict[str, str], source: str
) -> None:
    from core.celery_app import QUEUES, broker_queue_key
    from core.deps import get_redis

    record = run(source=source, dry_run=True, rate=1000.0, page_size=500)
    expected = expected_counts(population["documents"])
    assert record["state"] == "dry-run" and record["source"] == source
    assert record["scanned"] == POPULATION
    assert record["total"] == POPULATION
    assert (record["queued"], record["skipped"], record["duplicates"]) == (expected["queued"], expected["skipped"], 0)
    client = get_redis()
    assert not any(client.keys(broker_queue_key(kind) + "*") for kind in QUEUES), "a dry run queued something"


def test_export_is_polled_as_the_ehr_asks_and_streamed(
    population: dict[str, Any], bulk_env: dict[str, str], fhir_server: FhirTestServer
) -> None:
    fhir_server.configure_export(polls=2, retryAfter=1, perFile=700)
    record = run(source="export", dry_run=True, since="2025-01-01", rate=1000.0)
    in_2025 = [d for d in population["documents"] if d["date"] >= "2025-01-01"]
    assert record["scanned"] == len(in_2025)
    log = fhir_server.requests_log()
    polls = [r for r in log if "$export-poll-status" in r["path"] and r["method"] == "GET"]
    assert [r["status"] for r in polls] == [202, 202, 200]
    # Retry-After: 1 was honoured between the polls.
    assert all(b["time"] - a["time"] >= 950 for a, b in zip(polls, polls[1:], strict=False))
    kick_off = next(r for r in log if r["path"].endswith("/$export"))
    assert "_type=DocumentReference" in kick_off["url"] and "_since=2025-01-01" in kick_off["url"]
    files = [r for r in log if "$export-file" in r["path"]]
    assert len(files) == len(fhir_server.export_jobs()[-1:]) * (POPULATION + 699) // 700


def test_group_export_reads_the_group_members_notes(population: dict[str, Any], bulk_env: dict[str, str]) -> None:
    from worker.backfill import parse_when

    record = run(source="export", dry_run=True, group=population["group"], rate=1000.0)
    members = set(population["patients"][: (len(population["patients"]) + 1) // 2])
    assert record["scanned"] == sum(1 for d in population["documents"] if d["patient"] in members)
    assert parse_when("2019") is not None


def test_without_export_it_pages_through_search(
    population: dict[str, Any], bulk_env: dict[str, str], fhir_server: FhirTestServer
) -> None:
    fhir_server.configure_export(supported=False)
    patients = tuple(population["patients"][:3])
    record = run(dry_run=True, since="2020-01-01", until="2021-01-01", rate=1000.0)
    window = [d for d in population["documents"] if "2020-01-01" <= d["date"] < "2021-01-01"]
    assert record["source"] == "search" and record["scanned"] == len(window)
    assert any(r["status"] == 501 and r["path"].endswith("/$export") for r in fhir_server.requests_log())
    by_patient = run(dry_run=True, patients=patients, rate=1000.0)
    assert by_patient["source"] == "search"
    assert by_patient["scanned"] == sum(1 for d in population["documents"] if d["patient"] in patients)
    searches = [r["url"] for r in fhir_server.requests_log() if r["path"].endswith("/DocumentReference")]
    assert all("date=ge" in url and "_sort=date" in url for url in searches), [
        u for u in searches if "_sort=date" not in u or "date=ge" not in u
    ][:3]


def test_export_files_outside_the_ehr_are_refused(
    population: dict[str, Any], bulk_env: dict[str, str], fhir_server: FhirTestServer
) -> None:
    from worker.backfill import BackfillError

    fhir_server.configure_export(polls=0, fileBase="http://files.example.org/fhir/R4")
    with pytest.raises(BackfillError, match="outside the configured EHR base URL"):
        run(source="export", dry_run=True, rate=1000.0)
    assert not [r for r in fhir_server.requests_log() if "$export-file" in r["path"]]


def test_429_slows_the_run_and_waits_as_asked(
    population: dict[str, Any], bulk_env: dict[str, str], fhir_server: FhirTestServer
) -> None:
    fhir_server.configure_export(supported=False)
    fhir_server.fail_next(2, 429, retry_after=1)
    record = run(dry_run=True, since="2024-01-01", until="2024-03-01", rate=1000.0)
    log = fhir_server.requests_log()
    assert [r["status"] for r in log[:2]] == [429, 429]
    assert log[2]["time"] - log[1]["time"] >= 950
    assert record["effective_rate"] <= 1000.0 / 4
    assert record["scanned"] == sum(1 for d in population["documents"] if "2024-01-01" <= d["date"] < "2024-03-01")


def test_pacing_spaces_queued_notes_and_backs_off() -> None:
    from worker.backfill import RateLimiter

    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    moments = []
    for _ in range(9):
        limiter.wait()
        moments.append(now[0])
        limiter.charge()
    assert moments == pytest.approx([i * 0.25 for i in range(9)])
    assert limiter.throttled(2.0) == 2.0 and limiter.rate == 2.0
    limiter.wait()
    assert now[0] == pytest.approx(moments[-1] + 2.0)
    for _ in range(10):
        limiter.throttled(None)
    assert limiter.rate == 4.0 / 16


def test_rerun_of_a_finished_dry_run_counts_again(population: dict[str, Any], bulk_env: dict[str, str]) -> None:
    first = run(dry_run=True, since="2023-01-01", until="2023-02-01", rate=1000.0)
    second = run(dry_run=True, since="2023-01-01", until="2023-02-01", rate=1000.0)
    assert first["name"] == second["name"] and first["scanned"] == second["scanned"] > 0
    assert json.loads(json.dumps(second["params"]))["since"] == "2023-01-01T00:00:00Z"


def test_get_backfills_and_metrics_show_the_runs(population: dict[str, Any], bulk_env: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from adapter.app import create_app
    from core.backfill import BulkState
    from core.deps import get_redis
    from core.settings import get_settings

    record = run(dry_run=True, since="2022-01-01", until="2022-02-01", rate=1000.0, source="search")
    state = BulkState(get_redis(), get_settings().key_prefix)
    # A run whose driver was killed (state still "running", its lock gone) shows as interrupted.
    state.open_run("backfill-killed", "backfill", {"since": None})
    state.update("backfill-killed", state="running", total=100, scanned=40)
    with TestClient(create_app()) as client:
        assert client.get("/backfills").status_code == 401
        answer = client.get("/backfills", headers={"Authorization": "Bearer test-token"})
        metrics = client.get("/metrics").text
    assert answer.status_code == 200
    runs = {r["name"]: r for r in answer.json()["backfills"]}
    shown = runs[record["name"]]
    assert (shown["state"], shown["source"], shown["scanned"], shown["queued"]) == (
        "dry-run",
        "search",
        record["scanned"],
        record["queued"],
    )
    assert "position" not in shown
    assert runs["backfill-killed"]["state"] == "interrupted" and not runs["backfill-killed"]["driver_alive"]
    labels = f'kind="backfill",outcome="queued",run="{record["name"]}"'
    assert f"fhir_ner_backfill_notes{{{labels}}} {float(record['queued'])}" in metrics
    assert 'fhir_ner_backfill_total{kind="backfill",run="backfill-killed"} 100.0' in metrics
