"""JSON log lines carry the ids passed as extras and nothing else of the note."""

from __future__ import annotations

import json
import logging

from adapter.logging_config import JsonFormatter


def test_json_lines_carry_extras_and_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("fhir_ner.worker", logging.INFO, __file__, 1, "note done", (), None)
    record.document_version = "doc-1/2"
    record.mentions = 4
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "note done" and entry["level"] == "INFO" and entry["logger"] == "fhir_ner.worker"
    assert entry["document_version"] == "doc-1/2" and entry["mentions"] == 4
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "note failed", (), sys.exc_info())
    assert json.loads(formatter.format(failed))["error"] == "ValueError"
