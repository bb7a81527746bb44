"""The acknowledgement path stays cheap, and its benchmark checks what it claims. Nothing here is timed.

* the notify benchmark's queue check (``benchmarks/bench_notify.py``) finds the task message a real notification
  left on the Celery app's queues, and fails when one is missing;
* a notification costs one Redis round trip;
* no request passes through starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``), which runs every
  request in a task group with its response streamed through memory channels: it once doubled the CPU time
  of an acknowledgement (README, "Acknowledgement benchmark").
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis.connection
from fastapi.testclient import TestClient

pytest_plugins = ["receiver_fixtures"]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_notify.py"
HEADERS = {"Authorization": "Bearer test-token", "Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_notify", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def celery_api(receiver_env: dict[str, str]) -> Iterator[TestClient]:
    """The API with its real job queue (Celery task messages in the test Redis), no worker."""
    from adapter.app import create_app
    from core.celery_app import get_celery_app

    get_celery_app.cache_clear()
    with TestClient(create_app()) as client:
        yield client
    get_celery_app.cache_clear()


def test_the_benchmark_finds_the_message_of_a_real_notification(
    bench: ModuleType, celery_api: TestClient, receiver_env: dict[str, str], redis_url: str
) -> None:
    from core.celery_app import get_celery_app

    prefix = receiver_env["FHIR_NER_KEY_PREFIX"]
    body = bench.notification(1, 2_000, "t")  # exactly what the benchmark sends: note bench-t-1
    for _ in range(2):  # a redelivery queues nothing more
        assert celery_api.post("/fhir/notify", content=body, headers=HEADERS).status_code == 200

    check = bench.check_queues(redis_url, prefix, ["bench-t-1"])
    assert check.ok, check.problems
    assert check.tasks == {"io": {"worker.tasks.process_note": 1}}
    messages = [(m.queue, m.task, m.args) for m in check.messages]
    assert messages == [("io", "worker.tasks.process_note", ["bench-t-1", "1"])]

    # A note that was accepted but left no message fails the check.
    missing = bench.check_queues(redis_url, prefix, ["bench-t-1", "bench-t-2"])
    assert not missing.ok and missing.problems == ["1 process_note message(s) missing, e.g. bench-t-2/1"]

    # Messages are read from every priority list of the queue, as a worker reads them.
    get_celery_app().send_task("worker.tasks.process_note", args=["bench-t-2", "1"], priority=9)
    both = bench.check_queues(redis_url, prefix, ["bench-t-1", "bench-t-2"])
    assert both.ok, both.problems
    assert both.tasks == {"io": {"worker.tasks.process_note": 2}}

    # The same message twice is a failure too.
    get_celery_app().send_task("worker.tasks.process_note", args=["bench-t-2", "1"])
    doubled = bench.check_queues(redis_url, prefix, ["bench-t-1", "bench-t-2"])
    assert doubled.problems == ["1 process_note message(s) queued more than once, e.g. bench-t-2/1"]


def test_a_notification_is_one_redis_round_trip(
    bench: ModuleType, celery_api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims, statuses and task messages go in one pipeline; no ``SCRIPT EXISTS`` or other call beside it."""
    bodies = [bench.notification(number, 2_000, "rt") for number in (1, 2)]
    assert celery_api.post("/fhir/notify", content=bodies[0], headers=HEADERS).status_code == 200  # warm
    sent: list[Any] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(command)
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    assert celery_api.post("/fhir/notify", content=bodies[1], headers=HEADERS).status_code == 200
    assert len(sent) == 1


def test_no_request_runs_through_base_http_middleware(receiver_env: dict[str, str]) -> None:
    from starlette.middleware.base import BaseHTTPMiddleware

    from adapter.app import create_app

    app = create_app()
    assert app.user_middleware, "the request-id middleware is installed"
    assert [m for m in app.user_middleware if m.cls is BaseHTTPMiddleware] == []
