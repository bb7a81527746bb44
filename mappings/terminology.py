"""Codes for mentions: the interface the mappings call, text normalisation, and pure code-system parsers.

Pure like the rest of ``mappings/``: no I/O, no torch. The worker (``worker/terminology.py``) reads the
files, loads ICD-10-CM and the encoder, and implements :class:`Terminology`; the functions here take data
that is already in memory (a CSV's text, a parsed CodeSystem JSON).
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from mappings.mentions import CandidateCode

ICD10CM_URL = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10PCS_URL = "http://www.cms.gov/Medicare/Coding/ICD10"
# Built-in code systems a profile may name without declaring them.
BUILTIN_SYSTEMS: dict[str, str] = {"icd-10-cm": ICD10CM_URL, "icd-10-pcs": ICD10PCS_URL}
# Score of a lexical match: the whole normalised term, or the term without "NOS"/"unspecified"/(...).
EXACT_SCORE = 1.0
ALIAS_SCORE = 0.97
# Threshold of a label whose profile sets no min_score and whose terminology calibrated none.
DEFAULT_MIN_SCORE = 0.92
_FILLER_WORDS = frozenset({"nos", "unspecified", "nep", "nas", "nca", "sai"})
_BRACKETED = re.compile(r"\([^()]*\)|\[[^\[\]]*\]")
_NON_WORD = re.compile(r"[^\w]+")


# Words that say which side, in the seven languages, normalised (lower case, no accents), by the side they name:
# a mention without one names no side, and its code should not either (:func:`mention_sides`); a mention that names
# one side gets no code of the other (:func:`named_side`). "relative" words name a side without saying which.
_SIDES_BY_LANGUAGE: dict[str, dict[str, tuple[str, ...]]] = {
    "es": {
        "right": ("derecho", "derecha", "derechos", "derechas", "dcho", "dcha", "dch", "drcho", "drcha", "od"),
        "left": ("izquierdo", "izquierda", "izquierdos", "izquierdas", "izdo", "izda", "izq", "oi"),
        "both": ("bilateral", "bilaterales", "ambos", "ambas", "ao"),
        "relative": ("contralateral", "ipsilateral", "homolateral"),
    },
    "en": {"right": ("right", "rt"), "left": ("left", "lt"), "both": ("both", "bilateral")},
    "it": {
        "right": ("destro", "destra", "destri", "destre", "dx"),
        "left": ("sinistro", "sinistra", "sinistri", "sinistre", "sx"),
        "both": ("bilaterale", "bilaterali", "entrambi", "entrambe"),
    },
    "nl": {"right": ("rechter", "rechts"), "left": ("linker", "links"), "both": ("bilateraal", "beiderzijds", "beide")},
    "ro": {
        "right": ("drept", "dreapta", "drepte", "drepti"),
        "left": ("stang", "stanga", "stangi", "stange"),
        "both": ("bilateral", "bilaterala", "ambele", "ambii"),
    },
    "sv": {
        "right": ("hoger", "hogra"),
        "left": ("vanster", "vanstra"),
        "both": ("bilateral", "bilaterala", "bada", "dubbelsidig"),
    },
    "cs": {
        "right": ("pravy", "prava", "prave", "praveho", "pravem", "pravou", "pravych"),
        "left": ("levy", "leva", "leve", "leveho", "levem", "levou", "levych"),
        "both": ("oboustranny", "oboustranna", "oboustranne", "bilateralni"),
    },
}  # fmt: skip
# Compounds that start with a side ("linkerknie", "pravostranná", "vänstersidig").
_SIDE_PREFIXES_BY_LANGUAGE: dict[str, dict[str, tuple[str, ...]]] = {
    "nl": {"right": ("rechter",), "left": ("linker",)},
    "sv": {"right": ("hogersid",), "left": ("vanstersid",)},
    "cs": {"right": ("pravostrann",), "left": ("levostrann",)},
}


@lru_cache(maxsize=16)
def _side_words(language: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """Side words and side prefixes (each -> the side it names) of ``language``, or of all seven where it is not one
    of them. One language's list alone where it is known: Czech "leve" (left) is Spanish and Italian "mild"."""
    code = (language or "").split("-")[0].lower()
    languages = [code] if code in _SIDES_BY_LANGUAGE else list(_SIDES_BY_LANGUAGE)
    words = {w: side for lang in languages for side, ws in _SIDES_BY_LANGUAGE[lang].items() for w in ws}
    prefixes = {
        p: side for lang in languages for side, ps in _SIDE_PREFIXES_BY_LANGUAGE.get(lang, {}).items() for p in ps
    }
    return words, prefixes


