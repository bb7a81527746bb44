"""End to end: notes per minute and latency from notification to resources in the EHR.

Real parts on this machine: the Medplum-based test EHR (``tests/ehr``), Redis, the API (in process), an I/O
worker pool (``fhir-ner worker --queues io``, 8 threads) and an inference worker (``--queues inference``)
running the shipped default model. Notes are cut from ``../shared/data/es`` to about ``--chars``
characters, created in the EHR as DocumentReferences, and announced with R4 backport notifications,
either all at once (``--rate 0``: throughput) or at a steady rate (latency below saturation). A note's
latency runs from its notification to the moment the worker recorded it done, i.e. after the EHR
answered the write-back transaction.

    .venv/bin/python benchmarks/bench_e2e.py --notes 40 --chars 2000 --rate 0
    .venv/bin/python benchmarks/bench_e2e.py --notes 20 --chars 7000 --rate 0.2

It also reports the two workers' CPU seconds per note (``worker_cpu_s_per_note``, their processes and pool
children from /proc): run once with ``FHIR_NER_TERMINOLOGY=off`` and once without to see what coding adds to a
note's CPU in the deployed loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
DATA = REPO.parent / "shared" / "data" / "es"
TOKEN = "test-token"  # the token the tests' notification helper sends


def notes_of(count: int, chars: int) -> list[str]:
    """``count`` notes of about ``chars`` characters: whole notes cut at a sentence end, or joined."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(DATA.glob("*/*.txt"))]
    if not texts:
        sys.exit(f"no notes under {DATA}")
    notes: list[str] = []
    pool = iter(texts * 4)
    while len(notes) < count:
        text = next(pool)
        while len(text) < chars:
            text += "\n\n" + next(pool)
        cut = text.rfind(". ", 0, chars)
        notes.append(text[: cut + 1 if cut > chars // 2 else chars])
    return notes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notes", type=int, default=40)
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0.0, help="notifications per second (0: all at once)")
    parser.add_argument("--redis", default=os.environ.get("FHIR_NER_TEST_REDIS_URL", "redis://127.0.0.1:6379/14"))
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    # Read before importing the tests' helpers: conftest installs tests/repo_guard.py, which hides ../shared.
    texts = notes_of(args.notes + 1, args.chars)

    import redis
    from bench_notify import tree_cpu_seconds  # the one /proc reader (benchmarks/ is this script's folder)
    from conftest import WorkerProcess
    from ehr.harness import FhirTestServer
    from fastapi.testclient import TestClient
    from faults import note_document, notify
    from test_end_to_end import create

    prefix = f"bench-e2e-{uuid.uuid4().hex[:8]}"
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / prefix
    workdir.mkdir(parents=True)
    with FhirTestServer() as ehr:
        env = {
            "FHIR_NER_ENVIRONMENT": "test",
            "FHIR_NER_REDIS_URL": args.redis,
            "FHIR_NER_KEY_PREFIX": prefix,
            "FHIR_NER_SUBSCRIPTION_TOKENS": TOKEN,
            "FHIR_NER_EHR_BASE_URL": ehr.base_url,
            "FHIR_NER_EHR_MAX_TRANSACTION_ENTRIES": "8",  # the test EHR is Medplum
        }
        os.environ.update(env)
        from adapter.app import create_app
        from core.deps import get_note_state, reset_dependencies

        reset_dependencies()
        patient = create(ehr, {"resourceType": "Patient", "name": [{"family": "Banco"}]})
        documents = [note_document(ehr, patient["id"], text) for text in texts]
        io_worker = WorkerProcess(env, workdir / "io.log", queues="io").start()
        model_worker = WorkerProcess(env, workdir / "inference.log", queues="inference").start()
        state = get_note_state()
        try:
            with TestClient(create_app()) as client:

                def done_at(document_id: str) -> float | None:
                    record = state.get_status(document_id).get("1", {})
                    if record.get("status") in ("dead-lettered", "skipped"):
                        sys.exit(f"note {document_id} {record['status']}: {record.get('reason')}")
                    return float(record["updated"]) if record.get("status") == "done" else None

                # Warm-up: the first note loads the model in the inference worker; it is not counted.
                warm = documents.pop(0)
                assert notify(client, warm, 1) == 200
                while done_at(warm["id"]) is None:
                    time.sleep(0.2)
                sent: dict[str, float] = {}
                workers = {
                    name: w.process.pid
                    for name, w in (("io", io_worker), ("inference", model_worker))
                    if w.process is not None
                }
                cpu_before = {name: tree_cpu_seconds(pid) for name, pid in workers.items()}
                started = time.time()
                for number, document in enumerate(documents, start=2):
                    if args.rate > 0:
                        time.sleep(max(0.0, started + (number - 2) / args.rate - time.time()))
                    sent[document["id"]] = time.time()
                    assert notify(client, document, number) == 200
                finished: dict[str, float] = {}
                deadline = time.monotonic() + args.timeout
                while len(finished) < len(documents) and time.monotonic() < deadline:
                    for document_id in sent.keys() - finished.keys():
                        at = done_at(document_id)
                        if at is not None:
                            finished[document_id] = at
                    time.sleep(0.2)
                cpu_used = {name: tree_cpu_seconds(pid) - cpu_before[name] for name, pid in workers.items()}
        finally:
            io_worker.stop()
            model_worker.stop()
            client_redis = redis.Redis.from_url(args.redis)
            keys = list(client_redis.scan_iter(f"{prefix}*", count=1000))
            if keys:
                client_redis.delete(*keys)
    if len(finished) < len(documents):
        sys.exit(f"only {len(finished)} of {len(documents)} notes finished within {args.timeout} s")
    latencies = [finished[d] - sent[d] for d in sent]
    span = max(finished.values()) - min(sent.values())
    result: dict[str, Any] = {
        "notes": len(documents),
        "mean_chars": round(statistics.mean(len(t) for t in texts[1:])),
        "rate": args.rate or "all at once",
        "notes_per_minute": round(len(documents) / span * 60, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 2),
        "latency_p95_s": round(percentile(latencies, 0.95), 2),
        "latency_max_s": round(max(latencies), 2),
        # The two workers' CPU (fetching, tagging, coding, mapping, writing back), less the idle polling of the
        # last notes' wait: FHIR_NER_TERMINOLOGY=off against the default gives coding's share of a note's CPU.
        "worker_cpu_s_per_note": round(sum(cpu_used.values()) / len(documents), 3),
        **{f"{name}_worker_cpu_s_per_note": round(used / len(documents), 3) for name, used in cpu_used.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
