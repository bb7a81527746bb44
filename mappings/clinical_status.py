"""A Condition's clinicalStatus, from what the note says and from what kind of condition its code names.

"Antecedentes de hipertensión arterial y diabetes mellitus tipo 2" lists a patient's chronic comorbidities:
they are past *history*, and still the patient's problems. Marking every historical mention ``resolved``
would take hypertension and diabetes off the problem list, so the word "history" alone never does.

The rules, first match wins (documented in the README's "Clinical status" table):

1. The note says the condition is over: a *resolution cue* near the mention ("neumonía resuelta", "curado
   de", "en remisión", "resolved", "in remission"; ``Mention.resolution``, found by the assertion rules of
   each language) gives ``resolved``, or ``remission`` for a remission cue.
2. A historical mention whose code names a condition that is over by nature once it is past: an injury or
   poisoning, an acute infection, an acute event (myocardial infarction, stroke, pulmonary embolism), a
   pregnancy, a symptom (:data:`EPISODIC_ICD10CM`, and any ICD-10-CM code whose title says "acute" but not
   "chronic") gives ``resolved``.
3. Everything else is ``active``: a historical chronic condition, and a historical mention without a code
   (its nature is unknown, and keeping it on the list is the safe side: a clinician can resolve it).
"""

from __future__ import annotations

import re
from typing import Any

from mappings.mentions import Mention
from mappings.terminology import ICD10CM_URL

#: ICD-10-CM ranges (dotless code prefixes, inclusive) of conditions that are over once they are past.
EPISODIC_ICD10CM: tuple[tuple[str, str, str], ...] = (
    ("A00", "B17", "infection (acute viral hepatitis included; chronic hepatitis B18-B19 and HIV B20 are not)"),
    ("B25", "B89", "infection, mycosis, parasitosis"),
    ("B95", "B97", "infectious agent"),
    ("I21", "I24", "acute ischaemic heart disease"),
    ("I26", "I26", "pulmonary embolism"),
    ("I30", "I30", "acute pericarditis"),
    ("I33", "I33", "acute endocarditis"),
    ("I40", "I40", "acute myocarditis"),
    ("I60", "I64", "stroke (the acute event; sequelae I69 are not)"),
    ("J00", "J22", "acute respiratory infection, influenza, pneumonia"),
    ("K35", "K38", "appendicitis"),
    ("K85", "K85", "acute pancreatitis"),
    ("L02", "L03", "abscess, cellulitis"),
    ("N10", "N10", "acute pyelonephritis"),
    ("N17", "N17", "acute kidney failure"),
    ("N390", "N390", "urinary tract infection"),
    ("O00", "O9A", "pregnancy, childbirth, puerperium"),
    ("P00", "P96", "perinatal condition"),
    ("R00", "R99", "symptom or abnormal finding"),
    ("S00", "T88", "injury, poisoning, complication of care"),
    ("V00", "Y99", "external cause: an accident, a fall, an assault"),
)
_ACUTE = re.compile(r"\bacute\b", re.IGNORECASE)
_CHRONIC = re.compile(r"\bchronic\b", re.IGNORECASE)


def episodic_reason(code: str, display: str | None = None) -> str | None:
    """Why an ICD-10-CM code names a condition that is over once past, or None (chronic or not known)."""
    dotless = code.replace(".", "").upper()
    for first, last, reason in EPISODIC_ICD10CM:
        head = dotless[: len(first)]
        if first <= head <= last:
            return reason
    if display and _ACUTE.search(display) and not _CHRONIC.search(display):
        return "acute condition (code title)"
    return None


def _icd10cm_codings(code: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in code.get("coding") or [] if c.get("system") == ICD10CM_URL and c.get("code")]


def condition_clinical_status(mention: Mention, code: dict[str, Any]) -> str:
    """``active``, ``resolved`` or ``remission`` for a Condition of the patient (see the module's rules)."""
    if mention.resolution is not None:
        return mention.resolution
    if mention.assertion == "historical" and any(
        episodic_reason(str(c["code"]), c.get("display")) for c in _icd10cm_codings(code)
    ):
        return "resolved"
    return "active"
