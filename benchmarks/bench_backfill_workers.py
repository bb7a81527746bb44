"""Backfill throughput with 1, 2 and 4 worker processes against one Redis (issue 18, "Scale beyond one machine").

    .venv/bin/python benchmarks/bench_backfill_workers.py --notes 60 --workers 1 2 4

For each worker count: a fresh key prefix and identifier namespace, ``--notes`` generated notes in the test EHR
(tests/ehr, Medplum), one backfill run queues them all at once (bulk priority), then N ``fhir-ner worker``
processes (both queues each, the shipped model unless --model, terminology off) work the queue down. Reported:
wall time from the first worker ready to the last note done, notes/s, and the workers' CPU seconds per note
(user + system of the worker processes, from getrusage after they exit). Needs Redis on --redis.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    args = parser.parse_args()

    from ehr.harness import FhirTestServer

    with FhirTestServer() as ehr:
        for count in args.workers:
            print(json.dumps(measure(ehr, count, args)), flush=True)


def measure(ehr: object, count: int, args: argparse.Namespace) -> dict[str, object]:
    from core.deps import get_note_state, reset_dependencies
    from worker.backfill import Run, RunOptions, parse_when

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
    ehr.reset()  # type: ignore[attr-defined]
    listing = ehr.populate(  # type: ignore[attr-defined]
        args.notes, [{"text": NOTE * args.repeat_text, "language": "es"}], enteredInError=0, superseded=0, revised=0
    )
    documents = [(d["id"], d["version"]) for d in listing["documents"]]
    Run(RunOptions(since=parse_when("2000-01-01"), rate=10_000.0, source="search", page_size=500)).execute()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    logs = [Path(f"/tmp/{prefix}-worker-{i}.log") for i in range(count)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "adapter.cli", "worker", "--loglevel", "WARNING"],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    state = get_note_state()
    started = time.monotonic()
    first_start: float | None = None  # the first note taken by a worker (model loading excluded)
    try:
        while True:
            stages = [state.get_status(d).get(v, {}).get("status") for d, v in documents]
            if first_start is None and any(s != "queued" for s in stages):
                first_start = time.time()
            done = sum(1 for s in stages if s == "done")
            if done == len(documents):
                break
            if any(p.poll() is not None for p in processes):
                raise SystemExit("a worker exited: " + logs[0].read_text()[-2000:])
            time.sleep(0.2)
        records = [state.get_status(d)[v] for d, v in documents]
        last = max(float(r["updated"]) for r in records)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert first_start is not None
    seconds = last - first_start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "workers": count,
        "torch_threads": threads,
        "notes": len(documents),
        "chars_per_note": len(NOTE * args.repeat_text),
        "seconds": round(seconds, 1),
        "notes_per_s": round(len(documents) / seconds, 2),
        "worker_cpu_s_per_note": round(cpu / len(documents), 3),
        "wall_incl_model_load_s": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    main()