def mention_sides(text: str, language: str | None = None) -> set[str]:
    """The sides a mention names in ``language`` (any of the seven where None): "right", "left", "both", "relative"
    (contralateral, ipsilateral); none where it says no side."""
    words, prefixes = _side_words(language)
    found: set[str] = set()
    for word in normalise(text).split():
        side = words.get(word) or next((s for p, s in prefixes.items() if word.startswith(p)), None)
        if side is not None:
            found.add(side)
    return found


def named_side(sides: set[str]) -> str | None:
    """The one side of a mention's :func:`mention_sides`, "right" or "left" ("OI hemorragias subretinianas": left),
    else None (no side, both sides, or a side relative to another: "contralateral")."""
    return next(iter(sides)) if len(sides) == 1 and sides <= {"right", "left"} else None


# Where a pain's radiation starts, in the seven languages: "chest pain radiating to the left arm", "dolor torácico
# irradiado al brazo izquierdo", "dolore toracico irradiato al braccio sinistro". Coders code the pain where it is
# (CodiEsp: "dolor epigástrico irradiado a espalda" -> R10.13, "dolor torácico, irradiado a espalda" -> R07.9);
# the whole mention's nearest name follows its tail ("Pain in left arm").
_RADIATION = re.compile(
    r"(?:,\s*|\s+)(?:"
    # es
    r"(?:que\s+se\s+(?:le\s+)?irradian?|irradiad[oa]s?|con\s+irradiaci[oó]n)\s+(?:a|al|hacia|por|en)"
    # en
    r"|(?:radiating|(?:which|that)\s+radiates?|radiates?|with\s+radiation)\s+(?:to|into|down|through|towards?)"
    # it
    r"|(?:che\s+si\s+irradia|irradiat[oaie]|con\s+irradiazione)\s+(?:a|al|allo|alla|ai|agli|alle|all['’]|verso|in)"
    # nl
    r"|(?:uitstralend[e]?|met\s+uitstraling|die\s+uitstraalt)\s+(?:naar|in)"
    # ro
    r"|(?:iradiat[ăa]?|iradiind|care\s+iradiaz[ăa]|cu\s+iradiere)\s+(?:în|in|spre|la|c[ăa]tre)"
    # sv
    r"|(?:(?:som\s+)?str[åa]lar\s+ut|med\s+utstr[åa]lning|utstr[åa]lande)\s+(?:i|mot|till|ner\s+i)"
    # cs
    r"|(?:vyst[řr]eluj[íi]c[íi]|vyza[řr]uj[íi]c[íi]|s\s+vyza[řr]ov[áa]n[íi]m|[šs][íi][řr][íi]c[íi]\s+se)"
    r"\s+(?:do|na)"
    r")(?:(?<=['’])|(?=\W|$))",
    re.IGNORECASE,
)


