"""What the tagger hands to the mappings: a mention with exact character offsets into the note."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Assertion = Literal["present", "negated", "possible", "hypothetical", "historical", "family"]
ASSERTIONS: tuple[str, ...] = ("present", "negated", "possible", "hypothetical", "historical", "family")
#: What the note says about whether a condition is over ("neumonía resuelta", "in remission"); None: nothing.
RESOLUTIONS: tuple[str, ...] = ("resolved", "remission")


@dataclass(frozen=True)
class CandidateCode:
    """A code the terminology layer proposes for a mention."""

    system: str
    code: str
    display: str | None = None
    score: float = 1.0
    source: str | None = None  # the profile's name of the code system it came from (e.g. ``icd-10-cm``)


@dataclass(frozen=True)
class Mention:
    """One entity mention; ``start``/``end`` are character offsets (end exclusive) into the attachment text."""

    label: str
    start: int
    end: int
    text: str
    confidence: float = 1.0
    assertion: str = "present"
    codes: tuple[CandidateCode, ...] = field(default_factory=tuple)
    resolution: str | None = None  # one of RESOLUTIONS when the note says the condition is over

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"invalid mention offsets [{self.start}, {self.end})")
        if self.assertion not in ASSERTIONS:
            raise ValueError(f"unknown assertion {self.assertion!r}; expected one of {', '.join(ASSERTIONS)}")
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {self.resolution!r}; expected one of {', '.join(RESOLUTIONS)}")
