"""``fhir-ner demo`` runs the whole job in one process, over Redis or, without one, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter.cli import main
from mappings.bundle import validate_r4


@pytest.mark.parametrize("transport", ["redis", "in-process"])
def test_demo_writes_one_valid_bundle_per_sample_note(
    transport: str, app_env: dict[str, str], tiny_tagger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if transport == "in-process":
        monkeypatch.setenv("FHIR_NER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    output = tmp_path / "demo-output"
    result = CliRunner().invoke(main, ["demo", "--output", str(output), "--model", str(tiny_tagger_path)])
    assert result.exit_code == 0, result.output
    expected = "Celery over Redis" if transport == "redis" else "in-process Celery transport"
    assert expected in result.output
    bundles = sorted(output.glob("*.json"))
    assert [b.name for b in bundles] == [
        "demo-en-chest-pain-1.json",
        "demo-es-neumonia-1.json",
        "demo-it-cardiologia-1.json",
    ]
    for path in bundles:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        assert bundle["type"] == "transaction"
        kinds = {entry["resource"]["resourceType"] for entry in bundle["entry"]}
        assert {"Device", "Provenance"} <= kinds
        for entry in bundle["entry"]:
            validate_r4(entry["resource"])
    assert "demo-es-neumonia [es] → done" in result.output
    assert "3 notes in" in result.output


def test_demo_without_a_model_says_so_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--output", str(tmp_path), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.output.startswith("Error:") and "not a tagger checkpoint" in result.output


def test_demo_with_the_shipped_model_codes_spanish_and_italian_and_keeps_history_active(
    app_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: what a newcomer sees first. Past history ("Antecedentes de hipertensión arterial y diabetes
    mellitus tipo 2") stays on the problem list, and notes in Spanish and Italian get ICD-10-CM codes."""
    monkeypatch.setenv("FHIR_NER_REDIS_URL", "redis://127.0.0.1:1/0")  # the in-process transport: no Redis needed
    output = tmp_path / "demo-output"
    result = CliRunner().invoke(main, ["demo", "--output", str(output)])
    assert result.exit_code == 0, result.output

    def conditions(name: str) -> dict[str, tuple[set[str], str]]:
        bundle = json.loads((output / name).read_text(encoding="utf-8"))
        found = {}
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Condition":
                codes = {c["code"] for c in resource["code"].get("coding", []) if c["system"].endswith("icd-10-cm")}
                found[resource["code"]["text"]] = (codes, resource["clinicalStatus"]["coding"][0]["code"])
        return found

    spanish = conditions("demo-es-neumonia-1.json")
    assert spanish["hipertensión arterial"] == ({"I10"}, "active")
    assert spanish["diabetes mellitus tipo 2"] == ({"E11.9"}, "active")
    italian = conditions("demo-it-cardiologia-1.json")
    assert italian["fibrillazione atriale"][0] == {"I48.91"}
    assert italian["insufficienza cardiaca"][0] == {"I50.9"}
