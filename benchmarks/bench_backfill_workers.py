"""Backfill throughput with 1, 2 and 4 worker processes against one Redis (issue 18, "Scale beyond one machine").

    .venv/bin/python benchmarks/bench_backfill_workers.py --notes 60 --workers 1 2 4

For each worker count, a fresh run: the test EHR (tests/ehr, Medplum) emptied, a fresh key prefix and identifier
namespace, N ``fhir-ner worker`` processes (both queues each, the shipped model unless --model, terminology off,
torch threads = cores / N). The workers are warmed first: a backfill of 3 x N warm-up notes (dated 2000) loads
each worker's model. Then ``--notes`` generated notes (dated 2019-2025) are queued by one backfill run (bulk
priority) and worked down. Reported per point: seconds from the start of that run to the last note done,
notes/s and notes/min, the workers' CPU seconds per note over that span (user + system from /proc/PID/stat, so
model loading and warm-up are left out), and the 1-minute load average before and after (other processes share
the CPU). Before a point whose load average is above --max-load the script waits a minute and checks once more
(``waited_for_load``), then runs anyway. Needs Redis on --redis and Linux (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

NOTE = (
    "Paciente de 67 años con fiebre y tos productiva de tres días. Antecedentes de diabetes mellitus tipo 2 e "
    "hipertensión arterial. Se realizó radiografía de tórax que muestra consolidación en lóbulo inferior derecho. "
    "Diagnóstico de neumonía adquirida en la comunidad. No presenta disnea en reposo. Se inicia tratamiento "
    "antibiótico y se programa control en una semana. "
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--notes", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat-text", type=int, default=4, help="note length: the paragraph this many times")
    parser.add_argument("--model", default=None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / N)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait a minute once before a busier point")
    parser.add_argument(
        "--split",
        action="store_true",
        help="the N workers serve the inference queue only, and one more (--queues io, 8 threads) the I/O queue: "
        "CPU per note is then reported for each side (the I/O side is what runs next to a GPU fleet)",
    )
    args = parser.parse_args()

    from ehr.harness import FhirTestServer

    # SIGTERM ends the run like ^C: workers and the test EHR are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with FhirTestServer() as ehr:
        for count in args.workers:
            print(json.dumps(measure(ehr, count, args)), flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_done(
    state: object, documents: list[tuple[str, str]], processes: list[subprocess.Popen[bytes]], logs: list[Path]
) -> float:
    """Block until every note version is done (at most 15 minutes); the time the last one was recorded."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        records = [state.get_status(d).get(v, {}) for d, v in documents]  # type: ignore[attr-defined]
        if all(r.get("status") == "done" for r in records):
            return max(float(r["updated"]) for r in records)
        failed = [r for r in records if r.get("status") in ("failed", "dead", "skipped")]
        if failed:
            raise SystemExit(f"a note did not get done: {failed[0]}")
        for process, log in zip(processes, logs, strict=True):
            if process.poll() is not None:
                raise SystemExit("a worker exited: " + log.read_text()[-2000:])
        time.sleep(0.2)
    raise SystemExit("notes not done after 15 minutes (are the workers on this point's queues?)")