# "Community-acquired" in the seven languages. ICD-10-CM codes where a condition was acquired only for hospital
# and ventilator cases (J95.851, Y95), so a community-acquired pneumonia is J18.9 "Pneumonia, unspecified organism",
# as a pneumonia is. No name in ICD-10-CM or CodiEsp says it, and the whole mention's nearest names followed the
# qualifier: "neumonía adquirida en la comunidad" and "community-acquired pneumonia" ranked J84.89 "Other specified
# interstitial pulmonary diseases" first (0.63-0.64, unwritten), "community acquired pneumonia" J95.851
# "Ventilator associated pneumonia". Out-of-hospital ("extrahospitalaria") is the Spanish clinical synonym.
_COMMUNITY_ACQUIRED = re.compile(
    r"(?<!\w)(?:"
    # es: "neumonía adquirida en la comunidad", "neumonía extrahospitalaria", "neumonía comunitaria"
    r"(?:adquirid[oa]s?|contra[íi]d[oa]s?)\s+en\s+(?:la\s+)?comunidad|extrahospitalari[oa]s?|comunitari[oa]s?"
    # en: "community-acquired pneumonia", "community acquired pneumonia", "community-onset pneumonia"
    r"|community[\s-]+(?:acquired|onset)"
    # it: "polmonite acquisita in comunità", "polmonite comunitaria" (covered above)
    r"|acquisit[oaie]\s+in\s+comunit[àa]|contratt[oaie]\s+in\s+comunit[àa]"
    # nl: "buiten het ziekenhuis opgelopen pneumonie", "thuis opgelopen pneumonie"
    r"|(?:buiten\s+het\s+ziekenhuis|thuis|in\s+de\s+thuissituatie)\s+opgelopen"
    # ro: "pneumonie dobândită în comunitate", "pneumonie comunitară"
    r"|dob[âa]ndit[ăa]?\s+[îi]n\s+comunitate|comunitar[ăae]"
    # sv: "samhällsförvärvad pneumoni"
    r"|samh[äa]llsf[öo]rv[äa]rvade?"
    # cs: "komunitní pneumonie", "pneumonie získaná v komunitě"
    r"|komunitn[íi]|z[íi]skan[áa]\s+v\s+komunit[ěe]"
    r")(?!\w)",
    re.IGNORECASE,
)


# Words that say how well known or controlled a condition is, or since when it is known, and change no ICD-10-CM
# code: "known COPD", "well-controlled hypertension", "HTA conocida", "diabete ben controllato". Where the tagger
# kept them in a mention (English adjectives: "well-controlled hypertension" was tagged whole), the mention's
# nearest names scored under the threshold and the right top-1 went unwritten (I10 at 0.77). Anchored where each
# language puts them: before the noun (en, nl, sv, cs), after it (es, it, ro), so that "fiebre de causa no
# conocida" (unknown: R50.9) or "due to known physiological condition" (F06) keep their words. Not here, as not
# code-neutral: "long-standing" (I48.11), "poorly controlled" (E11.65), "chronic", "acute".
_NEUTRAL_BEFORE = re.compile(
    r"^(?:known|well[\s-]+controlled|(?:newly|recently)[\s-]+diagnosed"  # en
    r"|bekende|goed\s+(?:gereguleerde|ingestelde)|(?:nieuw|recent)\s+gediagnosticeerde"  # nl
    r"|k[äa]nd[a]?|v[äa]l(?:kontrollerad|reglerad|inst[äa]lld)[ea]?|nydiagnostiserad[e]?"  # sv
    r"|zn[áa]m[áaýyée]|dob[řr]e\s+(?:kontrolovan|kompenzovan)[áaýyée]|nov[ěe]\s+diagnostikovan[áaýyée]"  # cs
    r")(?:\s*,\s*|\s+)",
    re.IGNORECASE,
)
_NEUTRAL_AFTER = re.compile(
    r"(?:\s*,\s*|\s+)(?:"
    # es
    r"(?<!\bno\s)conocid[oa]s?|bien\s+controlad[oa]s?|de\s+reciente\s+diagn[oó]stico|reci[eé]n\s+diagnosticad[oa]s?"
    r"|ben\s+controllat[oaie]|di\s+(?:nuova|recente)\s+diagnosi"  # it
    r"|(?<!\beste\s)cunoscut[ăa]?|bine\s+controlat[ăa]?|(?:nou|recent)\s+diagnosticat[ăa]?"  # ro
    r")$",
    re.IGNORECASE,
)


