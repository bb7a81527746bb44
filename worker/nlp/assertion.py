"""Assertion detection: what the note says about each mention (present, negated, possible, ...).

"No fever" must never become a fever in the problem list. The tagger finds mentions; this module
decides, for each one, whether the note asserts it, denies it, doubts it, makes it conditional, puts
it in the past, or attributes it to a relative. It is the ConText algorithm (Harkema et al. 2009,
a generalisation of NegEx), driven by one readable YAML rule file per language in
``worker/nlp/assertion_rules/``:

* **Triggers** (``rules``) are phrases with a category and a direction. A *forward* trigger covers
  the words after it, a *backward* one the words before it, a *bidirectional* one both.
* **Scope** runs from the trigger for at most ``max_scope`` word tokens, and stops earlier at a
  sentence boundary, a section header, a *terminator* ("but", "pero", "maar", ...), or another
  trigger of a different category that is not directly adjacent ("no | history of" chains, so "no
  history of X" is negated, while "denies pain, history of MI" keeps MI out of the negation).
  A terminator may end only some categories: Spanish "con" ends a negation ("sin fiebre con tos")
  but not a relative ("madre con diabetes").
* **Pseudo-triggers** ("no increase", "sin cambios", "gram negative") are matched like triggers
  and then ignored, so the trigger words inside them do nothing.
* **Section headers** at the start of a line ("Antecedentes familiares:", "PMH:") end every scope
  and may give their section a default category. A header alone on its line applies until the
  next known header or a blank line; a header with text after its colon applies to that line.
* A trigger inside the mention itself ("ausencia de pulsos" tagged as one finding) is ignored.

When several categories apply to one mention, a fixed priority decides (``PRIORITY``): negated >
family > hypothetical > possible > historical > present. Negation comes first so that nothing the
note denies ever becomes a *positive* resource, for the patient or for a relative: "sin antecedentes
familiares de cardiopatía" / "no family history of CAD" must not create a FamilyMemberHistory of
heart disease, and "no history of", "no suspicion of" deny the temporal or modal qualifier too.
The experiencer comes next because it decides whose record a mention belongs to: a relative's
condition must never become the patient's, whatever its tense or certainty. A conditional outranks
a possibility ("if pneumonia is suspected"), and doubt outranks the past ("previous suspected MI").
A fixed order is predictable for the clinicians who edit the rules; "nearest trigger wins" would
make "no history of diabetes" historical. ``classify`` also returns every category that applied
(``cues``), so a caller can, for instance, drop a mention that is both family and negated.

Matching is case-insensitive and on word boundaries. For languages whose file sets
``fold_diacritics: true`` a phrase also matches with or without its accents ("tío"/"tio",
"fără"/"fara"); a rule marked ``exact: true`` keeps its accents ("sí" (yes) is not "si" (if)).
A phrase may hold ``{a|b}`` groups ("accompanied by {his|her} {wife|husband}") that expand to
every combination. All phrases of a language are compiled once into trie-shaped regular
expressions, matched against a lower-cased (and, where folding, accent-stripped) copy of the note
that is aligned character for character with it, so offsets need no mapping.

Nothing here logs note text: log lines carry counts, offsets, lengths and language codes only.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from mappings.mentions import Mention

__all__ = [
    "CATEGORIES",
    "DIRECTIONS",
    "PRIORITY",
    "AssertionDetector",
    "AssertionResult",
    "AssertionRulesError",
    "LanguageRules",
    "default_detector",
    "detect_assertions",
    "detect_language",
]

LOGGER = logging.getLogger("fhir_ner.assertion")

PRESENT = "present"
#: Trigger categories, in priority order: the first one that applies to a mention wins.
PRIORITY: tuple[str, ...] = ("negated", "family", "hypothetical", "possible", "historical")
#: Cues that say a condition is over ("neumonía resuelta", "in remission"). They are not assertions: they
#: qualify one (``AssertionResult.resolution``), do not end the scope of other triggers ("antecedentes de
#: neumonía resuelta y diabetes": diabetes stays historical), and remission outranks resolved.
RESOLUTION_CUES: tuple[str, ...] = ("remission", "resolved")
CATEGORIES: frozenset[str] = frozenset(PRIORITY + RESOLUTION_CUES)
DIRECTIONS: tuple[str, ...] = ("forward", "backward", "bidirectional")
DEFAULT_MAX_SCOPE = 8
#: Hard cap on any scope, whatever a rule file says, so a run-on sentence costs little.
MAX_SCOPE_CAP = 50
#: Language detection reads at most this many characters: enough for a stable vote, cheap on long notes.
DETECTION_SAMPLE_CHARS = 20_000
DEFAULT_LANGUAGE = "en"

_THREE_LETTER = {
    "spa": "es", "eng": "en", "ita": "it", "nld": "nl", "dut": "nl",
    "ron": "ro", "rum": "ro", "mol": "ro", "swe": "sv", "ces": "cs", "cze": "cs",
}  # fmt: skip
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")
_WORD = re.compile(r"\w+")
_LETTERS = re.compile(r"[^\W\d_]+")
_COMBINING = re.compile(r"[\u0300-\u036f]")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)|\n")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")

_TOP_KEYS = {
    "language", "name", "fold_diacritics", "max_scope", "rules", "pseudo", "terminators", "sections", "detection",
}
_RULE_KEYS = {"phrase", "category", "direction", "max_scope", "exact"}
_SECTION_KEYS = {"header", "category", "exact"}


class AssertionRulesError(ValueError):
    """A rule file is missing or invalid; the message names the file and the field."""


# --------------------------------------------------------------------------------------------- folding


def _build_fold_table() -> dict[str, str]:
    """Map each lower-case accented Latin letter to its base letter (ñ stays: "año" is not "ano").

    Latin-1 and Latin Extended-A cover the shipped languages; ș/ț (Romanian comma-below) are added.
    """
    table: dict[str, str] = {}
    for codepoint in list(range(0xC0, 0x180)) + list(range(0x218, 0x21C)):
        char = chr(codepoint).lower()
        if len(char) != 1 or char == "ñ":
            continue
        base = "".join(c for c in unicodedata.normalize("NFD", char) if not unicodedata.combining(c))
        if len(base) == 1 and base.isascii() and base.isalpha() and base != char:
            table[char] = base
    return table


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_FOLD = _build_fold_table()
_FOLD_TRANSLATION = str.maketrans(_FOLD)


def _normalise_phrase(phrase: str) -> str:
    """NFC, lower case, single spaces: the form phrases are compared and looked up in."""
    return " ".join(unicodedata.normalize("NFC", phrase).lower().split())


def _fold(text: str) -> str:
    return text.translate(_FOLD_TRANSLATION)


_CLUSTER = re.compile(r".?[\u0300-\u036f]+", re.DOTALL)


def _nfc_with_offsets(text: str) -> tuple[str, list[int] | None]:
    """NFC-compose ``text`` when it holds combining marks; return the new text and new→old offsets.

    Most notes are already NFC, and then the text is returned as is (offsets map to themselves).
    Only the base+marks clusters are composed; the stretches between them are copied in bulk.
    """
    if not _COMBINING.search(text):
        return text, None
    pieces: list[str] = []
    origin: list[int] = []
    position = 0
    for match in _CLUSTER.finditer(text):
        start, end = match.span()
        pieces.append(text[position:start])
        origin.extend(range(position, start))
        composed = unicodedata.normalize("NFC", match.group())
        pieces.append(composed)
        origin.extend([start] * len(composed))
        position = end
    pieces.append(text[position:])
    origin.extend(range(position, len(text) + 1))
    return "".join(pieces), origin


# --------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A trigger phrase: its category, the side it looks at, and how many words it reaches."""

    phrase: str
    category: str
    direction: str
    max_scope: int
    exact: bool = False


