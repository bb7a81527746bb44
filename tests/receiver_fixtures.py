"""Fixtures for the receiver tests (loaded with ``pytest_plugins``): the API with jobs recorded, no worker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from receiver_helpers import EHR_BASE, LiveApi

from core.jobs import RecordingJobQueue, use_job_queue


@pytest.fixture()
def jobs() -> Iterator[RecordingJobQueue]:
    queue = RecordingJobQueue()
    use_job_queue(queue)
    yield queue
    use_job_queue(None)


@pytest.fixture()
def receiver_env(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test environment, with the background watch off (tests run it themselves) and a fake EHR URL."""
    from core.deps import reset_dependencies

    extra = {"FHIR_NER_RECOVERY_CHECK_SECONDS": "0", "FHIR_NER_EHR_BASE_URL": EHR_BASE}
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    reset_dependencies()
    return {**app_env, **extra}


@pytest.fixture()
def api(receiver_env: dict[str, str], jobs: RecordingJobQueue) -> Iterator[TestClient]:
    from adapter.app import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture()
def live_api(receiver_env: dict[str, str], jobs: RecordingJobQueue) -> Iterator[LiveApi]:
    api = LiveApi().start()
    yield api
    api.stop()