def _without_neutral_words(text: str) -> str:
    """``text`` less the code-neutral words at its start or end (:data:`_NEUTRAL_BEFORE`, :data:`_NEUTRAL_AFTER`),
    while any is found ("known, well-controlled hypertension"); ``text`` itself where nothing is left."""
    plain = text
    while True:
        shorter = _NEUTRAL_AFTER.sub("", _NEUTRAL_BEFORE.sub("", plain, count=1), count=1)
        if shorter == plain:
            break
        plain = shorter
    return plain if len(plain.strip()) >= 3 else text


def coded_text(text: str, label: str) -> str:
    """The part of a mention that is coded: a pain without where it radiates to (:data:`_RADIATION`), a condition
    without "community-acquired" (:data:`_COMMUNITY_ACQUIRED`), in any of the seven languages; the whole mention
    otherwise, and always for a PROCEDURE (there "irradiado a", "irradiation" are a radiotherapy: "mediastino
    irradiado a 45 Gy"). The resource's ``code.text`` keeps the whole mention."""
    if label == "PROCEDURE":
        return text
    found = _RADIATION.search(text)
    if found is not None:
        head = text[: found.start()].rstrip(" ,;:")
        text = head if len(head) >= 3 else text
    text = _without_neutral_words(text)
    if _COMMUNITY_ACQUIRED.search(text) is None:
        return text  # as it is, spaces and line breaks included
    plain = " ".join(_COMMUNITY_ACQUIRED.sub(" ", text).split()).strip(" ,;:-")
    return plain if len(plain) >= 3 else text


class TerminologyError(ValueError):
    """A code system file that cannot be used; the message names the source and the line or field."""


