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


@main.command()
@click.option("--input", "input_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--output", required=True, type=click.Path(path_type=Path, dir_okay=False), help="PRED.tsv")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Tagger checkpoint (default: shipped).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="CPU threads for PyTorch.")
def predict(input_dir: Path, output: Path, model: Path | None, batch_size: int, threads: int | None) -> None:
    """Tag every *.txt in --input and write one span TSV."""
    if not input_dir.is_dir():
        raise CliError(f"--input {input_dir}: not a folder")
    from worker.nlp.encoders import EncoderNotFoundError
    from worker.nlp.tagger import CheckpointError
    from worker.predict import load_pipeline, predict_folder

    try:
        pipeline = load_pipeline(model, batch_size, threads)
    except (FileNotFoundError, CheckpointError, EncoderNotFoundError) as error:
        raise CliError(str(error)) from None
    run = predict_folder(input_dir, output, pipeline, batch_size=batch_size)
    rate = run.tokens / run.seconds if run.seconds else 0.0
    click.echo(
        f"{run.documents} notes, {run.spans} spans → {output} ({run.tokens} tokens, {rate:.0f} tokens/s)"
        + (f"; {len(run.failed)} file(s) skipped" if run.failed else ""),
        err=True,
    )


@main.command()
@click.option("--gold", required=True, type=click.Path(path_type=Path, exists=True), help="BRAT folder or span TSV.")
@click.option("--pred", required=True, type=click.Path(path_type=Path, exists=True), help="PRED.tsv")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate(gold: Path, pred: Path, as_json: bool) -> None:
    """Strict and MultiClinNER character-overlap precision/recall/F1, overall and per label."""
    import json

    from worker.nlp.metrics import evaluate_paths, format_report, report_to_json

    try:
        report = evaluate_paths(gold, pred)
    except (ValueError, OSError) as error:
        raise CliError(str(error)) from None
    click.echo(json.dumps(report_to_json(report), indent=2) if as_json else format_report(report))


if __name__ == "__main__":
    sys.exit(main())