@dataclass(frozen=True)
class SectionRule:
    """A section header; ``category`` None means a neutral section that only ends the previous one."""

    header: str
    category: str | None
    exact: bool = False


@dataclass(frozen=True)
class _Entry:
    """What a matched phrase is: a trigger (``rule``), a pseudo-trigger, or a terminator."""

    kind: str  # "trigger" | "pseudo" | "terminator"
    rule: Rule | None = None
    ends: frozenset[str] = frozenset()  # for a terminator: the categories whose scope it ends


class _Trie:
    """Builds one regular expression from many phrases, sharing prefixes (much faster than a flat ``a|b|c``)."""

    def __init__(self) -> None:
        self.root: dict[str, Any] = {}

    def add(self, units: Sequence[str]) -> None:
        node = self.root
        for unit in units:
            node = node.setdefault(unit, {})
        node[""] = {}

    def pattern(self) -> str:
        return self._emit(self.root)

    def _emit(self, node: dict[str, Any]) -> str:
        ends_here = "" in node
        branches = [unit + self._emit(child) for unit, child in sorted(node.items()) if unit]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends_here:
            return "(?:" + body + ")?"
        return body


def _phrase_units(phrase: str) -> list[str]:
    """Regex units of a normalised phrase: each character, and ``\\s+`` for a space (line breaks match too)."""
    return [r"\s+" if char == " " else re.escape(char) for char in phrase]


