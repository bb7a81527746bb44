"""Faults, with real processes: a worker killed mid-inference, an EHR that fails for a while or for long,
Redis killed and restarted under traffic. Each ends with every accepted note processed exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import WorkerProcess
from ehr.harness import FhirTestServer
from fastapi.testclient import TestClient
from faults import (
    DERIVED_TYPES,
    OwnRedis,
    create,
    derived_by_document,
    duplicate_identifiers,
    free_port,
    metric,
    note_document,
    notify,
    statuses,
    wait_until,
)
from tiny_models import SAMPLE_NOTES

pytestmark = [pytest.mark.fault, pytest.mark.timeout(400)]

NAMESPACE = "urn:fhir-ner-adapter:test"
# Messages a vanished worker held come back after this long (production: an hour, above the task time limit).
FAST_REDELIVERY = {
    "FHIR_NER_BROKER_VISIBILITY_TIMEOUT": "25",
    "FHIR_NER_BROKER_RESTORE_INTERVAL": "1",
    "FHIR_NER_TASK_SOFT_TIME_LIMIT": "20",
    "FHIR_NER_TASK_TIME_LIMIT": "24",
    "FHIR_NER_LOST_MESSAGE_SECONDS": "30",
}


@pytest.fixture()
def stack_env(app_env: dict[str, str], ehr: FhirTestServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from core.deps import reset_dependencies

    # fp32 pinned: should a checkpoint's record let `auto` pick int8 on CPUs, its first use would build the int8
    # graph (about a minute) inside the very worker these tests kill; precision is not what they test.
    env = {
        **app_env,
        "FHIR_NER_EHR_BASE_URL": ehr.base_url,
        "FHIR_NER_TERMINOLOGY": "off",
        "FHIR_NER_PRECISION": "fp32",
    }
    monkeypatch.setenv("FHIR_NER_EHR_BASE_URL", ehr.base_url)
    reset_dependencies()
    return env


@pytest.fixture()
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def start_worker(
    workers: list[WorkerProcess], env: dict[str, str], model: Path, log: Path, queues: str = "io,inference"
) -> WorkerProcess:
    worker = WorkerProcess({**env, "FHIR_NER_MODEL_PATH": str(model)}, log, queues=queues)
    workers.append(worker)
    return worker.start()


def one_set_each(ehr: FhirTestServer, expected: dict[str, int]) -> None:
    """The EHR holds, for each note, exactly its mentions' resources and one Provenance; nothing twice."""
    held = derived_by_document(ehr, NAMESPACE)
    for document_id, mentions in expected.items():
        counts = held.get(document_id)
        assert counts is not None, f"nothing in the EHR from {document_id}"
        assert sum(counts[t] for t in DERIVED_TYPES) == mentions, (document_id, counts)
        assert counts["Provenance"] == 1, (document_id, counts)
    assert duplicate_identifiers(ehr, NAMESPACE) == []


def test_a_worker_killed_mid_inference_leaves_one_set_of_resources(
    stack_env: dict[str, str], ehr: FhirTestServer, workers: list[WorkerProcess], tmp_path: Path, e5_encoder_dir: Path
) -> None:
    """kill -9 while the model runs: the message was never acknowledged, so another worker gets it."""
    from adapter.app import create_app
    from worker.runtime import default_model_path

    model = default_model_path()
    assert model is not None
    env = {**stack_env, **FAST_REDELIVERY}
    io_worker = start_worker(workers, env, model, tmp_path / "io.log", "io")
    model_worker = start_worker(workers, env, model, tmp_path / "inference.log", "inference")
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba"}]})
    text = " ".join([SAMPLE_NOTES[0]] * 2 + ["Paciente estable, sin cambios en la exploración."] * 120)
    document = note_document(ehr, patient["id"], text)
    with TestClient(create_app()) as client:
        assert notify(client, document) == 200
        wait_until(
            lambda: statuses(client, document["id"]).get("1", {}).get("stage") == "tagging",
            120,
            0.02,
            "the note never reached the model",
        )
        model_worker.kill()
        assert ehr_writes(ehr) == 0  # killed before anything was written
        time.sleep(1)
        assert statuses(client, document["id"])["1"]["status"] == "processing"
        start_worker(workers, env, model, tmp_path / "inference-2.log", "inference")
        wait_until(
            lambda: statuses(client, document["id"])["1"]["status"] == "done", 180, 0.2, "the note was not redelivered"
        )
        record = statuses(client, document["id"])["1"]
    assert record["mentions"] > 0
    one_set_each(ehr, {document["id"]: present_mentions(record)})
    io_worker.stop()


