"""CPU time of one ``POST /fhir/notify`` through the ASGI app itself: no HTTP server, no network, no other process.

The request path as ``bench_notify.py`` drives it (the same 14.6 KB R4 backport notifications, real Redis, real
Celery task messages, the JSON logs written to /dev/null), called in one process, one notification after
the other, so that its CPU time is measured with less of the noise a loaded machine adds to a server run.
``--cprofile`` prints where the time goes; ``--checkout`` measures another checkout (e.g. a git worktree of an
older commit) with this script, for a before/after comparison.

    .venv/bin/python benchmarks/profile_notify.py --notifications 600
    .venv/bin/python benchmarks/profile_notify.py --checkout /tmp/before --notifications 600
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=600, help="measured notifications (after 50 unmeasured)")
    parser.add_argument("--note-bytes", type=int, default=10_000)
    parser.add_argument("--redis", default=os.environ.get("FHIR_NER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--checkout", type=Path, default=BENCHMARKS.parent, help="the checkout whose API is measured")
    parser.add_argument("--cprofile", action="store_true", help="print the top functions (cProfile, CPU time)")
    args = parser.parse_args()

    sys.path.insert(0, str(BENCHMARKS))
    import bench_notify  # builds the notifications (imports the demo from this checkout's worker)

    checkout = str(args.checkout.resolve())
    while checkout in sys.path:
        sys.path.remove(checkout)
    sys.path.insert(0, checkout)  # before anything of adapter/ or core/ is imported
    run = uuid.uuid4().hex[:8]
    prefix = f"fhir-ner-profile-{run}"
    os.environ.update(
        FHIR_NER_ENVIRONMENT="test",
        FHIR_NER_REDIS_URL=args.redis,
        FHIR_NER_KEY_PREFIX=prefix,
        FHIR_NER_SUBSCRIPTION_TOKENS=bench_notify.TOKEN,
    )
    from core.logging_config import configure_logging

    configure_logging("INFO")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    from adapter.app import create_app

    warm = 50
    bodies = [bench_notify.notification(i + 1, args.note_bytes, run) for i in range(warm + args.notifications)]
    app = create_app()

    async def call(body: bytes) -> None:
        headers = [
            (b"host", b"bench"),
            (b"authorization", f"Bearer {bench_notify.TOKEN}".encode()),
            (b"content-type", b"application/fhir+json"),
            (b"content-length", str(len(body)).encode()),
        ]
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/fhir/notify",
            "raw_path": b"/fhir/notify",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"answered {status}")

    async def measure() -> tuple[float, float]:
        async with app.router.lifespan_context(app):
            for body in bodies[:warm]:
                await call(body)
            profiler = cProfile.Profile(time.process_time) if args.cprofile else None
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler:
                profiler.enable()
            for body in bodies[warm:]:
                await call(body)
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
            return time.process_time() - cpu, time.perf_counter() - wall

    import redis

    client = redis.Redis.from_url(args.redis)
    try:
        cpu, wall = asyncio.run(measure())
    finally:
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    n = args.notifications
    print(
        f"{n} notifications of {len(bodies[0]) / 1024:.1f} KB, API from {checkout} "
        f"(commit {bench_notify.git_commit(args.checkout)}): CPU {cpu / n * 1000:.2f} ms per notification, "
        f"wall {wall / n * 1000:.2f} ms; load average {os.getloadavg()[0]:.2f}"
        + (" (cProfile on: inflated)" if args.cprofile else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