def measure(ehr: object, count: int, args: argparse.Namespace) -> dict[str, object]:
    from core.celery_app import get_celery_app
    from core.deps import get_note_state, reset_dependencies
    from worker.backfill import Run, RunOptions, parse_when

    load_before = os.getloadavg()[0]
    waited = False
    if load_before > args.max_load:
        waited = True
        time.sleep(60)
        load_before = os.getloadavg()[0]

    prefix = f"bench-backfill-{uuid.uuid4().hex[:8]}"
    threads = args.threads or max(1, (os.cpu_count() or 2) // count)
    env = {
        "FHIR_NER_REDIS_URL": args.redis,
        "FHIR_NER_KEY_PREFIX": prefix,
        "FHIR_NER_EHR_BASE_URL": ehr.base_url,  # type: ignore[attr-defined]
        "FHIR_NER_IDENTIFIER_NAMESPACE": f"urn:bench:{prefix}",
        "FHIR_NER_EHR_MAX_TRANSACTION_ENTRIES": "8",
        "FHIR_NER_TERMINOLOGY": "off",
        "FHIR_NER_TORCH_THREADS": str(threads),
        "FHIR_NER_ENVIRONMENT": "test",
    }
    if args.model:
        env["FHIR_NER_MODEL_PATH"] = args.model
    os.environ.update(env)
    reset_dependencies()
    get_celery_app.cache_clear()  # its queue names and broker key prefix are this point's
    ehr.reset()  # type: ignore[attr-defined]
    texts = [{"text": NOTE * args.repeat_text, "language": "es"}]
    plain = {"enteredInError": 0, "superseded": 0, "revised": 0}
    warm = ehr.populate(  # type: ignore[attr-defined]
        3 * count, texts, dateFrom="2000-01-01T00:00:00Z", dateTo="2000-12-31T00:00:00Z", patients=4, **plain
    )
    listing = ehr.populate(args.notes, texts, **plain)  # type: ignore[attr-defined]
    documents = [(d["id"], d["version"]) for d in listing["documents"]]
    logs = [Path(f"/tmp/{prefix}-worker-{i}.log") for i in range(count + (1 if args.split else 0))]
    queues = ["inference"] * count + ["io"] if args.split else ["io,inference"] * count
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "adapter.cli", "worker", "--queues", kinds, "--loglevel", "WARNING"],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        for log, kinds in zip(logs, queues, strict=True)
    ]
    state = get_note_state()
    started = time.monotonic()
    try:
        # Warm-up: every worker loads its model on its first note (prefetch 1, so 3 x N notes reach them all).
        Run(
            RunOptions(
                since=parse_when("2000-01-01"),
                until=parse_when("2001-01-01"),
                rate=10_000.0,
                source="search",
                page_size=500,
                name="warm-up",
            )
        ).execute()
        wait_done(state, [(d["id"], d["version"]) for d in warm["documents"]], processes, logs)
        cpu_before = [cpu_seconds(p.pid) for p in processes]
        ehr.clear_requests_log()  # type: ignore[attr-defined]
        start = time.time()
        Run(
            RunOptions(since=parse_when("2019-01-01"), rate=10_000.0, source="search", page_size=500, name="measured")
        ).execute()
        last = wait_done(state, documents, processes, logs)
        cpu_each = [cpu_seconds(p.pid) - before for p, before in zip(processes, cpu_before, strict=True)]
        cpu = sum(cpu_each)
        requests = ehr.requests_log()  # type: ignore[attr-defined]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    seconds = last - start
    return {
        "workers": count,
        "torch_threads": threads,
        "notes": len(documents),
        "chars_per_note": len(NOTE * args.repeat_text),
        "seconds": round(seconds, 1),
        "notes_per_s": round(len(documents) / seconds, 2),
        "notes_per_min": round(60 * len(documents) / seconds, 1),
        "worker_cpu_s_per_note": round(cpu / len(documents), 3),
        **(
            {
                "split": True,
                "inference_cpu_s_per_note": round(sum(cpu_each[:count]) / len(documents), 3),
                "io_cpu_s_per_note": round(cpu_each[-1] / len(documents), 3),
            }
            if args.split
            else {}
        ),
        # What the EHR answered for the run (its search pages included) and the workers, per note.
        "ehr_requests_per_note": round(len(requests) / len(documents), 2),
        "ehr_writes_per_note": round(sum(1 for r in requests if r["method"] in ("POST", "PUT")) / len(documents), 2),
        "wall_incl_warm_up_s": round(time.monotonic() - started, 1),
        "load1_before": round(load_before, 2),
        "load1_after": round(os.getloadavg()[0], 2),
        "waited_for_load": waited,
    }


if __name__ == "__main__":
    main()
