"""JSON log lines carry the ids passed as extras and nothing else of the note."""

from __future__ import annotations

import io
import json
import logging
import re

from fastapi.testclient import TestClient
from receiver_helpers import AUTH, backport, document, post

from core.logging_config import JsonFormatter

pytest_plugins = ["receiver_fixtures"]


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


def test_every_log_line_of_a_request_carries_its_request_id(api: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fhir_ner")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        given = post(api, backport(document("a"), 1), headers={**AUTH, "X-Request-ID": "ehr-req-42"})
        fresh = post(api, backport(document("b"), 2), headers={**AUTH, "X-Request-ID": "not a token {}"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    assert given.status_code == 200 and given.headers["X-Request-ID"] == "ehr-req-42"
    assert fresh.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", fresh.headers["X-Request-ID"])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    accepted = [line for line in lines if line["message"] == "notification accepted"]
    assert [line["request_id"] for line in accepted] == ["ehr-req-42", fresh.headers["X-Request-ID"]]
    assert accepted[0]["document_versions"] == ["a/1"]
    assert "request_id" not in json.loads(JsonFormatter().format(logging.makeLogRecord({"msg": "outside"})))
