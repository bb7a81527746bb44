"""``fhir-ner feedback export DIR [--delete]``: the reviewed notes as BRAT training documents (issue 16).

Every reviewer action updates the note's training document in Redis (``review:feedback:{note}``, see
``core/review.py``): its text and the model's mentions minus the rejected ones, with the corrections, plus the
added ones. This writes each as ``<name>.txt`` + ``<name>.ann``, the format ``fhir-ner train --data DIR`` reads
(``worker/nlp/corpus.py``). ``<name>`` is a hash of the note id, never the id itself: a note id may say whose
note it is, and training folders get copied around. ``--delete`` removes each note's document from Redis once its
files are written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import click

from core.cli import CliError


def feedback_name(document_id: str) -> str:
    return "review-" + hashlib.sha256(f"fhir-ner-feedback|{document_id}".encode()).hexdigest()[:20]


def brat_annotations(document: dict[str, Any]) -> str:
    """The ``.ann`` text: one ``T`` line per mention, covered text flattened to one line as BRAT tools do."""
    from worker.nlp.corpus import tsv_safe_text

    text = str(document["text"])
    lines = []
    for number, mention in enumerate(document["mentions"], start=1):
        start, end = int(mention["start"]), int(mention["end"])
        lines.append(f"T{number}\t{mention['label']} {start} {end}\t{tsv_safe_text(text[start:end])}")
    return "".join(line + "\n" for line in lines)


def export_feedback(folder: Path, delete: bool = False) -> int:
    """Write every reviewed note's training document into ``folder``; returns how many."""
    from core.deps import get_review_store

    store = get_review_store()
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for document_id, document in sorted(store.feedback().items()):
        name = feedback_name(document_id)
        # newline="" keeps the text's own line ends: the offsets count every character.
        with (folder / f"{name}.txt").open("w", encoding="utf-8", newline="") as handle:
            handle.write(str(document["text"]))
        with (folder / f"{name}.ann").open("w", encoding="utf-8", newline="") as handle:
            handle.write(brat_annotations(document))
        written += 1
        if delete:
            store.delete_feedback(document_id)
    return written


@click.group()
def feedback() -> None:
    """Reviewed notes as training data: export them for `fhir-ner train --data DIR`."""


@feedback.command("export")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option("--delete", is_flag=True, help="Remove each exported note's training document from Redis.")
def feedback_export(folder: Path, delete: bool) -> None:
    """Write each reviewed note as FOLDER/<hash>.txt + .ann (BRAT)."""
    try:
        count = export_feedback(folder, delete=delete)
    except OSError as error:
        raise CliError(str(error)) from None
    removed = " and removed from Redis" if delete else ""
    click.echo(f"{count} reviewed note(s) written to {folder}{removed}", err=True)


COMMANDS: list[click.Command] = [feedback]
