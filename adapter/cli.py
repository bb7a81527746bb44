"""The ``fhir-ner`` command: the API's verbs here, the worker's through the ``fhir_ner.commands`` entry point.

The worker registers its verbs (``worker/cli.py``) under that entry-point group in pyproject.toml, so this
module imports no worker code, and an installation without the worker still serves the API. Heavy imports
happen inside each verb so ``--help`` stays instant.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import click

from core.cli import CliError

COMMANDS_GROUP = "fhir_ner.commands"


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

    from core.logging_config import configure_logging

    configure_logging("INFO")
    uvicorn.run(
        "adapter.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info", log_config=None
    )


@main.command()
@click.option("--ehr", "ehr_url", required=True, help="FHIR base URL of the EHR.")
@click.option("--endpoint", required=True, help="Where the EHR sends notifications: this API's /fhir/notify URL.")
@click.option("--token", required=True, help="Bearer token the EHR will send; one of FHIR_NER_SUBSCRIPTION_TOKENS.")
@click.option("--fhir-version", default="r4", show_default=True, type=click.Choice(["r4", "r4b", "r5"]))
@click.option(
    "--payload", default="id-only", show_default=True, type=click.Choice(["full-resource", "id-only", "empty"])
)
@click.option("--heartbeat", default=300, show_default=True, type=click.IntRange(0), help="Heartbeat period (s).")
@click.option("--topic", default=None, help="SubscriptionTopic canonical (default: IHE DSUBm DocumentReference).")
@click.option("--filter", "filter_criteria", default=None, help="e.g. 'DocumentReference?category=...'.")
@click.option("--wait", default=15.0, show_default=True, type=float, help="Seconds to wait for the handshake.")
def subscribe(
    ehr_url: str,
    endpoint: str,
    token: str,
    fhir_version: str,
    payload: str,
    heartbeat: int,
    topic: str | None,
    filter_criteria: str | None,
    wait: float,
) -> None:
    """Create the Subscription on the EHR that notifies this adapter about notes, and follow its handshake."""
    from adapter.subscribe import SubscribeError, run_subscribe

    try:
        message = run_subscribe(
            ehr_url,
            endpoint,
            token,
            fhir_version,
            payload,
            heartbeat,
            topic,
            filter_criteria,
            wait,
            warn=lambda text: click.echo(text, err=True),
        )
    except SubscribeError as error:
        raise CliError(str(error)) from None
    click.echo(message)


def add_plugin_commands(group: click.Group) -> None:
    """Add the verbs other parts of the adapter register under ``fhir_ner.commands`` (the worker's)."""
    for entry in entry_points(group=COMMANDS_GROUP):
        for command in entry.load():
            group.add_command(command)


add_plugin_commands(main)

if __name__ == "__main__":
    sys.exit(main())
