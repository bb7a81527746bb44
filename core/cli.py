"""What every verb of the ``fhir-ner`` command shares."""

from __future__ import annotations

import click


class CliError(click.ClickException):
    """One-line error on stderr, exit status 1."""