def ehr_writes(ehr: FhirTestServer) -> int:
    return sum(1 for r in ehr.requests_log() if r["method"] == "POST" and r["path"].endswith("/fhir"))


def present_mentions(record: dict[str, object]) -> int:
    """The derived resources a note's status says it holds: written now, or found already there (a rerun)."""
    references: set[str] = set()
    for field in ("resources", "existing", "kept"):
        value = record.get(field) or []
        assert isinstance(value, list)
        references |= {str(r) for r in value if str(r).split("/")[0] in DERIVED_TYPES}
    return len(references)


def test_a_worker_killed_during_the_restore_sweep_blocks_restores_for_one_visibility_timeout_at_most(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker sweeps abandoned messages back to their queue under one Redis lock. A worker killed while
    holding it leaves the lock to expire; kombu's own expiry (300 s) would hold every restore up that long."""
    from kombu.transport.redis import Mutex, MutexHeld

    from core.celery_app import broker_key_prefix, get_celery_app
    from core.deps import get_redis
    from core.settings import get_settings

    for key, value in FAST_REDELIVERY.items():  # visibility timeout 25 s
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    get_celery_app.cache_clear()
    with get_celery_app().connection_for_read() as connection:
        qos = connection.default_channel.qos
        client = connection.default_channel.client
        sweep = Mutex(client, qos.unacked_mutex_key, qos.unacked_mutex_expire)
        sweep.__enter__()  # the sweeping worker dies here, lock held, never released
        with pytest.raises(MutexHeld), Mutex(client, qos.unacked_mutex_key, qos.unacked_mutex_expire):
            pass  # another worker's sweep is refused while the lock lives
        lock_key = broker_key_prefix() + qos.unacked_mutex_key
        assert 0 < get_redis().ttl(lock_key) <= 25
        get_redis().delete(lock_key)


def test_an_ehr_failing_twice_then_answering_costs_nothing(
    stack_env: dict[str, str], ehr: FhirTestServer, workers: list[WorkerProcess], tmp_path: Path, tiny_tagger_path: Path
) -> None:
    from adapter.app import create_app

    start_worker(workers, stack_env, tiny_tagger_path, tmp_path / "worker.log")
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba"}]})
    document = note_document(ehr, patient["id"], SAMPLE_NOTES[0])
    ehr.clear_requests_log()
    ehr.fail_next(2, 503)
    with TestClient(create_app()) as client:
        assert notify(client, document) == 200
        wait_until(lambda: statuses(client, document["id"]).get("1", {}).get("status") == "done", 90, 0.2, "not done")
        record = statuses(client, document["id"])["1"]
    injected = [r for r in ehr.requests_log() if r["injected"]]
    assert [r["status"] for r in injected] == [503, 503]
    assert record["mentions"] == 4
    one_set_each(ehr, {document["id"]: present_mentions(record)})


def test_an_ehr_down_past_the_retries_dead_letters_the_job_and_dlq_retry_finishes_it(
    stack_env: dict[str, str],
    ehr: FhirTestServer,
    workers: list[WorkerProcess],
    tmp_path: Path,
    tiny_tagger_path: Path,
) -> None:
    from adapter.app import create_app
    from adapter.cli import main

    env = {
        **stack_env,
        "FHIR_NER_EHR_RETRY_ATTEMPTS": "2",
        "FHIR_NER_EHR_RETRY_MAX_DELAY": "0.2",
        "FHIR_NER_TASK_MAX_RETRIES": "2",
        "FHIR_NER_TASK_RETRY_MAX_DELAY": "0.5",
        "FHIR_NER_EHR_BREAKER_COOLDOWN": "0.5",
    }
    metrics_port = free_port()
    start_worker(
        workers, {**env, "FHIR_NER_WORKER_METRICS_PORT": str(metrics_port)}, tiny_tagger_path, tmp_path / "w.log"
    )
    patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba"}]})
    documents = [note_document(ehr, patient["id"], text) for text in SAMPLE_NOTES[:2]]
    ehr.fail_next(100_000, 503)  # down
    with TestClient(create_app()) as client:
        for number, document in enumerate(documents, start=1):
            assert notify(client, document, number) == 200
        for document in documents:
            wait_until(
                lambda d=document: statuses(client, d["id"]).get("1", {}).get("status") == "dead-lettered",
                120,
                0.2,
                "not dead-lettered",
            )
        assert sum(1 for r in ehr.requests_log() if r["injected"]) >= 4  # it did try, and retried
        ehr.fail_next(0)  # back
        listed = CliRunner().invoke(main, ["dlq", "list"])
        assert listed.exit_code == 0 and listed.output.count("write_note:") == 2, listed.output
        retried = CliRunner().invoke(main, ["dlq", "retry", "--all"])
        assert retried.exit_code == 0 and retried.output.count("requeued") == 2, retried.output
        for document in documents:
            wait_until(
                lambda d=document: statuses(client, d["id"])["1"]["status"] == "done", 60, 0.2, "not done after retry"
            )
        records = {d["id"]: statuses(client, d["id"])["1"] for d in documents}
        assert CliRunner().invoke(main, ["dlq", "list"]).output.count("write_note:") == 0
    exposed = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert metric(exposed, "fhir_ner_worker_retries_total", task="write_note") == 2 * 2  # two notes, two retries
    assert metric(exposed, "fhir_ner_worker_dead_letters_total", task="write_note") == 2
    assert metric(exposed, "fhir_ner_worker_notes_total", outcome="dead-lettered") == 2
    assert metric(exposed, "fhir_ner_worker_notes_total", outcome="done") == 2
    one_set_each(ehr, {document_id: present_mentions(record) for document_id, record in records.items()})


def test_no_accepted_notification_is_lost_when_redis_restarts(
    app_env: dict[str, str],
    ehr: FhirTestServer,
    workers: list[WorkerProcess],
    tmp_path: Path,
    tiny_tagger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis is killed (kill -9) and started again on its AOF while notes arrive and are being processed."""
    from adapter.app import create_app
    from core.celery_app import get_celery_app
    from core.deps import reset_dependencies

    own = OwnRedis(tmp_path / "redis").start()
    try:
        env = {**app_env, "FHIR_NER_REDIS_URL": own.url, "FHIR_NER_EHR_BASE_URL": ehr.base_url}
        env |= {"FHIR_NER_TERMINOLOGY": "off", **FAST_REDELIVERY}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        reset_dependencies()
        get_celery_app.cache_clear()
        start_worker(workers, env, tiny_tagger_path, tmp_path / "worker.log")
        patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba"}]})
        documents = [note_document(ehr, patient["id"], SAMPLE_NOTES[i % 3]) for i in range(40)]
        accepted: list[str] = []
        refused = 0

        def send_all() -> None:
            nonlocal refused
            for number, document in enumerate(documents, start=1):
                while True:  # as an EHR does: a refused notification is sent again later
                    try:
                        code = notify(client, document, number)
                    except Exception:  # noqa: BLE001 - the API may fail outright while Redis is down
                        code = 599
                    if code == 200:
                        accepted.append(document["id"])
                        break
                    refused += 1
                    time.sleep(0.2)
                time.sleep(0.05)

        with TestClient(create_app()) as client:
            sender = threading.Thread(target=send_all)
            sender.start()
            wait_until(lambda: len(accepted) >= 12, 60, 0.02, "notes were not accepted")
            own.kill()
            time.sleep(2)
            own.start()
            sender.join(timeout=120)
            assert not sender.is_alive()
            assert len(accepted) == len(documents)
            wait_until(
                lambda: all(statuses(client, d)["1"]["status"] == "done" for d in accepted),
                180,
                0.5,
                "accepted notes were not all processed",
            )
            records = {d: statuses(client, d)["1"] for d in accepted}
        assert refused > 0  # the outage was seen: notifications were refused (503), not accepted and lost
    finally:
        own.stop()
        get_celery_app.cache_clear()
    one_set_each(ehr, {d: present_mentions(records[d]) for d in accepted})
