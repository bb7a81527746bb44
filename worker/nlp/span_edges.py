"""Span-edge rules: small, named, switchable steps that move a predicted span's edges to where the
annotation guidelines put them (issue 15: strict F1 runs well below character-overlap F1).

The steps work on the note's text and the spans' character offsets only (never on decoded tokens), so
offsets stay exact; a step never returns a span outside the text or an empty one.

Each language has a data file ``span_edge_rules/<lang>.yaml``::

    language: es
    steps: [join_adjacent, trim_function_words]     # the steps applied (always in the order of STEPS)
    leading: [el, la, ...]      # words trimmed from a span's start (trim_function_words)
    trailing: [de, con, ...]    # words trimmed from a span's end (trim_function_words)
    join_gaps: ["", "-"]        # join_adjacent: text allowed between two spans of one label, stripped

Steps:

* ``trim_function_words``: drop leading / trailing function words (articles, prepositions,
  conjunctions). The MultiClinNER / SpaCCC guidelines leave determiners and the connecting words of a
  coordination outside a mention, and no mention ends in a preposition. A span that is nothing but
  function words is dropped.
* ``join_adjacent``: two spans of one label with only whitespace (or a ``join_gaps`` string such as a
  hyphen) between them become one: the tagger tends to break a two-word term ("orotracheal intubation")
  into two B tags, while gold spans of one label are almost never separated by a bare space.

Which steps each language runs was chosen on one half of the validation notes and checked on the other
(``benchmarks/span_edges.py``, README "### The shipped default model").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from worker.nlp.decoding import TaggedSpan, refine_span

RULES_DIR = Path(__file__).with_name("span_edge_rules")
STEPS = ("join_adjacent", "trim_function_words")  # the order they run in
_WORD = re.compile(r"\w+(?:['’]\w+)*")
_MAX_GAP = 3  # characters between two spans that join_adjacent may bridge


class SpanEdgeRulesError(ValueError):
    """A span-edge rule file is invalid; the message names the file and the field."""


def _norm(word: str) -> str:
    return unicodedata.normalize("NFC", word).casefold()


def _listed(word: str, words: frozenset[str]) -> bool:
    """A lower-case word or a capitalised one ("La"); a lone capital ("hepatitis A", "vitamina E") is a name."""
    word = unicodedata.normalize("NFC", word)
    if word.islower():
        return word in words
    return len(word) > 1 and word[0].isupper() and word[1:].islower() and word.lower() in words


@dataclass(frozen=True)
class LanguageEdgeRules:
    """The steps (in the order of ``STEPS``: join first, so that a joined span's edges are trimmed too) and
    word lists of one language."""

    language: str
    steps: tuple[str, ...] = ()
    leading: frozenset[str] = field(default_factory=frozenset)
    trailing: frozenset[str] = field(default_factory=frozenset)
    join_gaps: frozenset[str] = frozenset({""})

    def with_steps(self, steps: Sequence[str]) -> LanguageEdgeRules:
        """The same word lists with other steps (benchmarks switch steps on and off with it)."""
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise SpanEdgeRulesError(f"unknown span-edge step(s) {unknown}; known: {', '.join(STEPS)}")
        return replace(self, steps=tuple(s for s in STEPS if s in steps))


def _words(data: Mapping[str, Any], key: str, source: str) -> frozenset[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise SpanEdgeRulesError(f"{source}: {key} must be a list of strings")
    return frozenset(_norm(w) for w in value)


def parse_edge_rules(data: Any, source: str, expected_language: str | None = None) -> LanguageEdgeRules:
    """Validate one language's rule data."""
    if not isinstance(data, dict):
        raise SpanEdgeRulesError(f"{source}: expected a mapping")
    language = data.get("language")
    if not isinstance(language, str) or (expected_language is not None and language != expected_language):
        raise SpanEdgeRulesError(f"{source}: language must be {expected_language or 'a language code'}")
    steps = data.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise SpanEdgeRulesError(f"{source}: steps must be a list of step names")
    unknown = set(data) - {"language", "steps", "leading", "trailing", "join_gaps"}
    if unknown:
        raise SpanEdgeRulesError(f"{source}: unknown field(s) {sorted(unknown)}")
    rules = LanguageEdgeRules(
        language=language,
        leading=_words(data, "leading", source),
        trailing=_words(data, "trailing", source),
        join_gaps=frozenset(g.strip() for g in _words(data, "join_gaps", source))
        if "join_gaps" in data
        else frozenset({""}),
    )
    try:
        return rules.with_steps(steps)
    except SpanEdgeRulesError as exc:
        raise SpanEdgeRulesError(f"{source}: {exc}") from exc


def trim_function_words(text: str, spans: Sequence[TaggedSpan], rules: LanguageEdgeRules) -> list[TaggedSpan]:
    """Drop leading words in ``rules.leading`` and trailing words in ``rules.trailing`` from each span."""
    out: list[TaggedSpan] = []
    for span in spans:
        words = [(m.start() + span.start, m.end() + span.start) for m in _WORD.finditer(text[span.start : span.end])]
        first, last = 0, len(words)
        while first < last and _listed(text[words[first][0] : words[first][1]], rules.leading):
            first += 1
        while last > first and _listed(text[words[last - 1][0] : words[last - 1][1]], rules.trailing):
            last -= 1
        if first == last and words:
            continue  # nothing but function words: not a mention
        if first == 0 and last == len(words):
            out.append(span)
            continue
        start = words[first][0] if first > 0 else span.start
        end = words[last - 1][1] if last < len(words) else span.end
        refined = refine_span(text, start, end)
        if refined is not None:
            out.append(replace(span, start=refined[0], end=refined[1]))
    return out


def join_adjacent(text: str, spans: Sequence[TaggedSpan], rules: LanguageEdgeRules) -> list[TaggedSpan]:
    """Join spans of one label separated only by whitespace or a ``join_gaps`` string (score: length-weighted)."""
    by_label: dict[str, list[TaggedSpan]] = {}
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        group = by_label.setdefault(span.label, [])
        previous = group[-1] if group else None
        if previous is not None and previous.end <= span.start and span.start - previous.end <= _MAX_GAP:
            gap = text[previous.end : span.start]
            if _norm(gap.strip()) in rules.join_gaps and "\n" not in gap:
                a, b = previous.end - previous.start, span.end - span.start
                score = round((previous.score * a + span.score * b) / (a + b), 4)
                group[-1] = TaggedSpan(span.label, previous.start, span.end, score)
                continue
        group.append(span)
    return [s for group in by_label.values() for s in group]


_STEP_FUNCTIONS: dict[str, Callable[[str, Sequence[TaggedSpan], LanguageEdgeRules], list[TaggedSpan]]] = {
    "trim_function_words": trim_function_words,
    "join_adjacent": join_adjacent,
}


def apply_edge_rules(text: str, spans: Sequence[TaggedSpan], rules: LanguageEdgeRules | None) -> list[TaggedSpan]:
    """The language's steps in order; spans come back sorted, without duplicates, inside the text, non-empty."""
    out = list(spans)
    if rules is not None:
        for step in rules.steps:
            out = _STEP_FUNCTIONS[step](text, out, rules)
    unique = {(s.label, s.start, s.end): s for s in out if 0 <= s.start < s.end <= len(text)}
    return sorted(unique.values(), key=lambda s: (s.start, s.end, s.label))


def load_edge_rules_file(path: Path) -> LanguageEdgeRules:
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpanEdgeRulesError(f"{source}: cannot be read ({type(exc).__name__})") from exc
    return parse_edge_rules(data, source, expected_language=path.stem)


@cache
def default_edge_rules() -> dict[str, LanguageEdgeRules]:
    """The shipped rule files, read once per process: language code -> rules."""
    return {f.stem: load_edge_rules_file(f) for f in sorted(RULES_DIR.glob("*.yaml"))}
