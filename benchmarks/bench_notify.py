"""Receiver benchmark: sustained notifications per second, acknowledgement latency, errors.

Starts the API (``fhir-ner serve``, the real thing: real Redis, real Celery publish of each job, the
background watch on) on loopback, then sends R4 backport ``full-resource`` notifications, each carrying
a different ~10 KB note, at a fixed rate (open loop: a request is due at its scheduled time whether or
not earlier ones have been answered, and latency is counted from that time, so a stalled server cannot
hide its queueing). Reports p50/p90/p99/max acknowledgement latency, errors, and checks that every
accepted note left exactly one task message on the queue.

    .venv/bin/python benchmarks/bench_notify.py --rate 200 --duration 30

The load generator is a minimal HTTP/1.1 client on asyncio streams (keep-alive connections), so that it
costs the shared CPU as little as possible. Needs a Redis (``FHIR_NER_TEST_REDIS_URL``, default database
15 on loopback); every key it writes carries its own prefix and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
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
    host: str, port: int, payloads: list[bytes], rate: float, connections: int, warmup: int
) -> dict[str, Any]:
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(host, port))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    start = time.perf_counter() + 0.2

    async def one(index: int, payload: bytes) -> None:
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        connection = await idle.get()
        try:
            status = await connection.send(payload)
            key = str(status)
        except Exception as error:  # counted as an error, the run goes on
            key = type(error).__name__
        finally:
            idle.put_nowait(connection)
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
    }


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children (uvicorn workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="notifications per second")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent first and not measured")
    parser.add_argument("--note-bytes", type=int, default=10_000, help="characters of each note")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="API worker processes (fhir-ner serve --workers)")
    parser.add_argument("--redis", default=os.environ.get("FHIR_NER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis)
    client.ping()
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
    warmup = int(args.warmup * args.rate)
    total = warmup + int(args.duration * args.rate)
    payloads = [request_bytes("127.0.0.1", port, notification(i + 1, args.note_bytes, run)) for i in range(total)]
    body_kb = (len(payloads[0]) - payloads[0].index(b"\r\n\r\n") - 4) / 1024
    command = [sys.executable, "-m", "adapter.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(args.workers)]
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, server)
        cpu_before = tree_cpu_seconds(server.pid)
        result = asyncio.run(run_load("127.0.0.1", port, payloads, args.rate, args.connections, warmup))
        server_cpu_ms = (tree_cpu_seconds(server.pid) - cpu_before) / total * 1000
        time.sleep(0.5)
        tasks: dict[str, int] = {}
        for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169"):
            for raw in client.lrange(f"{prefix}.notes{suffix}", 0, -1):
                task = json.loads(raw)["headers"]["task"]
                tasks[task] = tasks.get(task, 0) + 1
        queued = tasks.get("worker.tasks.process_note", 0)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    summary = {
        "rate_target": args.rate,
        "duration_s": args.duration,
        "note_chars": args.note_bytes,
        "body_kb": round(body_kb, 1),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        **result,
        "server_cpu_ms_per_notification": round(server_cpu_ms, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "process_note_messages": queued,
        "task_messages": tasks,
        "accepted_total": total if result["errors"] == 0 else None,
    }
    print(json.dumps(summary, indent=2))
    print(
        f"{args.rate:.0f}/s target, {result['achieved_rate']}/s sent for {args.duration:.0f} s, "
        f"{body_kb:.1f} KB bodies: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
        f"max {result['max_ms']} ms, errors {result['errors']}, {queued} process_note messages for {total} notes; "
        f"server CPU {server_cpu_ms:.2f} ms per notification",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if result["errors"] == 0 and queued == total else 1


if __name__ == "__main__":
    sys.exit(main())
