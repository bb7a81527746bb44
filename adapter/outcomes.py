"""FHIR OperationOutcome responses: every error the API returns is one of these."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

FHIR_JSON = "application/fhir+json"


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def outcome_response(
    status_code: int, code: str, diagnostics: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    severity = "information" if status_code < 400 else "error"
    return JSONResponse(
        operation_outcome(code, diagnostics, severity),
        status_code=status_code,
        media_type=FHIR_JSON,
        headers=headers,
    )
