"""``fhir-ner demo``: the main job on embedded defaults, in one process.

Sample notes are sent as R4 backport notifications to the real API (in-process), queued through
Celery (over Redis when one answers, else an in-process transport), tagged by a worker thread,
mapped, and written as transaction Bundles into a folder instead of an EHR.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import click

from worker.runtime import default_model_path

DEMO_TOKEN_ENV = "FHIR_NER_SUBSCRIPTION_TOKENS"
#: The API the demo sends its notes to, named as ``fhir-ner serve`` names it (the worker imports no API code).
API_APP = "adapter.app:create_app"


class DemoError(RuntimeError):
    """The demo could not run; the message says why in one line."""


def sample_notes() -> list[tuple[str, str, str]]:
    """(document id, language, text) for each note shipped with the demo."""
    notes = []
    folder = resources.files("worker").joinpath("demo_notes")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".txt"):
            stem = entry.name[: -len(".txt")]
            notes.append((f"demo-{stem}", stem.split("-")[0], entry.read_text(encoding="utf-8")))
    return notes


def notification_for(
    document_id: str, language: str, text: str, event_number: int, subscription: str = "Subscription/demo"
) -> dict[str, Any]:
    """An R4 Subscriptions Backport full-resource notification carrying one note."""
    document = {
        "resourceType": "DocumentReference",
        "id": document_id,
        "meta": {"versionId": "1"},
        "status": "current",
        "docStatus": "final",
        "subject": {"reference": "Patient/demo-patient"},
        "date": "2026-11-20T09:30:00Z",
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "language": language,
                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                }
            }
        ],
    }
    status = {
        "resourceType": "Parameters",
        "meta": {
            "profile": [
                "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
            ]
        },
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": subscription}},
            {"name": "topic", "valueCanonical": "http://example.org/SubscriptionTopic/clinical-note"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(event_number)},
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(event_number)},
                    {"name": "focus", "valueReference": {"reference": f"DocumentReference/{document_id}"}},
                ],
            },
        ],
    }
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status},
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": document,
                "request": {"method": "PUT", "url": f"DocumentReference/{document_id}"},
                "response": {"status": "200"},
            },
        ],
    }


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def run_demo(output: Path, model_path: Path | None = None) -> list[dict[str, Any]]:
    from core.celery_app import get_celery_app
    from core.deps import reset_dependencies
    from worker.runtime import reset_pipeline

    model = model_path or default_model_path()
    if model is None:
        raise DemoError("no tagger checkpoint: pass --model PATH (the default model is not installed)")
    if not (Path(model) / "tagger_config.json").is_file():
        raise DemoError(f"{model} is not a tagger checkpoint (no tagger_config.json)")
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    demo_env = {
        DEMO_TOKEN_ENV: token,
        "FHIR_NER_MODEL_PATH": str(model),
        "FHIR_NER_WRITEBACK_DIR": str(output),
        "FHIR_NER_KEY_PREFIX": f"fhir-ner-demo-{token[:8]}",
    }
    saved = {key: os.environ.get(key) for key in demo_env}
    os.environ.update(demo_env)
    try:
        return _run(output, Path(model), token)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_dependencies()
        reset_pipeline()
        get_celery_app.cache_clear()


@contextlib.contextmanager
def _serve_api() -> Iterator[str]:
    """The API (``fhir-ner serve``'s app, by its import string) on a free loopback port, in a thread of this
    process, so it shares the demo's Redis client; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(API_APP, factory=True, host="127.0.0.1", port=0, log_level="warning", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="demo-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise DemoError("the API did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _run(output: Path, model: Path, token: str) -> list[dict[str, Any]]:
    import httpx
    from celery.contrib.testing.worker import start_worker

    import worker.tasks  # noqa: F401  (registers the task on the app)
    from core.celery_app import QUEUES, get_celery_app, queue_name
    from core.deps import get_note_state, reset_dependencies, use_redis_client
    from core.settings import get_settings
    from worker.runtime import reset_pipeline

    reset_dependencies()
    reset_pipeline()
    get_celery_app.cache_clear()
    settings = get_settings()
    app = get_celery_app()
    if _redis_answers(settings.redis_url):
        transport = f"Celery over Redis ({settings.redis_url})"
    else:
        import fakeredis

        use_redis_client(fakeredis.FakeRedis())
        app.conf.broker_url = "memory://"
        app.conf.result_backend = "cache+memory://"
        transport = "in-process Celery transport (no Redis answered)"
    click.echo(f"fhir-ner demo: {transport}; model {model}; Bundles → {output}", err=True)

    notes = sample_notes()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    started = time.perf_counter()
    try:
        with (
            start_worker(
                app,
                pool="solo",
                perform_ping_check=False,
                loglevel="WARNING",
                queues=[queue_name(kind) for kind in QUEUES],
                shutdown_timeout=30,
            ),
            _serve_api() as api_url,
            httpx.Client(base_url=api_url, timeout=30) as client,
        ):
            for number, (document_id, language, text) in enumerate(notes, start=1):
                response = client.post(
                    "/fhir/notify",
                    content=json.dumps(notification_for(document_id, language, text, number)),
                    headers=headers,
                )
                if response.status_code != 200:
                    raise DemoError(f"the API refused {document_id}: HTTP {response.status_code}")
            state = get_note_state()
            deadline = time.monotonic() + 600
            pending = {document_id for document_id, _, _ in notes}
            while pending and time.monotonic() < deadline:
                for document_id in list(pending):
                    status = state.get_status(document_id).get("1", {})
                    if status.get("status") in ("done", "failed", "skipped"):
                        pending.discard(document_id)
                time.sleep(0.2)
            if pending:
                raise DemoError(f"timed out waiting for {', '.join(sorted(pending))}")
            summaries = [
                {"document": document_id, "language": language, **state.get_status(document_id)["1"]}
                for document_id, language, _ in notes
            ]
    finally:
        use_redis_client(None)
    _print_summary(notes, summaries, output, time.perf_counter() - started)
    return summaries


def _print_summary(
    notes: list[tuple[str, str, str]], summaries: list[dict[str, Any]], output: Path, seconds: float
) -> None:
    for (document_id, language, _), summary in zip(notes, summaries, strict=True):
        click.echo(f"\n{document_id} [{language}] → {summary['status']}")
        if summary["status"] != "done":
            click.echo(f"  reason: {summary.get('reason')}")
            continue
        bundle_path = output / f"{document_id}-1.json"
        if not bundle_path.exists():
            click.echo("  no mentions found")
            continue
        bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
        for entry in bundle["entry"]:
            resource = entry["resource"]
            kind = resource["resourceType"]
            if kind in ("Device", "Provenance"):
                continue
            concept = resource.get("code") or resource.get("condition", [{}])[0].get("code", {})
            codes = ", ".join(f"{c['system'].rsplit('/', 1)[-1]} {c['code']}" for c in concept.get("coding", []))
            click.echo(f"  {kind:<20} {concept.get('text', '')!r:<40} {_assertion_of(resource):<12} {codes}")
    click.echo(f"\n{len(notes)} notes in {seconds:.1f} s; transaction Bundles in {output}/")


def _assertion_of(resource: dict[str, Any]) -> str:
    kind = resource["resourceType"]
    if kind == "Condition":
        return str(resource["verificationStatus"]["coding"][0]["code"])
    if kind == "Observation":
        return "present" if resource.get("valueBoolean") else "negated"
    if kind == "Procedure":
        return str(resource.get("status"))
    return "family"
