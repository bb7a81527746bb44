"""The ``fhir-ner`` command line: verbs listed, predict → TSV, evaluate → scores, one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES_DIR
from ehr.harness import FhirTestServer
from tiny_models import SAMPLE_NOTES, char_spans

from adapter.cli import main

NOTES = FIXTURES_DIR / "notes/es"  # six annotated Spanish notes


def test_help_lists_every_verb() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for verb in ("serve", "worker", "demo", "predict", "evaluate"):
        assert verb in result.output


def write_brat(folder: Path) -> None:
    folder.mkdir()
    for index, text in enumerate(SAMPLE_NOTES):
        (folder / f"note{index}.txt").write_text(text, encoding="utf-8")
        lines = [f"T{n}\t{label} {s} {e}\t{text[s:e]}" for n, (label, s, e) in enumerate(char_spans(index), 1)]
        (folder / f"note{index}.ann").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_predict_then_evaluate_on_a_brat_folder(tiny_tagger_path: Path, tmp_path: Path) -> None:
    gold = tmp_path / "gold"
    write_brat(gold)
    notes = tmp_path / "notes"
    shutil.copytree(gold, notes)
    (notes / "unreadable.txt").write_bytes(b"\xff\xfe\x00bad")
    pred = tmp_path / "out" / "pred.tsv"
    runner = CliRunner()
    result = runner.invoke(
        main, ["predict", "--input", str(notes), "--output", str(pred), "--model", str(tiny_tagger_path)]
    )
    assert result.exit_code == 0, result.output
    assert "unreadable.txt" in result.output  # reported by name, the others still processed
    with pred.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert list(rows[0]) == ["filename", "label", "start_span", "end_span", "text", "score", "assertion", "code"]
    assert {row["filename"] for row in rows} == {f"note{i}" for i in range(len(SAMPLE_NOTES))}
    for row in rows:
        text = (gold / f"{row['filename']}.txt").read_text(encoding="utf-8")
        assert text[int(row["start_span"]) : int(row["end_span"])] == row["text"]
        assert 0 < float(row["score"]) <= 1
    assertions = {row["text"]: row["assertion"] for row in rows}
    # "No presenta disnea", "Niega dolor torácico", "Antecedentes de diabetes mellitus"
    assert assertions["disnea"] == "negated"
    assert assertions["dolor torácico"] == "negated"
    assert assertions["diabetes mellitus"] == "historical"
    assert assertions["fiebre"] == assertions["neumonía"] == "present"
    meta = json.loads(Path(f"{pred}.meta.json").read_text())
    assert meta["encoder"] and meta["encoder_revision"] and meta["model_revision"] == "tiny-test"

    result = runner.invoke(main, ["evaluate", "--gold", str(gold), "--pred", str(pred), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["overall"]["strict_f1"] == pytest.approx(1.0)
    table = runner.invoke(main, ["evaluate", "--gold", str(gold), "--pred", str(pred)]).output
    assert "DISEASE" in table and "ALL" in table


def test_predict_and_evaluate_on_annotated_spanish_notes(tiny_tagger_path: Path, tmp_path: Path) -> None:
    subset = tmp_path / "subset"
    subset.mkdir()
    for txt in sorted(NOTES.glob("*.txt"))[:5]:
        shutil.copy(txt, subset / txt.name)
        shutil.copy(txt.with_suffix(".ann"), subset / txt.with_suffix(".ann").name)
    pred = tmp_path / "pred.tsv"
    runner = CliRunner()
    assert (
        runner.invoke(
            main, ["predict", "--input", str(subset), "--output", str(pred), "--model", str(tiny_tagger_path)]
        ).exit_code
        == 0
    )
    result = runner.invoke(main, ["evaluate", "--gold", str(subset), "--pred", str(pred), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["overall"]["n_gold"] == 73  # caso-01 to caso-05
    assert set(report["per_label"]) >= {"DISEASE", "SYMPTOM", "PROCEDURE"}


def test_bad_arguments_give_one_line_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    missing_model = runner.invoke(
        main,
        ["predict", "--input", str(tmp_path), "--output", str(tmp_path / "p.tsv"), "--model", str(tmp_path / "nope")],
    )
    assert missing_model.exit_code == 1
    assert "Error: no tagger checkpoint at" in missing_model.output
    assert "Traceback" not in missing_model.output
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("nothing useful\n")
    result = runner.invoke(main, ["evaluate", "--gold", str(bad_tsv), "--pred", str(bad_tsv)])
    assert result.exit_code == 1 and result.output.startswith("Error:")


def test_train_writes_a_checkpoint_that_predict_can_use(tiny_encoder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_brat(data)
    for copy in range(3):  # a few more notes so that both splits are non-empty
        for index in range(len(SAMPLE_NOTES)):
            shutil.copy(data / f"note{index}.txt", data / f"extra{copy}-{index}.txt")
            shutil.copy(data / f"note{index}.ann", data / f"extra{copy}-{index}.ann")
    checkpoint = tmp_path / "ckpt"
    runner = CliRunner()
    args = ["train", "--data", str(data), "--output", str(checkpoint), "--encoder", str(tiny_encoder)]
    result = runner.invoke(main, [*args, "--epochs", "1", "--frozen-layers", "1", "--val-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert "best epoch 1" in result.output
    assert (checkpoint / "tagger_config.json").is_file()
    pred = tmp_path / "pred.tsv"
    predicted = runner.invoke(
        main, ["predict", "--input", str(data), "--output", str(pred), "--model", str(checkpoint)]
    )
    assert predicted.exit_code == 0, predicted.output
    missing = runner.invoke(main, ["train", "--data", str(tmp_path / "nowhere"), "--output", str(checkpoint)])
    assert missing.exit_code == 2 and "does not exist" in missing.output

    warm = runner.invoke(
        main,
        [
            *args[:4],
            str(tmp_path / "warm"),
            *args[5:],
            "--epochs",
            "1",
            "--val-fraction",
            "0.3",
            "--frozen-layers",
            "0",
            "--init-from",
            str(checkpoint),
        ],
    )
    assert warm.exit_code == 0, warm.output
    assert (
        json.loads((tmp_path / "warm" / "tagger_config.json").read_text())["extra"]["training"]["init_from"] == "ckpt"
    )
    wrong = runner.invoke(main, [*args, "--epochs", "1", "--init-from", str(data)])
    assert wrong.exit_code == 1 and wrong.output.startswith("Error:") and "not a tagger checkpoint" in wrong.output


def test_subscribe_is_listed_and_reports_errors_on_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    assert "subscribe" in runner.invoke(main, ["--help"]).output
    help_text = runner.invoke(main, ["subscribe", "--help"]).output
    for option in ("--ehr", "--endpoint", "--token", "--fhir-version", "--payload", "--heartbeat"):
        assert option in help_text
    bad = runner.invoke(main, ["subscribe", "--ehr", "http://127.0.0.1:9/fhir", "--endpoint", "x", "--token", "t"])
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and "absolute http(s) URL" in bad.output
    unreachable = runner.invoke(
        main,
        ["subscribe", "--ehr", "http://127.0.0.1:9/fhir", "--endpoint", "http://127.0.0.1:9/n", "--token", "t"],
    )
    assert unreachable.exit_code == 1 and "could not reach the EHR" in unreachable.output
    assert "Traceback" not in unreachable.output


def test_subscribe_reports_what_the_ehr_refused(ehr: FhirTestServer) -> None:
    # The test server is R4: an R5 Subscription is refused, and the EHR's reason is shown.
    result = CliRunner().invoke(
        main,
        [
            "subscribe",
            "--ehr",
            ehr.base_url,
            "--endpoint",
            "http://127.0.0.1:9/fhir/notify",
            "--token",
            "t",
            "--fhir-version",
            "r5",
        ],
    )
    assert result.exit_code == 1 and "the EHR refused the Subscription: HTTP 400" in result.output


def test_predict_fills_the_code_column_from_the_profile(
    tiny_tagger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.deps import reset_dependencies
    from worker.runtime import reset_pipeline

    (tmp_path / "terms.csv").write_text(
        "code,display,synonyms,language\nNEU-1,Neumonía,pneumonia,es\nFIE-1,Fiebre,fever,es\n", encoding="utf-8"
    )
    (tmp_path / "profile.yaml").write_text(
        "name: local\n"
        "code_systems:\n"
        "  - {name: hospital, file: terms.csv, system: 'http://hospital.example/cs'}\n"
        "labels:\n"
        "  DISEASE: {mapper: condition, codes: {systems: [hospital], min_score: 0.9}}\n"
        "  SYMPTOM: {mapper: observation, codes: {systems: [hospital], min_score: 0.9}}\n"
        "  PROCEDURE: {mapper: procedure}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("FHIR_NER_MAPPING_PROFILE", str(tmp_path / "profile.yaml"))
    monkeypatch.setenv("FHIR_NER_TERMINOLOGY", "lexical")
    reset_dependencies()
    reset_pipeline()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "n0.txt").write_text(SAMPLE_NOTES[0], encoding="utf-8")
    pred = tmp_path / "pred.tsv"
    try:
        result = CliRunner().invoke(
            main, ["predict", "--input", str(notes), "--output", str(pred), "--model", str(tiny_tagger_path)]
        )
    finally:
        monkeypatch.undo()
        reset_dependencies()
        reset_pipeline()
    assert result.exit_code == 0, result.output
    with pred.open(encoding="utf-8") as handle:
        codes = {row["text"]: row["code"] for row in csv.DictReader(handle, delimiter="\t")}
    assert codes["neumonía"] == "http://hospital.example/cs|NEU-1"
    assert codes["fiebre"] == "http://hospital.example/cs|FIE-1"
    assert codes["radiografía de tórax"] == ""  # PROCEDURE has no code systems in this profile
