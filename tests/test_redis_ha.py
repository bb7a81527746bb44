"""Redis high availability with Sentinel, on real parts: a throwaway master, its replica and one sentinel (own
redis-server processes on free ports), the API's Redis client and a real Celery worker pointed at the sentinel
(``FHIR_NER_REDIS_URL=sentinel://...``, ``FHIR_NER_REDIS_SENTINEL_MASTER``). A note is processed; the sentinel
fails the master over (``SENTINEL FAILOVER``); a second note is processed through the new master."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import WorkerProcess
from ehr.harness import FhirTestServer
from fastapi.testclient import TestClient
from faults import create, free_port, note_document, notify, statuses, wait_until
from tiny_models import SAMPLE_NOTES

pytestmark = [pytest.mark.ha, pytest.mark.timeout(180)]

MASTER_NAME = "mymaster"


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class SentinelGroup:
    """A master, one replica and one sentinel (quorum 1), in a folder of the test's own."""

    def __init__(self, folder: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(
                "redis-server not found: this test starts its own master, replica and sentinel "
                "(make test installs it through tests/ensure-redis.sh; or apt-get install redis-server)"
            )
        self.executable = executable
        self.folder = folder
        self.ports = {"a": free_port(), "b": free_port(), "sentinel": free_port()}
        self.processes: list[subprocess.Popen[bytes]] = []

    def _start(self, name: str, *args: str) -> None:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        self.processes.append(
            subprocess.Popen(
                [self.executable, *args],
                cwd=folder,
                stdout=(folder / "redis.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
        )

    def client(self, name: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[name], socket_connect_timeout=1, socket_timeout=2)

    def start(self) -> SentinelGroup:
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._start("a", "--port", str(self.ports["a"]), *common)
        self._start("b", "--port", str(self.ports["b"]), *common, "--replicaof", "127.0.0.1", str(self.ports["a"]))
        conf = self.folder / "sentinel" / "sentinel.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f"port {self.ports['sentinel']}\nbind 127.0.0.1\ndir {conf.parent}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.ports['a']} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        self._start("sentinel", str(conf), "--sentinel")
        for name in self.ports:
            client = self.client(name)
            wait_until(lambda c=client: _answers(c), 20, 0.05, f"redis-server {name} did not start")
        wait_until(self._replica_in_sync, 30, 0.1, "the replica never synced with the master")
        wait_until(self._sentinel_sees_replica, 30, 0.1, "the sentinel never found the replica")
        return self

    def _replica_in_sync(self) -> bool:
        info: dict[str, Any] = self.client("b").info("replication")
        return bool(info.get("master_link_status") == "up")

    def _sentinel_sees_replica(self) -> bool:
        replicas = self.client("sentinel").sentinel_slaves(MASTER_NAME)  # parsed by redis-py, one dict each
        return any(not r.get("is_sdown") and r.get("master-link-status") == "ok" for r in replicas)

    def master_port(self) -> int:
        host, port = self.client("sentinel").execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def failover(self) -> None:
        """Promote the replica: every write acknowledged so far is replicated first (WAIT), so none is lost."""
        assert self.client("a").execute_command("WAIT", 1, 5000) == 1
        self.client("sentinel").execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_until(lambda: self.master_port() == self.ports["b"], 30, 0.1, "the sentinel did not fail over")
        wait_until(
            lambda: self.client("b").info("replication").get("role") == "master", 30, 0.1, "b never became master"
        )

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.ports['sentinel']}/0"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture()
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "redis").start()
    yield group
    group.stop()


def test_notes_are_processed_through_sentinel_before_and_after_a_failover(
    app_env: dict[str, str],
    ehr: FhirTestServer,
    sentinel_group: SentinelGroup,
    tiny_tagger_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapter.app import create_app
    from core.celery_app import get_celery_app
    from core.deps import get_redis, reset_dependencies

    env = {
        **app_env,
        "FHIR_NER_REDIS_URL": sentinel_group.url,
        "FHIR_NER_REDIS_SENTINEL_MASTER": MASTER_NAME,
        "FHIR_NER_EHR_BASE_URL": ehr.base_url,
        "FHIR_NER_TERMINOLOGY": "off",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_dependencies()
    get_celery_app.cache_clear()
    assert get_redis().connection_pool.__class__.__name__ == "SentinelConnectionPool"
    worker = WorkerProcess({**env, "FHIR_NER_MODEL_PATH": str(tiny_tagger_path)}, tmp_path / "worker.log").start()
    try:
        patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Prueba"}]})
        first, second = (note_document(ehr, patient["id"], text) for text in SAMPLE_NOTES[:2])
        with TestClient(create_app()) as client:
            assert notify(client, first, 1) == 200
            wait_until(
                lambda: statuses(client, first["id"]).get("1", {}).get("status") == "done",
                60,
                0.1,
                "the first note was not processed through the sentinel's master",
            )
            # The note's state and the broker's queues live on the master the sentinel named (a), none elsewhere.
            prefix = env["FHIR_NER_KEY_PREFIX"]
            assert any(sentinel_group.client("a").scan_iter(f"{prefix}:*", count=1000))

            sentinel_group.failover()
            # The old master is now a replica of the new one: nothing can be written to it any more.
            wait_until(
                lambda: sentinel_group.client("a").info("replication").get("role") == "slave",
                30,
                0.1,
                "the old master was not turned into a replica",
            )
            assert notify(client, second, 2) == 200
            wait_until(
                lambda: statuses(client, second["id"]).get("1", {}).get("status") == "done",
                60,
                0.1,
                "the second note was not processed after the failover",
            )
            assert statuses(client, first["id"])["1"]["status"] == "done"  # replicated before the failover
        # The second note's status was written to the new master (b), and nowhere else could it be written.
        record = sentinel_group.client("b").hget(f"{prefix}:status:{second['id']}", "1")
        assert record is not None and b'"done"' in record
    finally:
        worker.stop()
    assert worker.process is not None and worker.process.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


def test_sentinel_settings_are_checked_and_reach_celery_and_the_state_client(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from core.celery_app import get_celery_app
    from core.deps import get_redis, reset_dependencies
    from core.jobs import _broker_is_state_redis
    from core.settings import Settings

    with pytest.raises(ValidationError, match="FHIR_NER_REDIS_SENTINEL_MASTER"):
        Settings(redis_url="sentinel://127.0.0.1:26379/0")
    with pytest.raises(ValidationError, match="sentinel://"):
        Settings(redis_sentinel_master="mymaster")
    url = "sentinel://:secret@10.0.0.1:26379/3;sentinel://10.0.0.2:26380/3"
    monkeypatch.setenv("FHIR_NER_REDIS_URL", url)
    monkeypatch.setenv("FHIR_NER_REDIS_SENTINEL_MASTER", "cache-a")
    reset_dependencies()
    get_celery_app.cache_clear()
    options = get_celery_app().conf.broker_transport_options
    assert options["master_name"] == "cache-a" and options["global_keyprefix"].startswith(
        app_env["FHIR_NER_KEY_PREFIX"]
    )
    assert _broker_is_state_redis(str(get_celery_app().conf.broker_url))  # task messages still ride with the claim
    pool = get_redis().connection_pool  # built without connecting
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in pool.sentinel_manager.sentinels
    ] == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert pool.service_name == "cache-a"
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (3, "secret")
