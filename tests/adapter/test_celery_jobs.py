"""Jobs as real Celery task messages: pushed with their claim, once, and consumed by a real Celery worker."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from receiver_helpers import AUTH, backport, document, post

from core.jobs import celery_envelope

pytest_plugins = ["receiver_fixtures"]


def messages(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    found = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSH + BRPOP: oldest last
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        found.append({"task": message["headers"]["task"], "args": body[0], "message": message})
    return found


@pytest.fixture()
def celery_api(receiver_env: dict[str, str]) -> Iterator[TestClient]:
    """The API with its real job queue (Celery over the test Redis), no worker."""
    from adapter.app import create_app
    from core.celery_app import get_celery_app

    get_celery_app.cache_clear()
    with TestClient(create_app()) as client:
        yield client
    get_celery_app.cache_clear()


def test_each_job_is_one_task_message_on_the_io_queue(
    celery_api: TestClient, receiver_env: dict[str, str], redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = receiver_env["FHIR_NER_KEY_PREFIX"]
    queue = f"{prefix}:broker:{prefix}.io"  # kombu's global key prefix, then the queue's name
    for _ in range(3):  # delivered three times
        assert post(celery_api, backport(document("a"), 1)).status_code == 200
        assert post(celery_api, backport(None, 2, focus=["DocumentReference/b"])).status_code == 200
        assert post(celery_api, backport(None, 3, focus=[None])).status_code == 200
        assert post(celery_api, backport(document("a", "2", status="entered-in-error"), 4)).status_code == 200
    found = messages(client, queue)
    assert [(m["task"], m["args"]) for m in found] == [
        ("worker.tasks.process_note", ["a", "1"]),
        ("worker.tasks.resolve_note", ["b", "Subscription/s1"]),
        ("worker.tasks.recover_events", ["Subscription/s1", 3, 3, 1795167000.0]),
        ("worker.tasks.retract_note", ["a", "2"]),
    ]
    message = found[0]["message"]
    assert message["properties"]["delivery_info"] == {"exchange": "", "routing_key": f"{prefix}.io"}
    assert message["headers"]["id"] == message["properties"]["correlation_id"]
    statuses = celery_api.get("/documents/a", headers=AUTH).json()["versions"]
    assert statuses["1"]["status"] == "queued" and statuses["2"]["action"] == "retract"
    metrics = celery_api.get("/metrics").text
    assert 'fhir_ner_queue_depth{queue="io"} 4.0' in metrics
    assert 'fhir_ner_queue_depth{queue="inference"} 0.0' in metrics


def test_a_real_celery_worker_runs_the_messages(receiver_env: dict[str, str], redis_url: str) -> None:
    from celery.contrib.testing.worker import start_worker

    from core.celery_app import get_celery_app, queue_name

    get_celery_app.cache_clear()
    app = get_celery_app()
    client = redis.Redis.from_url(redis_url)
    done_key = f"{receiver_env['FHIR_NER_KEY_PREFIX']}:echo"

    @app.task(name="tests.adapter.echo")
    def echo(*args: Any) -> None:
        client.rpush(done_key, json.dumps(args))

    for number in range(3):
        envelope = celery_envelope("tests.adapter.echo", ["note", str(number)])
        assert envelope is not None
        client.lpush(envelope.key, envelope.payload)
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING", queues=[queue_name("io")]):
        deadline = time.monotonic() + 30
        while client.llen(done_key) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert sorted(json.loads(item) for item in client.lrange(done_key, 0, -1)) == [
        ["note", "0"],
        ["note", "1"],
        ["note", "2"],
    ]
    get_celery_app.cache_clear()


def test_jobs_of_notifications_without_a_subscription_are_sent_too(
    celery_api: TestClient, receiver_env: dict[str, str], redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = receiver_env["FHIR_NER_KEY_PREFIX"]
    queue = f"{prefix}:broker:{prefix}.io"
    anonymous = backport(None, 1, focus=["DocumentReference/b"])
    anonymous["entry"][0]["resource"]["parameter"].pop(0)  # no subscription parameter
    assert post(celery_api, anonymous).status_code == 200
    hapi_style = backport(None, 1, focus=["DocumentReference/c"])
    hapi_style["entry"][0]["resource"]["parameter"] = hapi_style["entry"][0]["resource"]["parameter"][:4]
    assert post(celery_api, hapi_style).status_code == 200  # no event numbers, only the entry's fullUrl
    assert [(m["task"], m["args"]) for m in messages(client, queue)] == [
        ("worker.tasks.resolve_note", ["b", None]),
        ("worker.tasks.resolve_note", ["c", "Subscription/s1"]),
    ]
