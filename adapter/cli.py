"""The ``fhir-ner`` command. Heavy imports happen inside each verb so ``--help`` stays instant."""

from __future__ import annotations

import sys
from pathlib import Path

import click


class CliError(click.ClickException):
    """One-line error on stderr, exit status 1."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fhir-ner-adapter")
def main() -> None:
    """FHIR clinical NER adapter: DocumentReference notes in, coded FHIR resources out."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--workers", default=1, show_default=True, type=int, help="Uvicorn worker processes.")
def serve(host: str, port: int, workers: int) -> None:
    """Run the API (POST /fhir/notify, /healthz, /readyz, /documents/{id})."""
    import uvicorn

    uvicorn.run("adapter.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info")


@main.command()
@click.option("--concurrency", default=1, show_default=True, type=int, help="Worker processes.")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"]))
@click.option("--loglevel", default="INFO", show_default=True)
def worker(concurrency: int, pool: str, loglevel: str) -> None:
    """Run a Celery worker that tags notes and writes results back to the EHR."""
    from worker.celery_app import get_celery_app, queue_name

    app = get_celery_app()
    app.worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            "-Q",
            queue_name("notes"),
            "--without-gossip",
            "--without-mingle",
        ]
    )


@main.command()
@click.option("--output", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None, help="Tagger checkpoint.")
def demo(output: Path, model_path: Path | None) -> None:
    """Run the main job on embedded defaults: sample notes → API → worker → Bundles in a folder."""
    from worker.demo import DemoError, run_demo

    try:
        run_demo(output, model_path)
    except DemoError as error:
        raise CliError(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