def _compile(phrases: Iterable[str], *, header: bool = False) -> re.Pattern[str] | None:
    """One trie-shaped pattern for all phrases, on whole words; for headers, anchored at a line start."""
    trie = _Trie()
    for phrase in phrases:
        trie.add(_phrase_units(phrase))
    body = trie.pattern()
    if not body:
        return None
    if header:
        # At a line start, after optional bullets or numbering; then a colon, or nothing else on the line.
        return re.compile(
            r"^[ \t]*(?:[-*•#>]+[ \t]*|\d{1,2}[.)][ \t]*)?(?P<h>" + body + r")(?:[ \t]*:|(?=[ \t\r]*$))",
            re.MULTILINE,
        )
    # Not inside a word: no letter before a phrase that starts with one, none after one that ends with one
    # (so ", una" and "(madre)" match right after or before a word).
    return re.compile(r"(?:(?<!\w)|(?!\w))(?P<h>" + body + r")(?:(?!\w)|(?<!\w))")


class _Matcher:
    """Finds phrases in a note: plain ones in the accent-folded text, ``exact`` ones in the lower-cased text.

    Both texts are character-for-character aligned with the note, so offsets need no mapping. Matching
    folded text (instead of compiling accent classes into the pattern) keeps compilation fast.
    """

    def __init__(self, folded: Mapping[str, Any], exact: Mapping[str, Any], *, header: bool = False) -> None:
        self.folded = dict(folded)
        self.exact = dict(exact)
        self._folded_re = _compile(self.folded, header=header)
        self._exact_re = _compile(self.exact, header=header)

    def find(self, lower: str, folded: str) -> list[tuple[int, int, Any]]:
        """Leftmost-longest, non-overlapping matches as (start, end, value)."""
        hits: list[tuple[int, int, int, Any]] = []
        passes = ((self._exact_re, lower, self.exact, 0), (self._folded_re, folded, self.folded, 1))
        for pattern, text, table, rank in passes:
            if pattern is None:
                continue
            for match in pattern.finditer(text):
                value = table.get(" ".join(match.group("h").split()))
                if value is not None:
                    hits.append((match.start("h"), match.end(), rank, value))
        if self._folded_re is not None and self._exact_re is not None:
            hits.sort(key=lambda hit: (hit[0], hit[0] - hit[1], hit[2]))  # leftmost, longest, exact first
        kept: list[tuple[int, int, Any]] = []
        for start, end, _, value in hits:
            if not kept or start >= kept[-1][1]:
                kept.append((start, end, value))
        return kept


def _lower(text: str) -> str:
    """Lower case, one character for one (a character whose lower case is longer, like "İ", is kept)."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


@dataclass
class LanguageRules:
    """The validated and compiled rules of one language."""

    language: str
    name: str
    fold_diacritics: bool
    max_scope: int
    rules: list[Rule]
    pseudo: list[tuple[str, bool]]
    terminators: list[tuple[str, bool, frozenset[str]]]
    sections: list[SectionRule]
    stopwords: frozenset[str]
    characters: str
    source: str = ""
    phrases: _Matcher = field(init=False, repr=False)
    headers: _Matcher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        entries: list[tuple[str, bool, _Entry]] = [(r.phrase, r.exact, _Entry("trigger", r)) for r in self.rules]
        entries += [(p, exact, _Entry("pseudo")) for p, exact in self.pseudo]
        entries += [(t, exact, _Entry("terminator", ends=cats)) for t, exact, cats in self.terminators]
        exact: dict[str, Any] = {}
        folded: dict[str, Any] = {}
        for phrase, is_exact, entry in entries:
            self._register(phrase, is_exact, entry, exact, folded, "phrase")
        self.phrases = _Matcher(folded, exact)
        exact, folded = {}, {}
        for section in self.sections:
            self._register(section.header, section.exact, section, exact, folded, "header")
        self.headers = _Matcher(folded, exact, header=True)

    def _register(self, phrase: str, exact: bool, value: Any, exact_map: dict[str, Any],
                  folded_map: dict[str, Any], what: str) -> None:
        """Index a phrase for lookup after a match; a phrase listed twice is an error.

        With folding, plain phrases are keyed by their folded letters ("tío" and "tio" are the same
        entry); ``exact`` phrases by their spelling. Where an exact and a plain phrase match the same
        text, the exact one wins (Romanian "absența" (the absence of) vs "absentă" (absent)).
        """
        fold = self.fold_diacritics
        table, key = (exact_map, phrase) if exact or not fold else (folded_map, _fold(phrase))
        if key in table:
            raise AssertionRulesError(
                f"{self.source}: {what} {phrase!r} is listed twice"
                f"{' (or matches the same text as another entry once accents are ignored)' if fold else ''}; keep one"
            )
        table[key] = value


# --------------------------------------------------------------------------------------------- loading


def _fail(source: str, where: str, message: str) -> AssertionRulesError:
    return AssertionRulesError(f"{source}: {where}: {message}")


_ALTERNATIVES = re.compile(r"\{([^{}]*)\}")
MAX_EXPANSIONS = 500


def _expand(phrase: str) -> list[str]:
    """'accompanied by {his|her} {wife|husband}' -> the four phrases; '{|very }likely' allows an empty choice."""
    match = _ALTERNATIVES.search(phrase)
    if match is None:
        return [phrase]
    head, tail = phrase[: match.start()], phrase[match.end() :]
    return [expanded for choice in match.group(1).split("|") for expanded in _expand(head + choice + tail)]


def _phrases(value: Any, source: str, where: str) -> list[str]:
    """A phrase field is one string or a list of variants (inflections, spellings); ``{a|b}`` expands."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(source, where, "expected a phrase or a non-empty list of phrases")
    phrases: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise _fail(source, where, f"expected a non-empty string, got {item!r}")
        if item.count("{") != item.count("}") or item.count("{") > 4:
            raise _fail(source, where, f"unbalanced or too many {{a|b}} groups in {item!r}")
        expanded = [_normalise_phrase(p) for p in _expand(item)]
        if len(expanded) > MAX_EXPANSIONS or not all(expanded):
            raise _fail(source, where, f"{item!r} expands to empty phrases or more than {MAX_EXPANSIONS} phrases")
        phrases.extend(dict.fromkeys(expanded))
    return phrases


