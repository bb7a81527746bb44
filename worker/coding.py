"""Coding mentions outside notes: ``fhir-ner code`` and ``fhir-ner evaluate-codes``.

``code`` asks the same terminology service the worker's mappers ask (:func:`worker.terminology.get_terminology`
with the configured profile) with the same request (:func:`mappings.terminology.code_request`), and marks as
written exactly the codings :func:`mappings.terminology.written_codes` would put in the resource.

TSV formats (tab-separated, one header line):

- ``code`` writes ``mention rank system code display score written``: one row per candidate, best first
  (``rank`` 1..top); a mention without candidates gets one row with ``rank`` 0 and empty fields.
- ``evaluate-codes`` reads gold rows ``mention label code`` (an optional ``language`` column) and scores, per
  label: top-1 and top-5 exact code, top-1 in the right 3-character category, coverage (share of mentions that
  get a written code) and precision of the written codes.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click

from core.cli import CliError

CODE_COLUMNS = ("mention", "rank", "system", "code", "display", "score", "written")
GOLD_COLUMNS = ("mention", "label", "code")


@dataclass
class CodedMention:
    mention: str
    candidates: list[tuple[str, str, str, float, bool]] = field(default_factory=list)  # system, code, display, score

    def ranked_codes(self) -> list[str]:
        return [code for _, code, _, _, _ in self.candidates]

    def written(self) -> str | None:
        return next((code for _, code, _, _, written in self.candidates if written), None)


def code_mentions(
    mentions: Sequence[str],
    label: str,
    language: str | None = None,
    top: int = 5,
    profile: Any = None,
    terminology: Any = None,
) -> list[CodedMention]:
    """Candidates (best first, at most ``top``) and the written coding of each mention, as the mappers see them."""
    from mappings.terminology import code_request, written_codes
    from worker.runtime import get_profile
    from worker.terminology import get_terminology

    profile = profile or get_profile()
    mapping = profile.labels.get(label)
    if mapping is None:
        raise CliError(f"--label {label}: not a label of profile {profile.name} ({', '.join(profile.labels)})")
    if terminology is None:
        terminology = get_terminology(profile)
    options = mapping.codes
    if options is None or terminology is None:
        return [CodedMention(m) for m in mentions]
    previous = terminology.limit
    terminology.limit = max(previous, top)
    try:
        answers = terminology.lookup([code_request(m, label, options, language) for m in mentions])
    finally:
        terminology.limit = previous
    results = []
    for mention, candidates in zip(mentions, answers, strict=True):
        chosen = {
            (c.system, c.code)
            for c in written_codes(candidates, options, label, terminology, profile.custom_system_names())
        }
        row = CodedMention(mention)
        for candidate in candidates[:top]:
            written = (candidate.system, candidate.code) in chosen
            row.candidates.append((candidate.system, candidate.code, candidate.display or "", candidate.score, written))
        results.append(row)
    return results


def write_code_tsv(results: Iterable[CodedMention], out: TextIO) -> None:
    writer = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(CODE_COLUMNS)
    for result in results:
        if not result.candidates:
            writer.writerow([result.mention, 0, "", "", "", "", 0])
        for rank, (system, code, display, score, written) in enumerate(result.candidates, start=1):
            writer.writerow([result.mention, rank, system, code, display, f"{score:.4f}", int(written)])


def read_tsv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"{path}: cannot read ({error.strerror})") from None
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise CliError(f"{path}: the header lacks {', '.join(missing)} (expected: {' '.join(required)})")
    return [row for row in reader if row.get(required[0]) is not None]


def read_code_tsv(path: Path) -> dict[str, CodedMention]:
    """``code``'s output, by mention."""
    found: dict[str, CodedMention] = {}
    for row in read_tsv(path, CODE_COLUMNS):
        result = found.setdefault(row["mention"], CodedMention(row["mention"]))
        if row["rank"] not in ("", "0"):
            score = float(row["score"] or 0.0)
            result.candidates.append((row["system"], row["code"], row["display"], score, row["written"] == "1"))
    return found


def same_code(gold: str, predicted: str) -> bool:
    """Whether ``predicted`` is the gold code, counting a gold code written without its 7th character as the
    code it extends: CodiEsp (and coders who leave the encounter out) write "S72.001" or "T68.XXX" for the
    billable "S72.001A" or "T68.XXXA" that the worker returns. ICD-10-CM's only 7-character codes are such
    extensions, so nothing else can match this way (ICD-10-PCS codes, 7 characters without a dot, never do)."""
    if predicted == gold:
        return True
    if "." not in predicted:
        return False
    compact = predicted.replace(".", "")
    return len(compact) == 7 and compact[:6].rstrip("X") == gold.replace(".", "").rstrip("X")


