"""`fhir-ner code` and `fhir-ner evaluate-codes`: the production coding path, its TSVs and its scores."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner

from mappings.profile import load_profile, parse_profile
from mappings.terminology import CodeRequest, parse_code_csv
from worker.coding import (
    CODE_COLUMNS,
    CodedMention,
    code_mentions,
    evaluate_codes,
    read_code_tsv,
    same_code,
    score_codes,
    write_code_tsv,
)
from worker.terminology import TerminologyService, load_icd10cm_linked


@pytest.fixture(scope="module")
def lexical() -> TerminologyService:
    return TerminologyService.from_sources([load_icd10cm_linked()], mode="lexical")


def test_code_marks_written_exactly_what_the_profile_would_write(lexical: TerminologyService) -> None:
    profile = load_profile()
    results = code_mentions(["hematuria", "muerte", "zzz nada"], "DISEASE", "es", 5, profile, lexical)
    assert [r.written() for r in results] == ["R31.9", "R99", None]
    assert results[0].candidates[0][:2] == ("http://hl7.org/fhir/sid/icd-10-cm", "R31.9")
    assert results[2].candidates == []
    # The same request the mappers make (code_request) gives the same first candidate.
    (found,) = lexical.lookup([CodeRequest("hematuria", "DISEASE", ("icd-10-cm",), "es")])
    assert found[0].code == "R31.9"


def test_a_profile_threshold_decides_what_is_written(lexical: TerminologyService) -> None:
    strict = parse_profile(
        {
            "name": "strict",
            "labels": {"DISEASE": {"mapper": "condition", "codes": {"systems": ["icd-10-cm"], "min_score": 1.0}}},
        }
    )
    loose = parse_profile(
        {
            "name": "loose",
            "labels": {"DISEASE": {"mapper": "condition", "codes": {"systems": ["icd-10-cm"], "min_score": 0.5}}},
        }
    )
    # In a Spanish note "Pneumonia" matches the core form of J18.9's title: 0.97, written only under the looser
    # threshold. (In an English note, or one of unknown language, the English name "pneumonia" matches exactly.)
    assert code_mentions(["Pneumonia"], "DISEASE", "es", 5, strict, lexical)[0].written() is None
    assert code_mentions(["Pneumonia"], "DISEASE", "es", 5, loose, lexical)[0].written() == "J18.9"
    assert code_mentions(["Pneumonia"], "DISEASE", "en", 5, strict, lexical)[0].written() == "J18.9"


def test_the_code_tsv_round_trips() -> None:
    out = io.StringIO()
    rows = [
        CodedMention("fiebre", [("http://hl7.org/fhir/sid/icd-10-cm", "R50.9", "Fever, unspecified", 0.97, True)]),
        CodedMention("nada"),
    ]
    write_code_tsv(rows, out)
    lines = out.getvalue().splitlines()
    assert lines[0].split("\t") == list(CODE_COLUMNS)
    assert lines[1].split("\t") == [
        "fiebre",
        "1",
        "http://hl7.org/fhir/sid/icd-10-cm",
        "R50.9",
        "Fever, unspecified",
        "0.9700",
        "1",
    ]
    assert lines[2].split("\t") == ["nada", "0", "", "", "", "", "0"]


def test_scores_top1_top5_category_coverage_and_precision(tmp_path: Path) -> None:
    def coded(mention: str, *codes: str, written: bool = True) -> CodedMention:
        return CodedMention(mention, [("s", c, "", 0.9, written and i == 0) for i, c in enumerate(codes)])

    predictions = {
        "a": coded("a", "E11.9", "E11.8"),  # right
        "b": coded("b", "I48.0", "I48.91"),  # wrong at 1, right in top 5, right category
        "c": coded("c", "K35.80", written=False),  # right, not written
        "d": CodedMention("d"),  # nothing
    }
    gold = [
        {"mention": "a", "label": "DISEASE", "code": "e11.9"},
        {"mention": "b", "label": "DISEASE", "code": "I48.91"},
        {"mention": "c", "label": "DISEASE", "code": "K35.80"},
        {"mention": "d", "label": "PROCEDURE", "code": "BW03ZZZ"},
    ]
    report = score_codes(gold, predictions)
    assert report["DISEASE"] == {
        "n": 3,
        "top1": round(2 / 3, 4),
        "top5": 1.0,
        "category_top1": 1.0,
        "coverage": round(2 / 3, 4),
        "precision": 0.5,
    }
    assert report["PROCEDURE"]["top1"] == 0.0 and report["all"]["n"] == 4

    # The same through the verb, from a `fhir-ner code` TSV.
    pred = tmp_path / "pred.tsv"
    with pred.open("w", encoding="utf-8") as handle:
        write_code_tsv(predictions.values(), handle)
    assert read_code_tsv(pred)["b"].ranked_codes() == ["I48.0", "I48.91"]
    gold_file = tmp_path / "gold.tsv"
    gold_file.write_text(
        "mention\tlabel\tcode\n" + "".join(f"{g['mention']}\t{g['label']}\t{g['code']}\n" for g in gold)
    )
    result = CliRunner().invoke(evaluate_codes, ["--gold", str(gold_file), "--pred", str(pred), "--label", "DISEASE"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].split("\t") == ["DISEASE", "3", "0.667", "1.000", "1.000", "0.667", "0.500"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("mention\tcode\nx\tA00\n")
    result = CliRunner().invoke(evaluate_codes, ["--gold", str(bad), "--pred", str(pred)])
    assert result.exit_code == 1 and "lacks label" in result.output


def test_a_gold_code_without_its_7th_character_is_matched_by_its_extensions_only() -> None:
    """CodiEsp writes S72.001 or T68.XXX for the billable S72.001A or T68.XXXA the worker returns; nothing else
    matches loosely (another 7th character, another code, a category, an ICD-10-PCS code)."""
    assert same_code("S72.001", "S72.001A") and same_code("S72.001", "S72.001D")
    assert same_code("T68.XXX", "T68.XXXA") and same_code("T68", "T68.XXXA")  # placeholder X written or not
    assert same_code("S31.40X", "S31.40XA") and same_code("T14.90", "T14.90XA")
    assert same_code("R40.243", "R40.2430") and same_code("E11.9", "E11.9")
    assert not same_code("S72.001D", "S72.001A")  # a gold with its 7th character must match it
    assert not same_code("S72.00", "S72.001A")  # another code below the category
    assert not same_code("T14.9", "T14.90XA")
    assert not same_code("R51", "R51.9")  # a category's unspecified leaf is not the category
    assert not same_code("BT41ZZ", "BT41ZZZ")  # ICD-10-PCS: 7 characters, no dot, no extensions
    gold = [
        {"mention": "caída", "label": "DISEASE", "code": "W19.XXX"},
        {"mention": "fractura", "label": "DISEASE", "code": "S72.001"},
    ]
    predictions = {
        "caída": CodedMention("caída", [("s", "W19.XXXA", "", 1.0, True)]),
        "fractura": CodedMention("fractura", [("s", "S72.002A", "", 0.9, True), ("s", "S72.001A", "", 0.8, False)]),
    }
    report = score_codes(gold, predictions)["DISEASE"]
    assert (report["top1"], report["top5"], report["precision"]) == (0.5, 1.0, 0.5)


def test_the_code_verb_reads_one_mention_per_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import coding

    profile_file = tmp_path / "profile.yaml"
    (tmp_path / "terms.csv").write_text("code,display,synonyms\nX1,Fiebre alta,fiebre\n", encoding="utf-8")
    profile_file.write_text(
        "name: p\ncode_systems: [{name: local, file: terms.csv, system: 'http://local'}]\n"
        "labels:\n  SYMPTOM: {mapper: observation, codes: {systems: [local], min_score: 0.9}}\n",
        encoding="utf-8",
    )
    service = TerminologyService.from_sources(
        [parse_code_csv("code,display,synonyms\nX1,Fiebre alta,fiebre\n", "local", "http://local")], "lexical"
    )
    monkeypatch.setattr(coding, "_terminology", lambda profile, explicit: service)
    mentions = tmp_path / "mentions.txt"
    mentions.write_text("fiebre\n\n  tos  \n", encoding="utf-8")
    out = tmp_path / "out.tsv"
    result = CliRunner().invoke(
        coding.code,
        ["--input", str(mentions), "--label", "SYMPTOM", "--profile", str(profile_file), "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").splitlines()[1:] == [
        "fiebre\t1\thttp://local\tX1\tFiebre alta\t1.0000\t1",
        "tos\t0\t\t\t\t\t0",
    ]
    result = CliRunner().invoke(
        coding.code, ["--input", str(mentions), "--label", "NOPE", "--profile", str(profile_file)]
    )
    assert result.exit_code == 1 and "not a label" in result.output
