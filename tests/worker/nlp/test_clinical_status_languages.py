"""Past history stays on the problem list, in all seven languages: the assertion rules find the cues, the
mapper turns them and the code into clinicalStatus (tests/mappings/test_clinical_status.py has the table)."""

from __future__ import annotations

import pytest

from mappings.clinical_status import condition_clinical_status
from mappings.mentions import Mention
from mappings.terminology import ICD10CM_URL
from worker.nlp.assertion import default_detector

# (language, sentence, mention, ICD-10-CM code or None, expected clinicalStatus)
CASES = [
    ("es", "Antecedentes de hipertensión arterial y diabetes mellitus tipo 2.", "hipertensión arterial", "I10",
     "active"),
    ("es", "Antecedentes de hipertensión arterial y diabetes mellitus tipo 2.", "diabetes mellitus tipo 2", "E11.9",
     "active"),
    ("es", "Antecedentes de neumonía resuelta y diabetes.", "neumonía", "J18.9", "resolved"),
    ("es", "Antecedentes de neumonía resuelta y diabetes.", "diabetes", "E11.9", "active"),
    ("es", "HTA, diabetes, neumonía resuelta.", "HTA", "I10", "active"),
    ("es", "Antecedentes de fractura de cadera.", "fractura de cadera", "S72.001", "resolved"),
    ("es", "Linfoma de Hodgkin en remisión completa.", "Linfoma de Hodgkin", "C81.90", "remission"),
    ("es", "Tuberculosis pulmonar en la infancia, curada.", "Tuberculosis pulmonar", "A15.0", "resolved"),
    ("en", "History of hypertension and type 2 diabetes.", "hypertension", "I10", "active"),
    ("en", "History of hypertension and type 2 diabetes.", "type 2 diabetes", "E11.9", "active"),
    ("en", "History of pneumonia, resolved.", "pneumonia", "J18.9", "resolved"),
    ("en", "Previous hip fracture.", "hip fracture", "S72.001", "resolved"),
    ("en", "Hodgkin lymphoma in remission.", "Hodgkin lymphoma", "C81.90", "remission"),
    ("it", "In anamnesi ipertensione arteriosa e diabete mellito tipo 2.", "ipertensione arteriosa", "I10", "active"),
    ("it", "In anamnesi ipertensione arteriosa e diabete mellito tipo 2.", "diabete mellito tipo 2", "E11.9",
     "active"),
    ("it", "Pregressa polmonite, risolta.", "polmonite", "J18.9", "resolved"),
    ("it", "Linfoma di Hodgkin in remissione completa.", "Linfoma di Hodgkin", "C81.90", "remission"),
    ("nl", "Voorgeschiedenis van hypertensie en diabetes mellitus type 2.", "hypertensie", "I10", "active"),
    ("nl", "Voorgeschiedenis van longontsteking, inmiddels genezen.", "longontsteking", "J18.9", "resolved"),
    ("nl", "Eerdere heupfractuur.", "heupfractuur", "S72.001", "resolved"),
    ("nl", "Ziekte van Hodgkin in remissie.", "Ziekte van Hodgkin", "C81.90", "remission"),
    ("ro", "Antecedente de hipertensiune arterială și diabet zaharat tip 2.", "hipertensiune arterială", "I10",
     "active"),
    ("ro", "Antecedente de hipertensiune arterială și diabet zaharat tip 2.", "diabet zaharat tip 2", "E11.9",
     "active"),
    ("ro", "Antecedente de pneumonie, vindecată.", "pneumonie", "J18.9", "resolved"),
    ("ro", "Limfom Hodgkin în remisiune completă.", "Limfom Hodgkin", "C81.90", "remission"),
    ("sv", "Tidigare hypertoni och typ 2-diabetes.", "hypertoni", "I10", "active"),
    ("sv", "Tidigare lunginflammation, nu utläkt.", "lunginflammation", "J18.9", "resolved"),
    ("sv", "Tidigare höftfraktur.", "höftfraktur", "S72.001", "resolved"),
    ("sv", "Hodgkins lymfom i remission.", "Hodgkins lymfom", "C81.90", "remission"),
    ("cs", "V anamnéze arteriální hypertenze a diabetes mellitus 2. typu.", "arteriální hypertenze", "I10", "active"),
    ("cs", "V anamnéze pneumonie, zhojena.", "pneumonie", "J18.9", "resolved"),
    ("cs", "Dříve zlomenina krčku stehenní kosti.", "zlomenina krčku stehenní kosti", "S72.001", "resolved"),
    ("cs", "Hodgkinův lymfom v kompletní remisi.", "Hodgkinův lymfom", "C81.90", "remission"),
    # a plain present condition, and a past one without a code, are active in every language
    ("es", "Ingresa por neumonía adquirida en la comunidad.", "neumonía adquirida en la comunidad", "J18.9", "active"),
    ("en", "History of a hip operation for an old fracture problem.", "fracture problem", None, "active"),
]


@pytest.mark.parametrize(("language", "sentence", "mention", "code", "expected"), CASES)
def test_clinical_status_from_the_note(
    language: str, sentence: str, mention: str, code: str | None, expected: str
) -> None:
    start = sentence.index(mention)
    found = Mention("DISEASE", start, start + len(mention), mention)
    (annotated,) = default_detector().annotate(sentence, [found], language)
    concept = {"text": mention, **({"coding": [{"system": ICD10CM_URL, "code": code}]} if code else {})}
    assert condition_clinical_status(annotated, concept) == expected


def test_every_language_has_resolution_cues() -> None:
    detector = default_detector()
    assert {case[0] for case in CASES} == set(detector.languages)