def score_codes(
    gold: Sequence[dict[str, str]], coded: dict[str, CodedMention], by_language: bool = False
) -> dict[str, dict[str, float]]:
    """Per label (and ``all``): n, top1, top5, category_top1, coverage, precision (of written codes); a code
    matches its gold as :func:`same_code` says.

    With ``by_language`` also per label and language (``DISEASE/it``), from the gold's ``language`` column.
    """
    by_label: dict[str, list[tuple[str, CodedMention]]] = {}
    for row in gold:
        result = coded.get(row["mention"], CodedMention(row["mention"]))
        gold_code = row["code"].strip().upper()
        by_label.setdefault(row["label"], []).append((gold_code, result))
        if by_language:
            by_label.setdefault(f"{row['label']}/{row.get('language') or '-'}", []).append((gold_code, result))
        by_label.setdefault("all", []).append((gold_code, result))
    report: dict[str, dict[str, float]] = {}
    for label, items in sorted(by_label.items()):
        n = len(items)
        top1 = sum(bool(r.ranked_codes()) and same_code(g, r.ranked_codes()[0]) for g, r in items)
        top5 = sum(any(same_code(g, code) for code in r.ranked_codes()[:5]) for g, r in items)
        category = sum(bool(r.ranked_codes()) and r.ranked_codes()[0][:3] == g[:3] for g, r in items)
        written = [(g, w) for g, r in items if (w := r.written()) is not None]
        right = sum(same_code(g, w) for g, w in written)
        report[label] = {
            "n": n,
            "top1": round(top1 / n, 4) if n else 0.0,
            "top5": round(top5 / n, 4) if n else 0.0,
            "category_top1": round(category / n, 4) if n else 0.0,
            "coverage": round(len(written) / n, 4) if n else 0.0,
            "precision": round(right / len(written), 4) if written else 0.0,
        }
    return report


def format_report(report: dict[str, dict[str, float]]) -> str:
    columns = ("n", "top1", "top5", "category_top1", "coverage", "precision")
    lines = ["label\t" + "\t".join(columns)]
    for label, row in report.items():
        lines.append(label + "\t" + "\t".join(str(int(row[c])) if c == "n" else f"{row[c]:.3f}" for c in columns))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The verbs
# --------------------------------------------------------------------------------------------------
def _read_mentions(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise CliError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise CliError(f"{path}: not valid UTF-8") from None
    return [" ".join(line.split()) for line in lines if line.strip()]


def _profile(path: Path | None) -> Any:
    from mappings.profile import ProfileError, load_profile
    from mappings.terminology import TerminologyError

    try:
        if path is None:
            from worker.runtime import get_profile

            return get_profile()
        return load_profile(path)
    except (ProfileError, TerminologyError) as error:
        raise CliError(str(error)) from None


def _terminology(profile: Any, explicit: bool) -> Any:
    from mappings.terminology import TerminologyError
    from worker.terminology import get_terminology, terminology_for

    try:
        if not explicit:
            return get_terminology(profile)
        from core.settings import get_settings

        settings = get_settings()
        return terminology_for(
            profile,
            settings.terminology,
            settings.terminology_cache_dir,
            settings.terminology_encoder,
            settings.cache_dir,
        )
    except TerminologyError as error:
        raise CliError(str(error)) from None


@click.command("code")
@click.option("--input", "input_file", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--label", required=True, help="DISEASE, SYMPTOM, PROCEDURE (a label of the mapping profile).")
@click.option("--lang", default=None, help="Language of the mentions (BCP 47, e.g. es), as a note's would be.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 50), help="Candidates per mention.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), default=None, help="TSV (default: stdout).")
@click.option("--profile", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Mapping profile YAML.")
def code(input_file: Path, label: str, lang: str | None, top: int, output: Path | None, profile: Path | None) -> None:
    """Code one mention per line of --input as the worker would: a TSV of candidates and what is written."""
    mentions = _read_mentions(input_file)
    chosen = _profile(profile)
    results = code_mentions(mentions, label, lang, top, chosen, _terminology(chosen, profile is not None))
    if output is None:
        write_code_tsv(results, sys.stdout)
    else:
        with output.open("w", encoding="utf-8", newline="") as handle:
            write_code_tsv(results, handle)
        written = sum(r.written() is not None for r in results)
        click.echo(f"{len(results)} mentions, {written} with a written code → {output}", err=True)


@click.command("evaluate-codes")
@click.option(
    "--gold", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True), help="mention label code TSV"
)
@click.option(
    "--pred",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="`fhir-ner code` output; without it the gold mentions are coded now, per label, as `code` would.",
)
@click.option("--label", default=None, help="Score only gold rows of this label (e.g. when --pred was coded for it).")
@click.option("--lang", default=None, help="Language of the mentions when coding them (default: the gold's column).")
@click.option("--profile", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Mapping profile YAML.")
@click.option("--by-language", is_flag=True, help="Also per label and language (the gold's language column).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate_codes(
    gold: Path,
    pred: Path | None,
    label: str | None,
    lang: str | None,
    profile: Path | None,
    by_language: bool,
    as_json: bool,
) -> None:
    """Score coded mentions against gold codes: top-1, top-5, category top-1, coverage and precision, per label."""
    rows = read_tsv(gold, GOLD_COLUMNS)
    if label:
        rows = [row for row in rows if row["label"] == label]
    if not rows:
        raise CliError(f"{gold}: no gold rows" + (f" with label {label}" if label else ""))
    if pred is not None:
        coded = read_code_tsv(pred)
        report = score_codes(rows, coded, by_language)
    else:
        chosen = _profile(profile)
        terminology = _terminology(chosen, profile is not None)
        report = {}
        groups: dict[tuple[str, str | None], list[dict[str, str]]] = {}
        for row in rows:
            groups.setdefault((row["label"], lang or row.get("language") or None), []).append(row)
        coded_rows: list[dict[str, str]] = []
        coded: dict[str, CodedMention] = {}
        for (row_label, language), items in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            mentions = sorted({row["mention"] for row in items})
            for result in code_mentions(mentions, row_label, language, 5, chosen, terminology):
                key = f"{row_label}\x00{language}\x00{result.mention}"
                coded[key] = result
            coded_rows += [{**row, "mention": f"{row_label}\x00{language}\x00{row['mention']}"} for row in items]
        report = score_codes(coded_rows, coded, by_language)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))


COMMANDS: list[click.Command] = [code, evaluate_codes]
