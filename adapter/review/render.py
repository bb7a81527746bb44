"""Turning the worker's records into what the templates show. Pure functions, no I/O."""

from __future__ import annotations

from typing import Any

KNOWN_LABELS = ("DISEASE", "SYMPTOM", "PROCEDURE")
ASSERTION_MARKS = {
    "present": "",
    "negated": "negated",
    "possible": "possible",
    "hypothetical": "hypothetical",
    "historical": "historical",
    "family": "family",
}


def label_class(label: str) -> str:
    return f"label-{label}" if label in KNOWN_LABELS else "label-other"


def segments(text: str, mentions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The note cut into plain runs and highlighted mentions, at their exact characters.

    Mentions of different labels may overlap; the first (by start, longest first) is highlighted in the text and
    the others are flagged ``overlapped`` (the mention table lists every mention).
    """
    pieces: list[dict[str, Any]] = []
    cursor = 0
    ordered = sorted(mentions, key=lambda m: (int(m["start"]), -int(m["end"])))
    for mention in ordered:
        start, end = int(mention["start"]), int(mention["end"])
        if start < cursor or end > len(text) or start >= end:
            mention["overlapped"] = True
            continue
        if start > cursor:
            pieces.append({"kind": "text", "text": text[cursor:start]})
        pieces.append({"kind": "mention", "text": text[start:end], "m": mention})
        cursor = end
    if cursor < len(text):
        pieces.append({"kind": "text", "text": text[cursor:]})
    return pieces


def sentence_around(text: str, start: int, end: int, limit: int = 300) -> tuple[str, str, str]:
    """(before, mention, after): the sentence or line the mention sits in, for the patient view's links."""
    stops = ".!?\n"
    left = max((text.rfind(c, 0, start) for c in stops), default=-1) + 1
    rights = [i for i in (text.find(c, end) for c in stops) if i != -1]
    right = min(rights) + 1 if rights else len(text)
    left = max(left, start - limit)
    right = min(right, end + limit)
    return text[left:start].lstrip(), text[start:end], text[end:right].rstrip()


def version_key(version: str) -> tuple[int, float, str]:
    return (0, float(version), version) if version.isdigit() else (1, 0.0, version)


def codes_text(codes: list[dict[str, str]]) -> str:
    return "; ".join(
        f"{c.get('code')} {c.get('display') or ''}".strip() + f" ({short_system(c.get('system') or '')})" for c in codes
    )


def short_system(system: str) -> str:
    known = {
        "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
        "http://snomed.info/sct": "SNOMED CT",
        "http://loinc.org": "LOINC",
    }
    return known.get(system, system.rsplit("/", 1)[-1] or system)


SECTIONS = ("Condition", "Observation", "Procedure", "FamilyMemberHistory")


def _group_key(mention: dict[str, Any]) -> tuple[str, str]:
    """Same code, same line; uncoded mentions group by their normalised text."""
    codes = mention.get("codes") or []
    if codes:
        first = codes[0]
        return f"{first.get('system')}|{first.get('code')}", f"{first.get('code')} {first.get('display') or ''}".strip()
    text = " ".join(str(mention["text"]).lower().split())
    return f"text|{text}", str(mention["text"])


def problem_list(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """What the adapter holds for a patient, from the latest version of each note: one line per code (or text)
    per resource type, each with the sentences it came from. A Condition group is ``refuted`` when every
    Condition in it is."""
    groups: dict[str, dict[tuple[str, str], dict[str, Any]]] = {kind: {} for kind in SECTIONS}
    for record in records:
        text = str(record.get("text") or "")
        for mention in record.get("mentions", []):
            kind = mention.get("resource_type")
            if not mention.get("resource") or kind not in groups or mention.get("status") == "entered-in-error":
                continue  # nothing written, or a reviewer rejected it
            key, title = _group_key(mention)
            group = groups[kind].setdefault(
                (key, ""), {"title": title, "codes": mention.get("codes") or [], "sources": [], "statuses": set()}
            )
            before, said, after = (
                sentence_around(text, int(mention["start"]), int(mention["end"])) if text else ("", "", "")
            )
            group["statuses"].add(str(mention.get("status") or ""))
            group["sources"].append(
                {
                    "document": record["document"],
                    "version": record["version"],
                    "index": mention["index"],
                    "resource": mention["resource"],
                    "assertion": mention.get("assertion"),
                    "status": mention.get("status"),
                    "before": before,
                    "said": said or mention["text"],
                    "after": after,
                    "date": record.get("date"),
                    "reviewed": mention.get("reviewed"),
                }
            )
    result: dict[str, list[dict[str, Any]]] = {}
    for kind, found in groups.items():
        lines = []
        for group in found.values():
            statuses = group.pop("statuses")
            group["refuted"] = kind == "Condition" and statuses == {"refuted"}
            group["statuses"] = sorted(s for s in statuses if s)
            lines.append(group)
        result[kind] = sorted(lines, key=lambda g: (g["refuted"], str(g["title"]).lower()))
    return result
