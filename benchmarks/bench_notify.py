"""Receiver benchmark: sustained notifications per second, acknowledgement latency, errors.

Starts the API (``fhir-ner serve``, the real thing: real Redis, real Celery publish of each job, the
background watch on) on loopback, then sends R4 backport ``full-resource`` notifications, each carrying
a different ~10 KB note, at a fixed rate (open loop: a request is due at its scheduled time whether or
not earlier ones have been answered, and latency is counted from that time, so a stalled server cannot
hide its queueing). Reports p50/p90/p99/max acknowledgement latency, errors, the API processes' CPU time
(user + system) per notification after the warm-up, and checks the queues: it reads every task message
waiting on the Celery app's own queues (``core.celery_app.QUEUES``, through the app's broker connection, so
its key prefix and priority lists are the ones a worker reads) and fails unless each accepted note left
exactly one ``process_note`` message, on the queue the app routes it to. That is the only stage the API
feeds (no worker runs here, so the inference queue stays empty); other messages (a ``recover_events`` for
a gap that outlived its grace) are reported.

    .venv/bin/python benchmarks/bench_notify.py --rate 200 --duration 30
    .venv/bin/python benchmarks/bench_notify.py --rate 100 200 400 --workers 2   # one run per rate, then saturation

The load generator is a minimal HTTP/1.1 client on asyncio streams (keep-alive connections), so that it
costs the shared CPU as little as possible. Needs a Redis (``FHIR_NER_TEST_REDIS_URL``, default database
15 on loopback); every key it writes carries its own prefix and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
P99_TARGET_MS = 50.0  # saturation: the highest rate whose p99 stays under this (with no errors and no lost note)
TOKEN = "bench-token"
SENTENCES = (
    "Paciente de 67 años con fiebre de tres días, tos productiva y disnea de moderados esfuerzos. ",
    "Se realiza radiografía de tórax que muestra condensación en lóbulo inferior derecho. ",
    "Antecedentes de hipertensión arterial y diabetes mellitus tipo 2 en tratamiento con metformina. ",
    "Se inicia antibioterapia empírica y se solicita hemograma, bioquímica y hemocultivos. ",
)


def note_text(size: int, seed: int) -> str:
    text, index = [], seed
    while sum(len(t) for t in text) < size:
        text.append(SENTENCES[index % len(SENTENCES)])
        index += 1
    return "".join(text)[:size]


def notification(number: int, size: int, run: str) -> bytes:
    """A full-resource backport notification; each run has its own subscription, so its event numbers are new."""
    from worker.demo import notification_for

    bundle = notification_for(
        f"bench-{run}-{number}", "es", note_text(size, number), number, subscription=f"Subscription/bench-{run}"
    )
    return json.dumps(bundle).encode()


def request_bytes(host: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST /fhir/notify HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, payload: bytes) -> int:
        for attempt in range(2):
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            try:
                writer.write(payload)
                await writer.drain()
                return await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.streams = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


async def run_load(
    host: str,
    port: int,
    payloads: list[bytes],
    rate: float,
    connections: int,
    warmup: int,
    on_measured: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Send ``payloads`` at ``rate``; ``on_measured`` is called when the first one after the warm-up is due."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(host, port))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    accepted: list[int] = []  # indices (warm-up included) answered 200
    start = time.perf_counter() + 0.2

    async def one(index: int, payload: bytes) -> None:
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if index == warmup and on_measured is not None:
            on_measured()
        connection = await idle.get()
        try:
            status = await connection.send(payload)
            key = str(status)
        except Exception as error:  # counted as an error, the run goes on
            key = type(error).__name__
        finally:
            idle.put_nowait(connection)
        if key == "200":
            accepted.append(index)
        if index >= warmup:
            latencies.append(time.perf_counter() - due)
            statuses[key] = statuses.get(key, 0) + 1

    began = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(payloads)))
    elapsed = time.perf_counter() - began
    measured = len(payloads) - warmup
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "sent": measured,
        "statuses": statuses,
        "errors": measured - statuses.get("200", 0),
        "achieved_rate": round(len(payloads) / elapsed, 1),
        "p50_ms": round(pct(0.50), 2),
        "p90_ms": round(pct(0.90), 2),
        "p99_ms": round(pct(0.99), 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
        "accepted_indices": sorted(accepted),
    }


@dataclass
class QueuedMessage:
    queue: str  # the queue's kind (core.celery_app.QUEUES)
    task: str
    args: list[Any]


@dataclass
class QueueCheck:
    """What the queues hold after a run, against what the accepted notifications should have left there."""

    messages: list[QueuedMessage]
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)  # queue kind -> task -> messages
    problems: list[str] = field(default_factory=list)  # empty: every expected message is there, once

    @property
    def ok(self) -> bool:
        return not self.problems


@contextmanager
def deployment(redis_url: str, prefix: str) -> Iterator[None]:
    """The settings (and so the Celery app) of the API under test: its Redis and its key prefix."""
    from core.celery_app import get_celery_app
    from core.settings import get_settings

    saved = {name: os.environ.get(name) for name in ("FHIR_NER_REDIS_URL", "FHIR_NER_KEY_PREFIX")}
    os.environ.update(FHIR_NER_REDIS_URL=redis_url, FHIR_NER_KEY_PREFIX=prefix)
    get_settings.cache_clear()
    get_celery_app.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
        get_celery_app.cache_clear()


def queued_messages(redis_url: str, prefix: str) -> list[QueuedMessage]:
    """Every task message waiting on the Celery app's queues, read as a worker would find them.

    The queues are the app's own (``core.celery_app.QUEUES`` named by ``queue_name``), read through its broker
    connection: kombu's channel gives the global key prefix, the priority lists and their names, and its own
    count of each queue (LLEN) must agree with the messages read, or the lookup is reading the wrong keys.
    """
    from core.celery_app import QUEUES, get_celery_app, queue_name

    found: list[QueuedMessage] = []
    with deployment(redis_url, prefix):
        app = get_celery_app()
        with app.connection_for_read() as connection:
            channel: Any = connection.default_channel
            for kind in QUEUES:
                queue = queue_name(kind)
                raws: list[bytes] = []
                for priority in sorted(set(channel.priority_steps)):
                    key = channel.global_keyprefix + channel._q_for_pri(queue, priority)
                    raws += reversed(channel.client.lrange(key, 0, -1))  # LPUSH, BRPOP: oldest last
                counted = channel._size(queue)
                if counted != len(raws):
                    raise RuntimeError(f"queue {queue}: kombu counts {counted} messages, the lookup read {len(raws)}")
                for raw in raws:
                    message = json.loads(raw)
                    body = message["body"]
                    if message.get("properties", {}).get("body_encoding") == "base64":
                        body = base64.b64decode(body)
                    args = json.loads(body)[0]
                    found.append(QueuedMessage(kind, message["headers"]["task"], list(args)))
    return found


def check_queues(redis_url: str, prefix: str, accepted_documents: list[str]) -> QueueCheck:
    """Each accepted note must have left exactly one ``process_note(id, "1")`` message, on the queue the Celery
    app routes ``process_note`` to; anything else found is counted (and shown) but is no failure."""
    from core.celery_app import get_celery_app
    from core.jobs import TASK_PROCESS_NOTE

    check = QueueCheck(queued_messages(redis_url, prefix))
    for message in check.messages:
        per_queue = check.tasks.setdefault(message.queue, {})
        per_queue[message.task] = per_queue.get(message.task, 0) + 1
    with deployment(redis_url, prefix):
        route = get_celery_app().amqp.router.route({}, TASK_PROCESS_NOTE, ["x", "1"], {})
        expected_queue = str(route["queue"].name).removeprefix(prefix + ".")
    found: dict[str, int] = {}
    for message in check.messages:
        if message.task != TASK_PROCESS_NOTE:
            continue
        if message.queue != expected_queue:
            check.problems.append(f"process_note{message.args} on the {message.queue} queue, not {expected_queue}")
        key = "/".join(str(a) for a in message.args)
        found[key] = found.get(key, 0) + 1
    wanted = {f"{document}/1" for document in accepted_documents}
    missing = sorted(wanted - set(found))
    doubled = sorted(k for k, n in found.items() if n > 1)
    stray = sorted(set(found) - wanted)
    for what, keys in (("missing", missing), ("queued more than once", doubled), ("not accepted", stray)):
        if keys:
            check.problems.append(f"{len(keys)} process_note message(s) {what}, e.g. {', '.join(keys[:3])}")
    return check


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and its live descendants (uvicorn's or Celery's pool processes),
    from /proc: what they spent, whatever ran on which core. bench_e2e.py uses it for the workers."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry.name)] = int(fields[1])  # field 4 of stat: ppid (fields here start at field 3)
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # fields 14 and 15: utime, stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in tree)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the API exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the API did not become ready")


def git_commit(checkout: Path = REPO) -> str:
    """The commit measured, with ``+dirty`` when the working tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout, capture_output=True, text=True
        )
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_once(args: argparse.Namespace, rate: float, client: redis.Redis) -> dict[str, Any]:
    """One server, one rate: latency, the server's CPU, and the queue check."""
    run = uuid.uuid4().hex[:8]
    prefix = f"fhir-ner-bench-{run}"
    port = free_port()
    env = {
        **os.environ,
        "FHIR_NER_ENVIRONMENT": "test",
        "FHIR_NER_REDIS_URL": args.redis,
        "FHIR_NER_KEY_PREFIX": prefix,
        "FHIR_NER_SUBSCRIPTION_TOKENS": TOKEN,
    }
    warmup = int(args.warmup * rate)
    total = warmup + int(args.duration * rate)
    payloads = [request_bytes("127.0.0.1", port, notification(i + 1, args.note_bytes, run)) for i in range(total)]
    body_kb = (len(payloads[0]) - payloads[0].index(b"\r\n\r\n") - 4) / 1024
    command = [sys.executable, "-m", "adapter.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(args.workers)]
    load_before = os.getloadavg()[0]
    server = subprocess.Popen(command, cwd=args.checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profiler: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(port, server)
        if args.profile is not None:  # py-spy (pip install py-spy): collapsed stacks of the API process
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--subprocesses", "--format", "raw", "--nonblocking"]
                + ["--rate", "100", "-o", str(args.profile)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        cpu_marks: list[float] = []  # when the measured notifications start, after the warm-up
        result = asyncio.run(
            run_load(
                "127.0.0.1",
                port,
                payloads,
                rate,
                args.connections,
                warmup,
                lambda: cpu_marks.append(tree_cpu_seconds(server.pid)),
            )
        )
        server_cpu_ms = (tree_cpu_seconds(server.pid) - cpu_marks[0]) / (total - warmup) * 1000
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(timeout=30)
        time.sleep(0.5)
        accepted = [f"bench-{run}-{index + 1}" for index in result.pop("accepted_indices")]
        check = check_queues(args.redis, prefix, accepted)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    queued = sum(1 for m in check.messages if m.task == "worker.tasks.process_note")
    return {
        "rate_target": rate,
        "duration_s": args.duration,
        "note_chars": args.note_bytes,
        "body_kb": round(body_kb, 1),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "commit": git_commit(args.checkout),
        **result,
        "server_cpu_ms_per_notification": round(server_cpu_ms, 2),
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "notes_sent": total,
        "notes_accepted": len(accepted),
        "process_note_messages": queued,
        "task_messages": check.tasks,
        "queue_problems": check.problems,
        "ok": result["errors"] == 0 and check.ok and len(accepted) == total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rate", type=float, nargs="+", default=[200.0], help="notifications per second (several: one run each)"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent first and not measured")
    parser.add_argument("--note-bytes", type=int, default=10_000, help="characters of each note")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="API worker processes (fhir-ner serve --workers)")
    parser.add_argument("--redis", default=os.environ.get("FHIR_NER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    parser.add_argument(
        "--checkout",
        type=Path,
        default=REPO,
        help="run the API from this checkout (e.g. a git worktree of an older commit, for a before/after comparison)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy's collapsed stacks of the API (one rate)")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis)
    client.ping()
    summaries = []
    for rate in args.rate:
        summary = run_once(args, rate, client)
        summaries.append(summary)
        print(json.dumps(summary, indent=2))
        print(
            f"{rate:.0f}/s target, {summary['achieved_rate']}/s sent for {args.duration:.0f} s, {args.workers} API "
            f"process(es), {summary['body_kb']} KB bodies: p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
            f"max {summary['max_ms']} ms, errors {summary['errors']}; {summary['process_note_messages']} process_note "
            f"messages for {summary['notes_accepted']} accepted of {summary['notes_sent']} notes; server CPU "
            f"{summary['server_cpu_ms_per_notification']:.2f} ms per notification; load average "
            f"{summary['load_average_1m_before']} -> {summary['load_average_1m_after']}; commit {summary['commit']}"
            + ("" if summary["ok"] else " -- FAILED: " + "; ".join(summary["queue_problems"] or ["errors"])),
            file=sys.stderr,
        )
    under = [s["rate_target"] for s in summaries if s["ok"] and s["p99_ms"] < P99_TARGET_MS]
    saturation = max(under) if under else None
    if len(summaries) > 1:
        print(
            f"saturation with {args.workers} API process(es): "
            + (f"{saturation:.0f}/s" if saturation else "none of the rates")
            + f" (highest rate with p99 < {P99_TARGET_MS:.0f} ms, no errors, every note on its queue)",
            file=sys.stderr,
        )
    if args.json:
        args.json.write_text(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
    return 0 if all(s["ok"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
