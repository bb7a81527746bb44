"""The worker's verbs of the ``fhir-ner`` command (worker, demo, predict, evaluate, extract, train, dlq, feedback).

They reach the command through the ``fhir_ner.commands`` entry point (pyproject.toml), so the API's own
command module never imports the worker. Heavy imports happen inside each verb so ``--help`` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

import click

from core.cli import CliError
from worker.backfill_cli import COMMANDS as BULK_COMMANDS
from worker.coding import COMMANDS as CODING_COMMANDS
from worker.feedback_cli import COMMANDS as FEEDBACK_COMMANDS

logger = logging.getLogger("fhir_ner.worker")


def set_thread_wait(policy: str, environ: MutableMapping[str, str], torch_loaded: bool | None = None) -> str:
    """``OMP_WAIT_POLICY`` for this process, from ``FHIR_NER_THREAD_WAIT`` unless the environment already names one;
    returns the policy in force. OpenMP reads it once, when PyTorch first loads, so it must be set before that: a
    worker that has already imported torch keeps the policy it started with (said in the log)."""
    if "OMP_WAIT_POLICY" in environ:
        return environ["OMP_WAIT_POLICY"].lower()
    if "torch" in sys.modules if torch_loaded is None else torch_loaded:
        logger.warning("thread wait policy %s not applied: PyTorch was loaded before the worker started", policy)
        return "unchanged"
    environ["OMP_WAIT_POLICY"] = policy.upper()
    return policy


@click.command()
@click.option(
    "--queues",
    default="io,inference",
    show_default=True,
    help="Queues to serve: io (reading notes, writing back), inference (the tagger), or both.",
)
@click.option(
    "--pool",
    default=None,
    type=click.Choice(["solo", "threads", "prefork"]),
    help="Default: threads for io alone, else solo (one model per process; run more processes to scale).",
)
@click.option("--concurrency", default=None, type=int, help="Threads or processes (default: 8 for io alone, else 1).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str, pool: str | None, concurrency: int | None, loglevel: str) -> None:
    """Run a Celery worker: the I/O queue, the inference queue, or both (one process, for small setups)."""
    from celery.signals import setup_logging

    from core.celery_app import INFERENCE_QUEUE, QUEUES, get_celery_app, queue_name
    from core.logging_config import configure_logging
    from worker.runtime import inference_max_notes

    kinds = [kind.strip() for kind in queues.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(QUEUES))
    if not kinds or unknown:
        raise CliError(f"--queues takes io, inference or both (got {queues!r})")
    from core.settings import get_settings

    waiting = set_thread_wait(get_settings().thread_wait, os.environ)
    serves_model = INFERENCE_QUEUE in kinds
    pool = pool or ("solo" if serves_model else "threads")
    concurrency = concurrency or (1 if serves_model else 8)
    # The inference worker holds one batch of messages (unacknowledged until tagged) and no more.
    prefetch = inference_max_notes() if serves_model else 1
    # Our JSON handler instead of Celery's own log setup (connecting to the signal tells Celery to skip it).
    setup_logging.connect(lambda **_: configure_logging(loglevel), weak=False)
    configure_logging(loglevel)
    logger.info("OpenMP threads wait: %s (FHIR_NER_THREAD_WAIT or OMP_WAIT_POLICY)", waiting)
    if "io" in kinds:
        from celery.signals import worker_ready, worker_shutdown

        from worker.reconcile import LostMessageWatch

        watch = LostMessageWatch()
        worker_ready.connect(lambda **_: watch.start(), weak=False)
        worker_shutdown.connect(lambda **_: watch.stop(), weak=False)
    app = get_celery_app()
    app.worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            f"--prefetch-multiplier={prefetch}",
            "-Q",
            ",".join(queue_name(kind) for kind in kinds),
            "--without-gossip",
            "--without-mingle",
        ]
    )


@click.command()
@click.option("--output", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None, help="Tagger checkpoint.")
def demo(output: Path, model_path: Path | None) -> None:
    """Run the main job on embedded defaults: sample notes → API → worker → Bundles in a folder."""
    from worker.demo import DemoError, run_demo

    try:
        run_demo(output, model_path)
    except DemoError as error:
        raise CliError(str(error)) from None


@click.command()
@click.option("--input", "input_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--output", required=True, type=click.Path(path_type=Path, dir_okay=False), help="PRED.tsv")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Tagger checkpoint (default: shipped).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="CPU threads for PyTorch.")
@click.option(
    "--precision",
    default=None,
    type=click.Choice(["auto", "fp32", "int8", "bf16"]),
    help="auto: bf16 on a GPU; on a CPU int8 when the checkpoint validated it, else bf16 on CPUs with AMX or "
    "AVX512-BF16 when the checkpoint validated it, else fp32 [default: FHIR_NER_PRECISION or auto].",
)
def predict(
    input_dir: Path, output: Path, model: Path | None, batch_size: int, threads: int | None, precision: str | None
) -> None:
    """Tag every *.txt in --input and write one span TSV."""
    if not input_dir.is_dir():
        raise CliError(f"--input {input_dir}: not a folder")
    from core.settings import get_settings
    from worker.nlp.encoders import EncoderNotFoundError
    from worker.nlp.tagger import CheckpointError
    from worker.predict import load_pipeline, predict_folder

    settings = get_settings()
    try:
        pipeline = load_pipeline(model, batch_size, threads, precision or settings.precision, settings.cache_dir)
    except (FileNotFoundError, CheckpointError, EncoderNotFoundError, ValueError, RuntimeError) as error:
        raise CliError(str(error)) from None
    from worker.runtime import get_profile
    from worker.terminology import code_for, get_terminology

    profile = get_profile()
    run = predict_folder(
        input_dir, output, pipeline, batch_size=batch_size, code_for=code_for(profile, get_terminology(profile))
    )
    rate = run.tokens / run.seconds if run.seconds else 0.0
    click.echo(
        f"{run.documents} notes, {run.spans} spans → {output} ({run.tokens} tokens, {rate:.0f} tokens/s, "
        f"{pipeline.precision})" + (f"; {len(run.failed)} file(s) skipped" if run.failed else ""),
        err=True,
    )


@click.command()
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


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--lang", default=None, help="Language of the note (BCP 47, e.g. es).")
@click.option("--profile", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Mapping profile YAML.")
@click.option("--subject", default="Patient/example", show_default=True, help="The patient the note is about.")
@click.option("--document-id", default=None, help="DocumentReference id (default: from the file name).")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Tagger checkpoint (default: shipped).")
def extract(
    file: Path, lang: str | None, profile: Path | None, subject: str, document_id: str | None, model: Path | None
) -> None:
    """Print the transaction Bundle that the note in FILE would produce, without an EHR."""
    import json
    import re
    from datetime import UTC, datetime

    from core.settings import get_settings
    from mappings.bundle import MappingValidationError, build_transaction
    from mappings.context import DocumentContext
    from mappings.profile import ProfileError, load_profile
    from mappings.terminology import TerminologyError

    if not re.fullmatch(r"Patient/[A-Za-z0-9\-.]{1,64}", subject):
        raise CliError(f"--subject {subject!r}: expected Patient/ID")
    note_id = document_id or re.sub(r"[^A-Za-z0-9\-.]+", "-", file.stem).strip("-.")[:64] or "note"
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", note_id):
        raise CliError(f"--document-id {note_id!r}: not a FHIR id")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"{file}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise CliError(f"{file}: not valid UTF-8") from None
    settings = get_settings()
    try:
        mapping_profile = load_profile(profile or settings.mapping_profile)
        from worker.terminology import terminology_for

        terminology = terminology_for(
            mapping_profile,
            settings.terminology,
            settings.terminology_cache_dir,
            settings.terminology_encoder,
            settings.cache_dir,
        )
    except (ProfileError, TerminologyError) as error:
        raise CliError(str(error)) from None
    from worker.nlp.encoders import EncoderNotFoundError
    from worker.nlp.tagger import CheckpointError
    from worker.predict import load_pipeline
    from worker.tasks import tag_note

    checkpoint = model or (Path(settings.model_path) if settings.model_path else None)
    try:
        pipeline = load_pipeline(
            checkpoint, settings.inference_batch_size, settings.torch_threads, settings.precision, settings.cache_dir
        )
    except (FileNotFoundError, CheckpointError, EncoderNotFoundError) as error:
        raise CliError(str(error)) from None
    mentions, model_info = tag_note(text, pipeline)
    context = DocumentContext(document_id=note_id, version_id="1", subject=subject, language=lang)
    recorded = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        bundle = build_transaction(
            context,
            mentions,
            mapping_profile,
            model_info,
            settings.identifier_namespace,
            recorded,
            terminology=terminology,
        )
    except MappingValidationError as error:
        raise CliError(str(error)) from None
    click.echo(json.dumps(bundle, indent=2, ensure_ascii=False))


@click.command()
@click.option(
    "--data",
    "data_dirs",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="BRAT or MultiClinNER TSV+text folder; repeat to mix corpora and languages.",
)
@click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Checkpoint folder.")
@click.option("--encoder", default="multilingual-e5-small", show_default=True, help="Hugging Face id or local path.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0.0, 0.9))
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 1000))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--frozen-layers",
    default=None,
    type=click.IntRange(0, 100),
    help="Encoder layers kept frozen and cached (default: 10 on CPU, 0 on GPU).",
)
@click.option(
    "--init-from",
    default=None,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Warm start from a tagger checkpoint on the same encoder (e.g. worker/models/default).",
)
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="CPU threads for PyTorch.")
@click.option("--curve", is_flag=True, help="Also the data-efficiency curve (10/25/50/100% of notes): CSV + PNG.")
def train(
    data_dirs: tuple[Path, ...],
    output: Path,
    encoder: str,
    val_fraction: float,
    epochs: int,
    seed: int,
    frozen_layers: int | None,
    init_from: Path | None,
    threads: int | None,
    curve: bool,
) -> None:
    """Fine-tune the tagger; keeps the best epoch, stops early, resumes when rerun."""
    from worker.nlp.encoders import EncoderNotFoundError
    from worker.nlp.training import train as run_training

    try:
        result = run_training(
            list(data_dirs),
            output,
            encoder=encoder,
            val_fraction=val_fraction,
            epochs=epochs,
            seed=seed,
            curve=curve,
            frozen_layers=frozen_layers,
            init_from=init_from,
            threads=threads,
        )
    except (EncoderNotFoundError, ValueError, OSError) as error:
        raise CliError(str(error)) from None
    click.echo(
        f"best epoch {result.best_epoch}: overlap F1 {result.overlap_f1:.3f}, strict F1 {result.strict_f1:.3f} "
        f"on {result.n_val_docs} validation notes → {output}",
        err=True,
    )


@click.group()
def dlq() -> None:
    """Jobs that exhausted their retries: list, show, retry."""


@dlq.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000))
def dlq_list(limit: int) -> None:
    """One line per dead-lettered job: id, when, attempts, last error."""
    import datetime

    from worker.tasks import dead_letter_store

    letters = dead_letter_store().list(limit)
    for letter in letters:
        when = datetime.datetime.fromtimestamp(letter.failed_at, datetime.UTC).isoformat(timespec="seconds")
        click.echo(f"{letter.id}\t{when}\t{letter.attempts}\t{letter.error}")
    click.echo(f"{len(letters)} dead-lettered job(s)", err=True)


@dlq.command("show")
@click.argument("letter_id")
def dlq_show(letter_id: str) -> None:
    """The whole record of one dead-lettered job, as JSON."""
    import dataclasses
    import json

    from worker.tasks import dead_letter_store

    letter = dead_letter_store().get(letter_id)
    if letter is None:
        raise CliError(f"no dead-lettered job {letter_id!r}")
    click.echo(json.dumps(dataclasses.asdict(letter), indent=2))


@dlq.command("retry")
@click.argument("letter_id", required=False)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead-lettered job.")
def dlq_retry(letter_id: str | None, retry_all: bool) -> None:
    """Send a dead-lettered job (or all of them) back to its queue."""
    from worker.review_tasks import requeue_letter
    from worker.tasks import dead_letter_store

    if bool(letter_id) == retry_all:
        raise CliError("give one job id, or --all")
    store = dead_letter_store()
    letters = store.list(1_000_000) if retry_all else [store.get(letter_id or "")]
    if letters == [None]:
        raise CliError(f"no dead-lettered job {letter_id!r}")
    for letter in letters:
        if letter is None:
            continue
        requeue_letter(letter, "retried from dlq")
        click.echo(f"requeued {letter.id}")


#: What the ``fhir_ner.commands`` entry point adds to ``fhir-ner``.
COMMANDS: list[click.Command] = [
    worker,
    demo,
    predict,
    evaluate,
    extract,
    train,
    dlq,
    *CODING_COMMANDS,
    *BULK_COMMANDS,
    *FEEDBACK_COMMANDS,
]