def _check_keys(data: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(source, where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _scope(value: Any, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SCOPE_CAP:
        raise _fail(source, where, f"expected a whole number of words from 1 to {MAX_SCOPE_CAP}, got {value!r}")
    return value


def _string_list(value: Any, source: str, where: str, *, with_categories: bool = False
                 ) -> list[tuple[str, bool, frozenset[str]]]:
    """Terminators and pseudo-triggers: strings, or ``{phrase: ..., exact: true}`` mappings.

    A terminator may name the ``categories`` it ends (default all): Spanish "con" ends a negation
    ("sin fiebre con tos") but not a relative ("madre con diabetes").
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(source, where, "expected a list of phrases")
    out: list[tuple[str, bool, frozenset[str]]] = []
    allowed = {"phrase", "exact", "categories"} if with_categories else {"phrase", "exact"}
    for index, item in enumerate(value):
        if isinstance(item, dict):
            _check_keys(item, allowed, source, f"{where}[{index}]")
            exact = item.get("exact", False)
            if not isinstance(exact, bool):
                raise _fail(source, f"{where}[{index}].exact", f"expected true or false, got {exact!r}")
            categories = item.get("categories", sorted(CATEGORIES))
            if not isinstance(categories, list) or not categories or not set(categories) <= CATEGORIES:
                raise _fail(source, f"{where}[{index}].categories",
                            f"expected a list drawn from {', '.join(PRIORITY)}, got {categories!r}")
            phrases = _phrases(item.get("phrase"), source, f"{where}[{index}].phrase")
            out += [(p, exact, frozenset(categories)) for p in phrases]
        else:
            out += [(p, False, CATEGORIES) for p in _phrases(item, source, f"{where}[{index}]")]
    return out


def parse_rules(data: Any, source: str, expected_language: str | None = None) -> LanguageRules:
    """Validate one rule file's content; every error names ``source`` and the offending field."""
    if not isinstance(data, dict):
        raise AssertionRulesError(f"{source}: expected a mapping at the top level")
    _check_keys(data, _TOP_KEYS, source, "top level")
    language = data.get("language")
    if not isinstance(language, str) or not re.fullmatch(r"[a-z]{2,3}", language):
        raise _fail(source, "language", f"expected a two- or three-letter code such as 'es', got {language!r}")
    if expected_language is not None and language != expected_language:
        raise _fail(source, "language", f"{language!r} does not match the file name ({expected_language}.yaml)")
    fold = data.get("fold_diacritics", False)
    if not isinstance(fold, bool):
        raise _fail(source, "fold_diacritics", f"expected true or false, got {fold!r}")
    max_scope = _scope(data.get("max_scope", DEFAULT_MAX_SCOPE), source, "max_scope")

    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise _fail(source, "rules", "expected a non-empty list of trigger rules")
    rules: list[Rule] = []
    for index, raw in enumerate(raw_rules):
        where = f"rules[{index}]"
        if not isinstance(raw, dict):
            raise _fail(source, where, "expected a mapping with phrase, category, direction")
        _check_keys(raw, _RULE_KEYS, source, where)
        category = raw.get("category")
        if category not in CATEGORIES:
            raise _fail(source, f"{where}.category", f"expected one of {', '.join(PRIORITY)}, got {category!r}")
        direction = raw.get("direction")
        if direction not in DIRECTIONS:
            raise _fail(source, f"{where}.direction", f"expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
        scope = _scope(raw["max_scope"], source, f"{where}.max_scope") if "max_scope" in raw else max_scope
        exact = raw.get("exact", False)
        if not isinstance(exact, bool):
            raise _fail(source, f"{where}.exact", f"expected true or false, got {exact!r}")
        for phrase in _phrases(raw.get("phrase"), source, f"{where}.phrase"):
            rules.append(Rule(phrase, str(category), str(direction), scope, exact))

    sections: list[SectionRule] = []
    raw_sections = data.get("sections") or []
    if not isinstance(raw_sections, list):
        raise _fail(source, "sections", "expected a list of {header, category}")
    for index, raw in enumerate(raw_sections):
        where = f"sections[{index}]"
        if not isinstance(raw, dict):
            raise _fail(source, where, "expected a mapping with header and an optional category")
        _check_keys(raw, _SECTION_KEYS, source, where)
        category = raw.get("category")
        if category is not None and category not in CATEGORIES:
            raise _fail(source, f"{where}.category",
                        f"expected one of {', '.join(PRIORITY)} or nothing (a neutral section), got {category!r}")
        exact = raw.get("exact", False)
        if not isinstance(exact, bool):
            raise _fail(source, f"{where}.exact", f"expected true or false, got {exact!r}")
        for header in _phrases(raw.get("header"), source, f"{where}.header"):
            sections.append(SectionRule(header, category, exact))

    detection = data.get("detection") or {}
    if not isinstance(detection, dict):
        raise _fail(source, "detection", "expected a mapping with stopwords and characters")
    _check_keys(detection, {"stopwords", "characters"}, source, "detection")
    stopwords = detection.get("stopwords", "")
    if isinstance(stopwords, str):
        stopwords = stopwords.split()
    if not isinstance(stopwords, list) or not all(isinstance(w, str) for w in stopwords):
        raise _fail(source, "detection.stopwords", "expected a list (or a space-separated string) of words")
    characters = detection.get("characters", "")
    if not isinstance(characters, str):
        raise _fail(source, "detection.characters", f"expected a string of characters, got {characters!r}")
    name = data.get("name", language)
    return LanguageRules(
        language=language,
        name=str(name),
        fold_diacritics=fold,
        max_scope=max_scope,
        rules=rules,
        pseudo=[(p, exact) for p, exact, _ in _string_list(data.get("pseudo"), source, "pseudo")],
        terminators=_string_list(data.get("terminators"), source, "terminators", with_categories=True),
        sections=sections,
        stopwords=frozenset(unicodedata.normalize("NFC", w).lower() for w in stopwords),
        characters=unicodedata.normalize("NFC", characters),
        source=source,
    )


def load_rules_file(path: Path) -> LanguageRules:
    """Read and validate one ``<language>.yaml``."""
    source = str(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except OSError as exc:
        raise AssertionRulesError(f"{source}: cannot be read ({exc.strerror or type(exc).__name__})") from exc
    except yaml.YAMLError as exc:
        raise AssertionRulesError(f"{source}: not valid YAML ({exc})") from exc
    return parse_rules(data, source, expected_language=path.stem)


# --------------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class AssertionResult:
    """The assertion of one span, and every category that applied to it (before the priority chose)."""

    assertion: str
    cues: frozenset[str] = frozenset()
    resolution: str | None = None  # "resolved" or "remission" when a resolution cue applied


@dataclass(frozen=True)
class _Trigger:
    start: int
    end: int
    rule: Rule


def _ends_scope(other: _Trigger, trigger: _Trigger) -> bool:
    """A trigger of another category ends a scope, except a resolution cue inside an assertion's scope."""
    category = other.rule.category
    return category != trigger.rule.category and not (
        category in RESOLUTION_CUES and trigger.rule.category not in RESOLUTION_CUES
    )


@dataclass(frozen=True)
class _Scope:
    start: int
    end: int
    trigger: _Trigger


class _Note:
    """Everything computed once per note: matches, sentence breaks, tokens, sections, scopes."""

    def __init__(self, text: str, rules: LanguageRules) -> None:
        self.text = text
        self.rules = rules
        self.lower = _lower(text)
        self.folded = _fold(self.lower) if rules.fold_diacritics else self.lower
        self.triggers: list[_Trigger] = []
        # per category: start and end offsets of the terminators that end its scopes
        self.term_starts: dict[str, list[int]] = {c: [] for c in CATEGORIES}
        self.term_ends: dict[str, list[int]] = {c: [] for c in CATEGORIES}
        self.breaks: list[int] = []
        self.sections: list[tuple[int, int, str]] = []
        self.header_spans: list[tuple[int, int]] = []
        self._find_sections()
        self._find_phrases()
        self._find_breaks()
        self.token_starts: list[int] = []
        self.token_ends: list[int] = []
        if self.triggers:
            spans = [match.span() for match in _WORD.finditer(text)]
            self.token_starts = [span[0] for span in spans]
            self.token_ends = [span[1] for span in spans]
        self.scopes = sorted((s for t in range(len(self.triggers)) for s in self._scopes_of(t)),
                             key=lambda s: s.start)
        self.scope_starts = [s.start for s in self.scopes]
        self.longest_scope = max((s.end - s.start for s in self.scopes), default=0)
        self.section_starts = [s[0] for s in self.sections]

    def _find_sections(self) -> None:
        text = self.text
        headers: list[tuple[int, int, SectionRule]] = []
        for start, end, section in self.rules.headers.find(self.lower, self.folded):
            headers.append((start, end, section))
        for index, (start, end, section) in enumerate(headers):
            self.header_spans.append((start, end))
            line_end = text.find("\n", end)
            line_end = len(text) if line_end < 0 else line_end
            if text[end:line_end].strip():
                stop = line_end  # "Family history: mother with diabetes." covers its own line
            else:
                next_header = headers[index + 1][0] if index + 1 < len(headers) else len(text)
                blank = _BLANK_LINE.search(text, line_end)
                stop = min(next_header, blank.start() if blank else len(text))
            if section.category is not None:
                self.sections.append((end, stop, section.category))

    def _inside_header(self, start: int, end: int) -> bool:
        at = bisect.bisect_right(self.header_spans, (start, len(self.text) + 1)) - 1
        return at >= 0 and end <= self.header_spans[at][1]

    def _find_phrases(self) -> None:
        for start, end, entry in self.rules.phrases.find(self.lower, self.folded):
            if entry.kind == "pseudo":
                continue
            if self.header_spans and self._inside_header(start, end):
                continue  # "History of present illness:" is a header, not a trigger
            if entry.kind == "terminator":
                for category in entry.ends:
                    self.term_starts[category].append(start)
                    self.term_ends[category].append(end)
            elif entry.rule is not None:
                self.triggers.append(_Trigger(start, end, entry.rule))

    def _find_breaks(self) -> None:
        """Sentence boundaries (offsets where a sentence ends) plus both edges of each section header."""
        text = self.text
        length = len(text)
        breaks: list[int] = []
        for match in _SENTENCE_END.finditer(text):
            if match.group() == "\n":
                if not self._line_continues(match.start()):
                    breaks.append(match.start())
                continue
            # ". " ends a sentence unless the next word starts in lower case ("p. ej.", "aprox. dos")
            after = match.end()
            while after < length and text[after].isspace():
                after += 1
            if after >= length or not text[after].islower():
                breaks.append(match.end())
        for start, end in self.header_spans:
            breaks.extend((start, end))
        self.breaks = sorted(set(breaks))

    def _line_continues(self, newline: int) -> bool:
        """A hard-wrapped line: the previous line ends in a word or comma and the next starts in lower case."""
        text = self.text
        before = newline - 1
        while before >= 0 and text[before] in " \t\r":
            before -= 1
        after = newline + 1
        while after < len(text) and text[after] in " \t\r":
            after += 1
        if before < 0 or after >= len(text):
            return False
        return (text[before].isalnum() or text[before] == ",") and text[after].islower()

    def _scopes_of(self, index: int) -> list[_Scope]:
        trigger = self.triggers[index]
        direction = trigger.rule.direction
        scopes: list[_Scope] = []
        if direction in ("forward", "bidirectional"):
            end = self._forward_end(index)
            if end > trigger.end:
                scopes.append(_Scope(trigger.end, end, trigger))
        if direction in ("backward", "bidirectional"):
            start = self._backward_start(index)
            if start < trigger.start:
                scopes.append(_Scope(start, trigger.start, trigger))
        return scopes

    def _forward_end(self, index: int) -> int:
        trigger = self.triggers[index]
        text = self.text
        limit = len(text)
        first = bisect.bisect_left(self.token_starts, trigger.end)
        last = first + trigger.rule.max_scope - 1
        if last < len(self.token_ends):
            limit = self.token_ends[last]
        brk = bisect.bisect_right(self.breaks, trigger.end)
        if brk < len(self.breaks):
            limit = min(limit, self.breaks[brk])
        starts = self.term_starts[trigger.rule.category]
        term = bisect.bisect_left(starts, trigger.end)
        if term < len(starts):
            limit = min(limit, starts[term])
        chain_end = trigger.end
        for position in range(index + 1, len(self.triggers)):  # no slicing: a note may hold many triggers
            other = self.triggers[position]
            if other.start >= limit:
                break
            if other.start < chain_end:
                chain_end = max(chain_end, other.end)
                continue
            if _ends_scope(other, trigger) and text[chain_end:other.start].strip():
                limit = other.start  # "denies pain, history of MI": the negation stops at "history of"
                break
            if not text[chain_end:other.start].strip():
                chain_end = other.end  # "no | family history of": adjacent triggers chain
        return limit

    def _backward_start(self, index: int) -> int:
        trigger = self.triggers[index]
        text = self.text
        limit = 0
        last = bisect.bisect_right(self.token_ends, trigger.start) - 1
        first = last - trigger.rule.max_scope + 1
        if first >= 0:
            limit = self.token_starts[first]
        brk = bisect.bisect_right(self.breaks, trigger.start) - 1
        if brk >= 0:
            limit = max(limit, self.breaks[brk])
        ends = self.term_ends[trigger.rule.category]
        term = bisect.bisect_right(ends, trigger.start) - 1
        if term >= 0:
            limit = max(limit, ends[term])
        chain_start = trigger.start
        for position in range(index - 1, -1, -1):
            other = self.triggers[position]
            if other.end <= limit:
                break
            if other.end > chain_start:
                chain_start = min(chain_start, other.start)
                continue
            if _ends_scope(other, trigger) and text[other.end:chain_start].strip():
                limit = other.end
                break
            if not text[other.end:chain_start].strip():
                chain_start = other.start
        return limit

    def classify(self, start: int, end: int) -> AssertionResult:
        cues: set[str] = set()
        low = bisect.bisect_left(self.scope_starts, start - self.longest_scope)
        high = bisect.bisect_left(self.scope_starts, end)
        for scope in self.scopes[low:high]:
            trigger = scope.trigger
            if scope.end <= start or (trigger.start < end and start < trigger.end):
                continue  # out of reach, or the trigger is part of the mention itself
            cues.add(trigger.rule.category)
        if self.sections:
            at = bisect.bisect_right(self.section_starts, start) - 1
            if at >= 0 and start < self.sections[at][1]:  # sections do not overlap: the last one before decides
                cues.add(self.sections[at][2])
        assertion = next((c for c in PRIORITY if c in cues), PRESENT)
        resolution = next((c for c in RESOLUTION_CUES if c in cues), None)
        return AssertionResult(assertion, frozenset(cues), resolution)


class AssertionDetector:
    """ConText assertion detection for the languages of a rule folder (es, en, it, nl, ro, sv, cs shipped)."""

    def __init__(self, rules: Mapping[str, LanguageRules], default_language: str = DEFAULT_LANGUAGE) -> None:
        if not rules:
            raise AssertionRulesError("no assertion rules loaded")
        self._rules = dict(rules)
        self.default_language = default_language if default_language in self._rules else sorted(self._rules)[0]
        self._warned: set[str] = set()
        self._stopword_weights: dict[str, list[tuple[str, float]]] = {}
        owners: dict[str, list[str]] = {}
        for language, language_rules in self._rules.items():
            for word in language_rules.stopwords:
                owners.setdefault(word, []).append(language)
        for word, languages in owners.items():
            # a word shared by k languages counts 1/k for each: "de" says little, "het" says Dutch
            self._stopword_weights[word] = [(language, 1.0 / len(languages)) for language in languages]

    @classmethod
    def from_rules_dir(cls, path: str | Path | None = None, default_language: str = DEFAULT_LANGUAGE
                       ) -> AssertionDetector:
        """Load and validate every ``*.yaml`` of ``path`` (default: the shipped rules) once."""
        folder = Path(path) if path is not None else Path(str(resources.files("worker.nlp") / "assertion_rules"))
        if not folder.is_dir():
            raise AssertionRulesError(f"{folder}: not a folder of assertion rule files")
        files = sorted(folder.glob("*.yaml"))
        if not files:
            raise AssertionRulesError(f"{folder}: holds no *.yaml assertion rule files")
        return cls({f.stem: load_rules_file(f) for f in files}, default_language=default_language)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(sorted(self._rules))

    def rules_for(self, language: str) -> LanguageRules:
        return self._rules[language]

    def detect_language(self, text: str) -> str:
        """Guess the language from stop-word and letter profiles; the default language when there is no evidence."""
        if not isinstance(text, str) or not text.strip():
            return self.default_language
        sample = text[:DETECTION_SAMPLE_CHARS]
        scores = dict.fromkeys(self._rules, 0.0)
        for word in _LETTERS.findall(unicodedata.normalize("NFC", sample).lower()):
            for language, weight in self._stopword_weights.get(word, ()):
                scores[language] += weight
        for language, language_rules in self._rules.items():
            if language_rules.characters:
                scores[language] += 0.25 * sum(sample.count(c) for c in language_rules.characters)
        best = max(scores, key=lambda lang: (scores[lang], lang == self.default_language))
        if scores[best] <= 0:
            LOGGER.debug("no language evidence in a text of %d characters; using %s", len(text), self.default_language)
            return self.default_language
        return best

    def resolve_language(self, language: str | None, text: str) -> str:
        """The DocumentReference's language when we have rules for it, else the language of the text."""
        if language:
            code = _language_code(language)
            if code in self._rules:
                return code
            shown = language[:20] if isinstance(language, str) and _LANGUAGE_TAG.fullmatch(language) else "(malformed)"
            level = logging.DEBUG if shown in self._warned else logging.WARNING  # once per tag, not once per note
            self._warned.add(shown)
            LOGGER.log(level, "no assertion rules for language %s; detecting the language from the text", shown)
        return self.detect_language(text)

    def classify(self, text: str, spans: Sequence[tuple[int, int]], language: str | None = None
                 ) -> list[AssertionResult]:
        """One result per span, in order; bad input never raises and yields ``present``."""
        default = AssertionResult(PRESENT)
        try:
            count = len(spans)
        except TypeError:
            LOGGER.warning("spans is not a sequence (%s); nothing to classify", type(spans).__name__)
            return []
        if not isinstance(text, str):
            LOGGER.warning("note is not a string (%s); %d span(s) marked present", type(text).__name__, count)
            return [default] * count
        if count == 0:
            return []
        try:
            code = self.resolve_language(language, text)
            valid = [_valid_span(span, len(text)) for span in spans]
            bad = sum(1 for v in valid if v is None)
            if bad:
                LOGGER.warning("%d of %d span(s) out of range for a note of %d characters; marked present",
                               bad, count, len(text))
            if bad == count:
                return [default] * count
            composed, origin = _nfc_with_offsets(text)
            note = _Note(composed, self._rules[code])
            results: list[AssertionResult] = []
            for span in valid:
                if span is None:
                    results.append(default)
                    continue
                start, end = span
                if origin is not None:
                    start, end = bisect.bisect_left(origin, start), bisect.bisect_left(origin, end)
                results.append(note.classify(start, end))
            LOGGER.debug("classified %d span(s) in a %s note of %d characters", count, code, len(text))
            return results
        except Exception as exc:  # a bad note must not take the worker down; the type is enough to debug
            LOGGER.error("assertion detection failed (%s) on a note of %d characters; %d span(s) marked present",
                         type(exc).__name__, len(text), count)
            return [default] * count

    def detect(self, text: str, spans: Sequence[tuple[int, int]], language: str | None = None) -> list[str]:
        """One assertion string per span (same order): present, negated, possible, hypothetical, historical, family."""
        return [result.assertion for result in self.classify(text, spans, language)]

    def annotate(self, text: str, mentions: Sequence[Mention], language: str | None = None) -> list[Mention]:
        """The mentions with their ``assertion`` and ``resolution`` filled in (new frozen objects, same order)."""
        results = self.classify(text, [(m.start, m.end) for m in mentions], language)
        return [
            replace(m, assertion=r.assertion, resolution=r.resolution) for m, r in zip(mentions, results, strict=True)
        ]


def _language_code(language: str) -> str:
    """'es-ES', 'ES', 'spa', 'es_AR' → 'es'; anything else → its lower-cased primary subtag."""
    if not isinstance(language, str):
        return ""
    primary = language.strip().replace("_", "-").split("-")[0].lower()
    return _THREE_LETTER.get(primary, primary)


def _valid_span(span: Any, length: int) -> tuple[int, int] | None:
    try:
        start, end = span
    except (TypeError, ValueError):
        return None
    if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
        return None
    if 0 <= start < end <= length:
        return start, end
    return None


@functools.lru_cache(maxsize=1)
def default_detector() -> AssertionDetector:
    """The shipped rules, loaded and compiled once per process."""
    return AssertionDetector.from_rules_dir()


def detect_assertions(text: str, spans: Sequence[tuple[int, int]], language: str | None = None) -> list[str]:
    """Module-level shortcut over :func:`default_detector`."""
    return default_detector().detect(text, spans, language)


def detect_language(text: str) -> str:
    """Module-level shortcut over :func:`default_detector`."""
    return default_detector().detect_language(text)
