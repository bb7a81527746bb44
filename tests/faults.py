"""Helpers of the fault and load tests: notes in the test EHR, notifications through the API, counting what
the EHR holds, and a Redis of our own that a test may kill and restart."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis
from ehr.harness import FhirTestServer
from fastapi.testclient import TestClient
from test_end_to_end import AUTH, backport_notification, create

DERIVED_TYPES = ("Condition", "Observation", "Procedure", "FamilyMemberHistory")


def note_document(ehr: FhirTestServer, patient_id: str, text: str, language: str = "es") -> dict[str, Any]:
    return create(
        ehr,
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "docStatus": "final",
            "subject": {"reference": f"Patient/{patient_id}"},
            "date": "2026-11-20T09:30:00Z",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "language": language,
                        "data": base64.b64encode(text.encode()).decode(),
                    }
                }
            ],
        },
    )


def notify(client: TestClient, document: dict[str, Any], event_number: int = 2) -> int:
    response = client.post(
        "/fhir/notify", content=json.dumps(backport_notification(document, event_number)), headers=AUTH
    )
    return response.status_code


def statuses(client: TestClient, document_id: str) -> dict[str, dict[str, Any]]:
    response = client.get(f"/documents/{document_id}", headers=AUTH)
    return response.json()["versions"] if response.status_code == 200 else {}


def wait_until(predicate: Any, timeout: float, interval: float = 0.1, message: str | Any = "") -> None:
    """Poll ``predicate``; on timeout fail with ``message`` (a callable is asked then, to describe the state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s: {message() if callable(message) else message}")


def all_of(ehr: FhirTestServer, resource_type: str) -> list[dict[str, Any]]:
    """Every resource of a type (following the search's next links)."""
    found: list[dict[str, Any]] = []
    url: str | None = f"{ehr.base_url}/{resource_type}?_count=1000"
    while url:
        bundle = httpx.get(url, timeout=30).json()
        found += [entry["resource"] for entry in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return found


def derived_by_document(ehr: FhirTestServer, namespace: str) -> dict[str, Counter[str]]:
    """For each note id: how many resources of each type the EHR holds from it (by our identifiers)."""
    held: dict[str, Counter[str]] = {}
    for resource_type in (*DERIVED_TYPES, "Provenance"):
        for resource in all_of(ehr, resource_type):
            if resource_type == "Provenance":
                entity = resource["entity"][0]["what"]["reference"]
                document_id = entity.split("/")[1]
            else:
                derivation = next(e for e in resource.get("extension", []) if e["url"].endswith("derivation-reference"))
                reference = next(p for p in derivation["extension"] if p["url"] == "reference")
                document_id = reference["valueReference"]["reference"].split("/")[1]
            held.setdefault(document_id, Counter())[resource_type] += 1
    return held


def duplicate_identifiers(ehr: FhirTestServer, namespace: str) -> list[str]:
    """Identifier values (in our namespace) held by more than one resource: each would be a duplicate."""
    seen: Counter[str] = Counter()
    for resource_type in (*DERIVED_TYPES, "Provenance", "Device"):
        for resource in all_of(ehr, resource_type):
            for identifier in resource.get("identifier", []):
                if identifier.get("system") == namespace:
                    seen[identifier["value"]] += 1
    return [value for value, count in seen.items() if count > 1]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition."""
    selector = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(selector) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(rf"^{pattern}$", text, re.MULTILINE)
    assert found is not None, f"{name} {labels} not in metrics"
    return float(found.group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A redis-server of the test's own, durable as in production (AOF, fsync on every write), so the test
    can kill it and start it again on the same port and data."""

    def __init__(self, folder: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server not found (tests/ensure-redis.sh installs one)")
        self.executable = executable
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=(self.folder / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_until(lambda: self._answers(client), 20, 0.05, "own redis-server did not start")
        return self

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
