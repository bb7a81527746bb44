"""The tagger's genre data (worker/nlp/data/genres/): texts written natively for this project in six languages, in
the genres that are not clinical case reports (patient leaflets, drug labels, textbooks, patient health pages,
journal abstracts) and as clinical notes (``case``: admission, discharge and clinic notes, referral letters).

    python benchmarks/genre_corpus.py check --lang sv     # one language's markup: parse and report, write nothing
    python benchmarks/genre_corpus.py build               # markup/{lang}-{split}.md -> BRAT {lang}/{split}/

Markup as in ``translated_corpus.py``: one passage per block, ``### <genre>/<topic>-<n>`` then its text, mentions
``[covered text]{LABEL}``, nesting allowed. ``build`` checks each block: it parses, its id names a known genre, no
id is used twice, no mention has edge whitespace or a line break, every span's text is at its offsets when the BRAT
is read back, and no topic is in both a language's training and validation passages.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.translated_corpus import (  # noqa: E402
    brat_annotation,
    parse_markup,
    read_back_problems,
    read_markup,
    report,
)

OUT = ROOT / "worker" / "nlp" / "data" / "genres"
MARKUP = OUT / "markup"
LANGUAGES = ("es", "en", "it", "nl", "ro", "sv", "cs")
SPLITS = ("train", "val")
GENRES = ("leaflet", "label", "textbook", "health", "abstract", "case", "brief")


def genres_of(lang: str) -> tuple[str, ...]:
    """The genres a language's passages cover: Spanish, whose case reports the tagger trains on (SpaCCC, CardioCCC),
    has only ``brief`` notes (session 23); the six others every genre."""
    return ("brief",) if lang == "es" else GENRES


def topic(passage_id: str) -> str:
    """``label/metformin-2`` -> ``metformin``: the subject a passage is about."""
    return passage_id.split("/", 1)[-1].rsplit("-", 1)[0]


def _file_name(passage_id: str) -> str:
    return passage_id.replace("/", "__").replace("-", "_")


def check(lang: str, write: bool) -> tuple[list[str], dict[str, Counter[str]]]:
    """Problems in one language's markup (empty: all good) and label counts per split; ``write`` also writes BRAT."""
    problems: list[str] = []
    counts: dict[str, Counter[str]] = {}
    topics: dict[str, set[str]] = {}
    for split in SPLITS:
        path = MARKUP / f"{lang}-{split}.md"
        counts[split] = Counter()
        if not path.is_file():
            problems.append(f"{path.name} is missing")
            continue
        try:
            blocks = read_markup(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        topics[split] = {topic(k) for k in blocks}
        folder = OUT / lang / split
        if write:
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*"):
                old.unlink()
        for passage_id, body in blocks.items():
            where = f"{path.name} {passage_id}"
            if passage_id.split("/", 1)[0] not in genres_of(lang) or "/" not in passage_id:
                problems.append(
                    f"{where}: the id must be <genre>/<topic>-<n> with a genre of {', '.join(genres_of(lang))}"
                )
            try:
                text, spans = parse_markup(body, where)
            except ValueError as error:
                problems.append(str(error))
                continue
            counts[split]["passages"] += 1
            counts[split].update(label for *_, label in spans)
            ann, found = brat_annotation(text, spans, where)
            problems += found
            if write:
                name = _file_name(passage_id)
                (folder / f"{name}.txt").write_text(text, encoding="utf-8")
                (folder / f"{name}.ann").write_text(ann, encoding="utf-8")
        if write:
            problems += read_back_problems(folder, f"{lang}/{split}")
    shared = sorted(topics.get("train", set()) & topics.get("val", set()))
    if shared:
        problems.append(f"{lang}: topics in both train and val: {', '.join(shared)}")
    return problems, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "build"):
        command = sub.add_parser(name)
        command.add_argument("--lang", action="append", choices=LANGUAGES)
    args = parser.parse_args(argv)
    problems: list[str] = []
    for lang in args.lang or LANGUAGES:
        found, counts = check(lang, write=args.command == "build")
        problems += found
        for split, counted in counts.items():
            print(f"{lang}-{split}: " + ", ".join(f"{k} {v}" for k, v in sorted(counted.items())))
    return report(problems)


if __name__ == "__main__":
    raise SystemExit(main())
