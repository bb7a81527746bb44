"""``fhir-ner backfill`` and ``fhir-ner reprocess`` (registered in ``worker/cli.py``'s COMMANDS); see
:mod:`worker.backfill` for how they find and queue notes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from core.cli import CliError

if TYPE_CHECKING:
    from worker.backfill import RunOptions


def _bulk_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``backfill`` and ``reprocess``."""
    options = [
        click.option("--since", default=None, help="Notes dated from DATE (YYYY-MM-DD or ISO date-time)."),
        click.option("--until", default=None, help="Notes dated before DATE."),
        click.option("--rate", default="10/s", show_default=True, help="Notes queued per second at most (N/s)."),
        click.option("--dry-run", is_flag=True, help="Count what the run would queue; queue nothing."),
        click.option(
            "--source",
            type=click.Choice(["auto", "export", "search"]),
            default="auto",
            show_default=True,
            help="auto: Bulk Data $export when the EHR has it, else search.",
        ),
        click.option("--page-size", default=100, show_default=True, type=click.IntRange(1, 1000)),
        click.option("--name", default=None, help="Name of the run (default: from its parameters)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _drive(options: RunOptions, quiet: bool) -> None:
    from core.logging_config import configure_logging
    from worker.backfill import BackfillError, Run, terminal_progress
    from worker.ehr import EhrError

    configure_logging("WARNING")
    try:
        record = Run(options, show=None if quiet else terminal_progress).execute()
    except (BackfillError, EhrError) as error:
        raise CliError(str(error)) from None
    except KeyboardInterrupt:
        raise CliError("interrupted; run the same command again to resume") from None
    verb = "to queue" if options.dry_run else "queued"
    summary = (
        f"{record['name']}: {record['state']}, {record['scanned']} notes scanned ({record.get('source')}), "
        f"{record['queued']} {verb}, {record['duplicates']} already processed or on their way, "
        f"{record['skipped']} skipped"
    )
    if options.kind == "reprocess":
        summary += f", {record['up_to_date']} up to date"
    click.echo(summary)


@click.command()
@_bulk_options
@click.option("--patient", "patients", multiple=True, help="Only this patient's notes (repeat for several).")
@click.option("--group", default=None, help="Group-level $export of this Group's members.")
def backfill(
    since: str | None,
    until: str | None,
    rate: str,
    dry_run: bool,
    source: str,
    page_size: int,
    name: str | None,
    quiet: bool,
    patients: tuple[str, ...],
    group: str | None,
) -> None:
    """Queue existing notes into the pipeline, behind live ones: rate-limited, resumable, deduplicated."""
    from worker.backfill import BackfillError, RunOptions, parse_rate, parse_when

    try:
        options = RunOptions(
            kind="backfill",
            since=parse_when(since),
            until=parse_when(until),
            patients=tuple(patients),
            group=group,
            rate=parse_rate(rate),
            dry_run=dry_run,
            source=source,  # type: ignore[arg-type]
            page_size=page_size,
            name=name,
        )
    except BackfillError as error:
        raise CliError(str(error)) from None
    _drive(options, quiet)


@click.command()
@_bulk_options
@click.option(
    "--older-than-model",
    "model_version",
    default=None,
    help="The model revision that is current (default: the configured checkpoint's); notes whose resources "
    "another revision or another mapping profile wrote are read again.",
)
def reprocess(
    since: str | None,
    until: str | None,
    rate: str,
    dry_run: bool,
    source: str,
    page_size: int,
    name: str | None,
    quiet: bool,
    model_version: str | None,
) -> None:
    """Re-read notes whose resources an older model or mapping profile wrote; keep what is derived again."""
    from worker.backfill import (
        BackfillError,
        RunOptions,
        configured_model_revision,
        parse_rate,
        parse_when,
        profile_fingerprint,
    )

    try:
        revision = model_version or configured_model_revision()
        options = RunOptions(
            kind="reprocess",
            since=parse_when(since),
            until=parse_when(until),
            rate=parse_rate(rate),
            dry_run=dry_run,
            source=source,  # type: ignore[arg-type]
            page_size=page_size,
            name=name,
            fingerprint=f"{revision}|{profile_fingerprint()}",
        )
    except BackfillError as error:
        raise CliError(str(error)) from None
    _drive(options, quiet)


COMMANDS: list[click.Command] = [backfill, reprocess]