def normalise(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form: ``"Neumonía,  NOS"`` → ``"neumonia nos"``.

    Coding a note normalises the same short strings (its mentions, its candidates' names) hundreds of times:
    those are remembered (a pure function; long texts are not kept)."""
    return _normalise_short(text) if len(text) <= 200 else _normalise(text)


def _normalise(text: str) -> str:
    if text.isascii():
        stripped = text.casefold()
    else:
        decomposed = unicodedata.normalize("NFKD", text)
        stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    return " ".join(_NON_WORD.sub(" ", stripped).replace("_", " ").split())


_normalise_short = lru_cache(maxsize=32768)(_normalise)


_QUALIFIER_TAIL = re.compile(
    r",\s*(unspecified|not elsewhere classified|site not specified|not otherwise specified)\b.*$", re.IGNORECASE
)
_LEADING_UNSPECIFIED = re.compile(r"^unspecified\s+", re.IGNORECASE)
# Term kinds that are derived forms of another term: a text match on them scores as an alias.
DERIVED_KINDS = frozenset({"core"})


def core_term(text: str) -> str:
    """A classification title without its filing qualifiers, closer to how notes say it.

    ``"Pneumonia, unspecified organism"`` → ``"Pneumonia"``; ``"Essential (primary) hypertension"`` →
    ``"Essential hypertension"``; ``"Urinary tract infection, site not specified"`` → ``"Urinary tract
    infection"``; ``"Fever NOS"`` → ``"Fever"``.
    """
    core = _BRACKETED.sub(" ", text)
    core = _QUALIFIER_TAIL.sub("", " ".join(core.split()))
    core = re.sub(r"\bNOS\b", " ", core)
    core = _LEADING_UNSPECIFIED.sub("", " ".join(core.split()))
    core = " ".join(core.split()).strip(" ,;")
    return core[:1].upper() + core[1:] if core else core


def lexical_keys(text: str) -> tuple[str, ...]:
    """The normalised term first, then its aliases: without (bracketed) modifiers and without NOS/unspecified."""
    full = normalise(text)
    keys = [full] if full else []
    for variant in (_BRACKETED.sub(" ", text), text):
        words = [w for w in normalise(variant).split() if w not in _FILLER_WORDS]
        alias = " ".join(words)
        if alias and alias not in keys:
            keys.append(alias)
    return tuple(keys)


@dataclass(frozen=True)
class TermEntry:
    """One searchable name of a code: its display, a synonym, or an inclusion term."""

    code: str
    display: str
    term: str
    kind: str = "display"  # display | synonym | inclusion | includes | core (see core_term)
    language: str | None = None
    preferred: bool = True  # wins ties (ICD-10-CM: leaf codes over the categories above them)


@dataclass(frozen=True)
class CodeSystemData:
    """A code system held in memory: what the worker indexes."""

    name: str
    url: str
    entries: tuple[TermEntry, ...]
    version: str | None = None
    # Codes that are not billable (ICD-10-CM categories with subdivisions) → the leaf a mention naming the
    # category without specifics gets (its "unspecified" leaf), or None when it has none.
    unbillable: dict[str, str | None] = field(default_factory=dict, compare=False, hash=False)
    # Codes matched by text only, never embedded (ICD-10-CM: categories that have no default leaf, which only a
    # profile allowing categories can get; a third of the strings).
    unembedded: frozenset[str] = field(default_factory=frozenset, compare=False)

    def codes(self) -> set[str]:
        return {entry.code for entry in self.entries}

    def billable(self, code: str, categories: bool = False) -> str | None:
        """The code to return for a match on ``code``: itself, or (categories not allowed) its default leaf."""
        if categories or code not in self.unbillable:
            return code
        return self.unbillable[code]


@dataclass(frozen=True)
class CodeRequest:
    """Code this text for this label, from these named systems (in order of preference)."""

    text: str
    label: str
    systems: tuple[str, ...]
    language: str | None = None
    prefixes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # system name → allowed code prefixes
    categories: bool = False  # non-billable categories may be returned (else their default billable leaf)
    # Per system, the score under which the caller writes none of its codes (:func:`written_codes`'s minimum). Where
    # no candidate of a system reaches it, a terminology may skip what only orders them (the re-ranker): nothing of
    # that system is written whatever their order. Empty: every answer fully ranked (``fhir-ner code``).
    floors: tuple[tuple[str, float], ...] = ()


class Terminology(Protocol):
    """What the mappings call. Returns, per request, candidates from the requested systems, best first.

    Each candidate's ``source`` is the name of the system it came from and ``score`` is in [0, 1]: 1 for an
    exact normalised match, lower for nearest-neighbour matches.
    """

    def lookup(self, requests: Sequence[CodeRequest]) -> list[list[CandidateCode]]: ...


def primary_language(language: str | None) -> str | None:
    """The primary subtag of a BCP-47 tag, lower case (``"es-ES"`` → ``"es"``); None for none."""
    return language.split("-")[0].lower() if language else None


def _language_fits(entry_language: str | None, note_language: str | None) -> bool:
    """A term tagged with a language is matched as text only in notes of that language (or of unknown one)."""
    if entry_language is None or note_language is None:
        return True
    return primary_language(entry_language) == primary_language(note_language)


def code_allowed(code: str, prefixes: Sequence[str]) -> bool:
    return not prefixes or any(code.startswith(prefix) for prefix in prefixes)


class LexicalIndex:
    """Exact matching on normalised text (and its aliases) for one code system."""

    def __init__(self, data: CodeSystemData) -> None:
        self.data = data
        self._keys: dict[str, list[tuple[int, TermEntry]]] = {}
        self._display: dict[str, str] = {}
        for entry in data.entries:
            self._display.setdefault(entry.code, entry.display)
            for rank, key in enumerate(lexical_keys(entry.term)):
                self._keys.setdefault(key, []).append((rank, entry))

    def match(
        self,
        text: str,
        language: str | None = None,
        prefixes: Sequence[str] = (),
        limit: int = 5,
        categories: bool = False,
    ) -> list[CandidateCode]:
        found: dict[str, tuple[float, bool, str | None]] = {}
        for query_rank, key in enumerate(lexical_keys(text)):
            for entry_rank, entry in self._keys.get(key, []):
                code = self.data.billable(entry.code, categories)
                if code is None or not _language_fits(entry.language, language) or not code_allowed(code, prefixes):
                    continue
                exact = query_rank == 0 and entry_rank == 0 and entry.kind not in DERIVED_KINDS
                score = EXACT_SCORE if exact else ALIAS_SCORE
                preferred = entry.preferred or code != entry.code
                display = entry.display if code == entry.code else self.display(code)
                best = found.get(code)
                if best is None or (score, preferred) > best[:2]:
                    found[code] = (score, preferred, display)
        return rank_candidates(
            (
                CandidateCode(self.data.url, code, display, score, source=self.data.name)
                for code, (score, _, display) in found.items()
            ),
            preferred={code for code, (_, preferred, _) in found.items() if preferred},
        )[:limit]

    def display(self, code: str) -> str | None:
        return self._display.get(code)


def rank_candidates(candidates: Iterable[CandidateCode], preferred: set[str] | None = None) -> list[CandidateCode]:
    """Best score first; ties go to preferred codes, then to the more specific (longer) code, then by code."""
    preferred = preferred or set()
    return sorted(candidates, key=lambda c: (-round(c.score, 6), c.code not in preferred, -len(c.code), c.code))


def min_scores(
    terminology: Terminology | None, systems: Sequence[str], label: str, min_score: float | None
) -> dict[str, float]:
    """Per system, the score under which a code is not written for ``label``.

    The profile's ``min_score`` when it sets one; else the threshold the terminology calibrated for that
    system and label (``threshold(system, label)``, optional in the protocol); else :data:`DEFAULT_MIN_SCORE`.
    """
    found: dict[str, float] = {}
    ask = getattr(terminology, "threshold", None)
    for system in systems:
        value = min_score
        if value is None and callable(ask):
            calibrated = ask(system, label)
            value = float(calibrated) if calibrated is not None else None
        found[system] = DEFAULT_MIN_SCORE if value is None else value
    return found


def code_request(
    text: str, label: str, options: Any, language: str | None, floors: Mapping[str, float] | None = None
) -> CodeRequest:
    """The request a label's ``codes`` options (:class:`mappings.profile.CodeOptions`) make for a mention (its
    :func:`coded_text`); ``floors``: the minimum scores it will be written with (:func:`min_scores`), when only
    written codes matter."""
    prefixes = {name: tuple(values) for name, values in options.prefixes.items()}
    floor = tuple(sorted(floors.items())) if floors else ()
    return CodeRequest(
        coded_text(text, label), label, tuple(options.systems), language, prefixes, options.categories, floor
    )


def written_codes(
    candidates: Sequence[CandidateCode],
    options: Any,
    label: str,
    terminology: Terminology | None,
    custom: Iterable[str] = (),
) -> tuple[CandidateCode, ...]:
    """The codings a resource carries for these candidates under a label's ``codes`` options."""
    minimum = min_scores(terminology, options.systems, label, options.min_score)
    return select_codes(candidates, options.systems, minimum, custom, options.all_systems)


def select_codes(
    candidates: Sequence[CandidateCode],
    systems: Sequence[str],
    min_score: float | Mapping[str, float],
    custom: Iterable[str] = (),
    all_systems: bool = False,
) -> tuple[CandidateCode, ...]:
    """The codings a resource carries: none below ``min_score``; systems the profile adds win over built-ins.

    Systems are tried in the label's order, the profile's own (``custom``) ones before the built-in ones. A system
    answers with its first candidate (``candidates`` are best first: the terminology's ranking, which a re-ranker
    may have reordered) when that candidate's score reaches the minimum. With ``all_systems`` each system that
    answers contributes its code; otherwise the first one does.
    """
    custom_names = set(custom)
    order = [s for s in systems if s in custom_names] + [s for s in systems if s not in custom_names]
    chosen: list[CandidateCode] = []
    for system in order:
        minimum = min_score if isinstance(min_score, int | float) else min_score.get(system, DEFAULT_MIN_SCORE)
        best = next((c for c in candidates if c.source == system), None)
        if best is None or best.score < minimum:
            continue
        if all(c.system != best.system or c.code != best.code for c in chosen):
            chosen.append(best)
        if not all_systems:
            break
    return tuple(chosen)


# --------------------------------------------------------------------------------------------------
# Code systems that integration engineers add: a CSV, or a FHIR CodeSystem resource
# --------------------------------------------------------------------------------------------------
CSV_COLUMNS = ("code", "display", "synonyms", "language")


def parse_code_csv(text: str, name: str, url: str) -> CodeSystemData:
    """``code,display,synonyms,language`` with a header row; synonyms separated by ``|``.

    ``language`` (optional, e.g. ``es``) applies to the display and synonyms of that row: as text they then
    match only notes in that language. A code may appear on several rows (e.g. one per language).
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = [column.strip().lower() for column in next(reader)]
    except StopIteration:
        raise TerminologyError(f"{name}: the CSV is empty") from None
    missing = [column for column in ("code", "display") if column not in header]
    if missing:
        raise TerminologyError(
            f"{name}: the CSV header lacks {', '.join(missing)} (expected columns: {', '.join(CSV_COLUMNS)})"
        )
    unknown = [column for column in header if column not in CSV_COLUMNS]
    if unknown:
        raise TerminologyError(f"{name}: unknown CSV column(s) {', '.join(unknown)} (known: {', '.join(CSV_COLUMNS)})")
    column = {key: header.index(key) for key in header}
    entries: list[TermEntry] = []
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise TerminologyError(f"{name}: line {line} has {len(row)} fields, the header {len(header)}")
        cells = {key: (row[index].strip() if index < len(row) else "") for key, index in column.items()}
        code, display = cells["code"], cells["display"]
        if not code or not display:
            raise TerminologyError(f"{name}: line {line} needs a code and a display")
        if code != " ".join(code.split()):
            raise TerminologyError(f"{name}: line {line}: code {code!r} contains whitespace runs")
        language = cells.get("language") or None
        entries.append(TermEntry(code, display, display, "display", language))
        for synonym in (cells.get("synonyms") or "").split("|"):
            if synonym.strip():
                entries.append(TermEntry(code, display, synonym.strip(), "synonym", language))
    if not entries:
        raise TerminologyError(f"{name}: the CSV has no codes")
    return CodeSystemData(name, url, tuple(entries))


def parse_code_system(resource: Any, name: str, url: str | None = None) -> CodeSystemData:
    """A FHIR ``CodeSystem`` (R4/R4B/R5 JSON as a dict): nested concepts, their displays and designations."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "CodeSystem":
        raise TerminologyError(f"{name}: expected a FHIR CodeSystem resource")
    system_url = url or resource.get("url")
    if not system_url:
        raise TerminologyError(f"{name}: the CodeSystem has no url (set `system` in the profile)")
    default_language = resource.get("language")
    entries: list[TermEntry] = []

    def walk(concepts: Any, path: str) -> None:
        if not isinstance(concepts, list):
            raise TerminologyError(f"{name}: {path} must be a list")
        for index, concept in enumerate(concepts):
            where = f"{path}[{index}]"
            if not isinstance(concept, dict) or not concept.get("code"):
                raise TerminologyError(f"{name}: {where} has no code")
            code = str(concept["code"])
            display = str(concept.get("display") or "")
            children = concept.get("concept") or []
            if display:
                entries.append(TermEntry(code, display, display, "display", default_language, not children))
            for designation in concept.get("designation") or []:
                value = (designation or {}).get("value")
                if value:
                    entries.append(
                        TermEntry(
                            code,
                            display or str(value),
                            str(value),
                            "synonym",
                            designation.get("language") or default_language,
                            not children,
                        )
                    )
            walk(children, f"{where}.concept")

    walk(resource.get("concept") or [], "concept")
    if not entries:
        raise TerminologyError(f"{name}: the CodeSystem has no concepts with a display or designation")
    return CodeSystemData(name, str(system_url), tuple(entries), resource.get("version"))
