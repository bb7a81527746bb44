"""ICD-10-CM's rule for a tumour named without its behaviour: "neoplasm of unspecified behavior" (D49), by site.

ICD-10-CM's Alphabetic Index sends "Tumor" and "Neoplasia" without further words to the Neoplasm Table's
*unspecified behavior* column (D49.-), and coders of Spanish clinical cases follow it: "tumoración lengua" is
D49.0, "neoplasia de pene" D49.59, "tumor cerebral" D49.6. The nearest-neighbour search cannot know that rule: it
ranks the site's malignant code (C02.9, C60.9, C71.9) first, and often leaves D49 out of the first candidates.
So when a mention is a tumour word and a site, with nothing that names a behaviour or a kind of tumour (malignant,
benign, carcinoma, "-oma", cyst, metastasis, in situ, history of ...), the D49 code of the site of the search's
first neoplasm candidate (C00-D36, or a D49 code itself) becomes the first candidate.

Pure (no I/O): the word lists per language are below; the site map follows the Neoplasm Table's column layout
(digestive D49.0, respiratory D49.1, bone, soft tissue and skin D49.2, breast D49.3, bladder D49.4, kidney
D49.51-, other genitourinary D49.59, brain D49.6, endocrine glands and other nervous system D49.7, retina and
choroid D49.81, other specified sites D49.89).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mappings.terminology import primary_language

# Nouns that name a growth without its behaviour ("tumoral", an adjective, is not one: "masa tumoral").
TUMOUR_WORDS: dict[str, tuple[str, ...]] = {
    "es": ("tumor", "tumores", "tumoracion", "tumoraciones", "neoplasia", "neoplasias", "neoformacion"),
    "en": ("tumor", "tumors", "tumour", "tumours", "neoplasm", "neoplasms", "neoplasia"),
    "it": ("tumore", "tumori", "neoplasia", "neoplasie", "neoformazione", "neoformazioni"),
    "nl": ("tumor", "tumoren", "neoplasma", "neoplasmata", "gezwel"),
    "ro": ("tumora", "tumori", "tumoare", "neoplasm", "neoplasme", "neoplazie", "neoformatie", "neoformatiune"),
    "sv": ("tumor", "tumorer", "tumoren", "neoplasm", "nybildning"),
    "cs": ("nador", "nadory", "tumor", "tumory", "novotvar", "novotvary"),
}

_ANY_TUMOUR_WORD = frozenset(word for words in TUMOUR_WORDS.values() for word in words)  # a note of no language

# Languages that write the site and the tumour word as one word ("hersentumor", "hjärntumör"; "ö" folds to "o").
COMPOUNDING = frozenset({"nl", "sv"})
_COMPOUND_HEADS = ("tumor", "gezwel")

# Words that name a behaviour, a kind of tumour or a history: then the mention is not "a tumour of <site>".
_NOT_UNSPECIFIED = re.compile(
    r"\w*(?:om|oma|omas|omy|omu|omi|oame|omer)\b"  # carcinoma, adenom, lymfom, sarcomi, meningiomas
    r"|malign\w*|benign\w*|kwaadaardig\w*|goedaardig\w*|elakartad\w*|godartad\w*|zhoubn\w*|nezhoubn\w*"
    r"|cancer\w*|cancro\w*|kanker\w*|rak\w*|karcinom\w*|carcinoid\w*|carcinoide\w*"
    r"|metasta\w*|quist\w*|cyst\w*|cist\w*|chist\w*|primar\w*|primair\w*|primär\w*"
    r"|in situ|intraepitel\w*|celul\w*|cell\w*|bunek|wilms|gist"
    r"|antecedent\w*|histor\w*|anamne\w*|voorgeschiedenis|marcador\w*|marker\w*",
)
_WORD = re.compile(r"\w+")

# The site of a neoplasm code, as its D49 code: ranges of the three-character category.
_CANCER_SITES: tuple[tuple[str, str, str], ...] = (
    ("C00", "C26", "D49.0"),
    ("C30", "C39", "D49.1"),
    ("C40", "C49", "D49.2"),
    ("C50", "C50", "D49.3"),
    ("C51", "C63", "D49.59"),
    ("C64", "C64", "D49.51"),
    ("C65", "C66", "D49.59"),
    ("C67", "C67", "D49.4"),
    ("C68", "C68", "D49.59"),
    ("C69", "C69", "D49.89"),
    ("C70", "C70", "D49.7"),
    ("C71", "C71", "D49.6"),
    ("C72", "C75", "D49.7"),
    ("C76", "C79", "D49.89"),
    ("D10", "D13", "D49.0"),
    ("D14", "D14", "D49.1"),
    ("D16", "D23", "D49.2"),
    ("D24", "D24", "D49.3"),
    ("D25", "D29", "D49.59"),
    ("D31", "D31", "D49.89"),
    ("D32", "D32", "D49.7"),
    ("D34", "D35", "D49.7"),
    ("D36", "D36", "D49.89"),
)
_RETINA_CHOROID = ("C69.2", "C69.3", "D31.2", "D31.3")
_BRAIN = ("D33.0", "D33.1", "D33.2")
_KIDNEY_SIDE = {"1": "D49.511", "2": "D49.512"}


def names_unspecified_tumour(normalised: str, language: str | None) -> bool:
    """Whether the mention is a tumour word plus a site and nothing that names a behaviour or kind of tumour.

    ``normalised``: the mention's case- and accent-folded words (``mappings.terminology.normalise``)."""
    words = _WORD.findall(normalised)
    primary = primary_language(language)
    vocabulary = TUMOUR_WORDS.get(primary, ()) if primary else _ANY_TUMOUR_WORD
    if primary in COMPOUNDING or primary is None:
        # "hersentumor", "blåstumör": the site and the tumour word in one word.
        compound = [w for w in words if any(w.endswith(t) and len(w) >= len(t) + 3 for t in _COMPOUND_HEADS)]
        if compound:
            others = " ".join(w for w in words if w not in compound)
            return _NOT_UNSPECIFIED.search(others) is None
    if len(words) < 2:
        return False  # a bare "tumor" names no site
    tumour = [word for word in words if word in vocabulary]
    if not tumour:
        return False
    others = " ".join(word for word in words if word not in vocabulary)
    return _NOT_UNSPECIFIED.search(others) is None


def site_code(code: str) -> str | None:
    """The D49 code for the site of a neoplasm code (``C02.9`` → ``D49.0``), a D49 leaf itself, or None."""
    if code.startswith("D49") and len(code) > 4:
        return code
    category = code[:3]
    if code.startswith(_RETINA_CHOROID):
        return "D49.81"
    if code.startswith(_BRAIN):
        return "D49.6"
    if category == "D33":
        return "D49.7"
    if category == "D30":
        if code.startswith("D30.0"):
            return _KIDNEY_SIDE.get(code[5:6], "D49.519")
        return "D49.4" if code.startswith("D30.3") else "D49.59"
    for low, high, site in _CANCER_SITES:
        if low <= category <= high:
            if site == "D49.51":
                return _KIDNEY_SIDE.get(code[4:5], "D49.519")
            return site
    return None


def unspecified_behaviour_code(
    normalised: str, language: str | None, candidates: Sequence[str], depth: int = 20
) -> tuple[str, int] | None:
    """The D49 code to put first for this mention and the position of the candidate that gave its site, or None:
    the site of the first neoplasm code among the first ``depth`` candidates, when the mention names a tumour
    without its behaviour."""
    if not names_unspecified_tumour(normalised, language):
        return None
    for position, code in enumerate(candidates[:depth]):
        site = site_code(code)
        if site is not None:
            return site, position
    return None
