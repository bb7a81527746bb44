"""The translated training data of the tagger (worker/nlp/data/translated/): pick Spanish excerpts, then build BRAT.

    python benchmarks/translated_corpus.py sample [--data ../shared/data/es]   # writes markup/es-{train,val}.md
    python benchmarks/translated_corpus.py extend [--train 240]                # writes markup/es-train2.md
    python benchmarks/translated_corpus.py build                               # markup/{lang}-{split}.md -> BRAT

``extend`` draws more training excerpts the way ``sample`` drew the first ones (same seed, one per note, the
notes after those of ``es-train.md``), checks that the first ones are exactly ``es-train.md``'s, and writes the new
ones to ``es-train2.md``; the validation excerpts are not touched (their notes are set aside before any training
note is drawn).

The Spanish excerpts come only from the training side of the tagger's own split (``split_by_name`` with
val_fraction 0.1 and seed 0, the split `fhir-ner train` and `make train-default` use), so the Spanish
validation notes stay out of both the translated training set and the translated validation set. The
translated validation excerpts come from other notes than the translated training excerpts.

Markup: one excerpt per block. A block starts with ``### <excerpt id>`` and its text follows on the next
lines (newlines inside the excerpt are kept). A mention is ``[covered text]{LABEL}``; mentions may nest
(``[[neumonía]{DISEASE} bilateral]{DISEASE}``). The characters ``[ ] { }`` do not occur in the excerpts
otherwise. ``build`` checks every translated file against its Spanish source: the same excerpt ids, and in
each excerpt the same number of mentions of each label (so no mention is lost), and that every span's text
is at its offsets.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.nlp.corpus import Document, read_brat_folder, split_by_name  # noqa: E402

OUT = ROOT / "worker" / "nlp" / "data" / "translated"
MARKUP = OUT / "markup"
LANGUAGES = ("en", "it", "nl", "ro", "sv", "cs")
SPLITS = ("train", "train2", "val")  # train2: more training excerpts (`extend`), from other notes
LABELS = {"DISEASE", "SYMPTOM", "PROCEDURE"}
CORPORA = ("spaccc-train", "cardioccc-train")
MISSING_DATA = (
    "the Spanish corpora are not at {path}: put the folders spaccc-train/ and cardioccc-train/ of the "
    "MultiClinNER Spanish training data there (BRAT .txt + .ann), or pass --data"
)


@dataclass
class Excerpt:
    excerpt_id: str
    text: str
    spans: list[tuple[int, int, str]]  # (start, end, label), offsets into text


# ---------------------------------------------------------------- sampling


def _sentences(text: str) -> list[tuple[int, int]]:
    """Sentence-like pieces: split after . ! ? followed by whitespace, and at line breaks."""
    pieces, start = [], 0
    for match in re.finditer(r"(?<=[.!?])\s+|\n+", text):
        if match.start() > start:
            pieces.append((start, match.start()))
        start = match.end()
    if start < len(text):
        pieces.append((start, len(text)))
    return pieces


def _nested_or_disjoint(spans: list[tuple[int, int, str]]) -> bool:
    for a in spans:
        for b in spans:
            if a is not b and a[0] < b[0] < a[1] < b[1]:
                return False
    return True


def _excerpt(doc: Document, start: int, end: int, corpus: str) -> Excerpt | None:
    text = doc.text[start:end]
    if re.search(r"[\[\]{}]", text) or not text.strip():
        return None
    spans = [(s.start - start, s.end - start, s.label) for s in doc.spans
             if s.label in LABELS and start <= s.start and s.end <= end]
    crossing = [s for s in doc.spans if s.label in LABELS and s.start < end and s.end > start
                and not (start <= s.start and s.end <= end)]
    if not spans or crossing or not _nested_or_disjoint(spans):
        return None
    return Excerpt(f"{corpus}/{doc.doc_id}:{start}-{end}", text, sorted(spans, key=lambda s: (s[0], -s[1])))


def sample(data: Path, n_train: int, n_val: int, seed: int) -> dict[str, list[Excerpt]]:
    rng = random.Random(seed)
    pools: dict[str, list[tuple[str, Document]]] = {}
    for corpus in CORPORA:
        folder = data / corpus
        if not folder.is_dir():
            raise SystemExit(MISSING_DATA.format(path=data))
        train_docs, _ = split_by_name(read_brat_folder(folder), 0.1, seed=0)
        pools[corpus] = [(corpus, d) for d in train_docs]
    docs = pools["spaccc-train"] + pools["cardioccc-train"]
    rng.shuffle(docs)
    val_docs, train_docs = docs[: n_val], docs[n_val:]
    out: dict[str, list[Excerpt]] = {}
    for split, chosen, wanted in (("train", train_docs, n_train), ("val", val_docs, n_val)):
        excerpts: list[Excerpt] = []
        for index, (corpus, doc) in enumerate(chosen):
            if len(excerpts) >= wanted:
                break
            sentences = _sentences(doc.text)
            # A mix: every other excerpt is one short sentence ("Ingresa por ..."), the rest 2-4 sentences.
            short = index % 2 == 0
            order = list(range(len(sentences)))
            rng.shuffle(order)
            if index % 5 == 0:
                order.sort()  # some excerpts from the opening of the note (admission reason, history)
            for first in order:
                size = 1 if short else rng.randint(2, 4)
                last = min(len(sentences), first + size) - 1
                start, end = sentences[first][0], sentences[last][1]
                if short and not (25 <= end - start <= 160):
                    continue
                if not short and not (150 <= end - start <= 700):
                    continue
                excerpt = _excerpt(doc, start, end, corpus)
                if excerpt is not None:
                    excerpts.append(excerpt)
                    break
        out[split] = excerpts
    return out


# ---------------------------------------------------------------- markup


def to_markup(excerpt: Excerpt) -> str:
    opens: dict[int, list[str]] = {}
    closes: dict[int, list[str]] = {}
    for start, end, label in excerpt.spans:
        opens.setdefault(start, []).append("[")
        closes.setdefault(end, []).insert(0, "]{" + label + "}")
    parts = []
    for i, char in enumerate(excerpt.text + "\0"):
        parts.extend(closes.get(i, []))
        parts.extend(opens.get(i, []))
        if char != "\0":
            parts.append(char)
    return "".join(parts)


_MENTION = re.compile(r"\[|\]\{([A-Z]+)\}")


def parse_markup(body: str, where: str) -> tuple[str, list[tuple[int, int, str]]]:
    """Plain text and its spans from one excerpt's markup; a malformed one raises ValueError naming ``where``."""
    text: list[str] = []
    stack: list[int] = []
    spans: list[tuple[int, int, str]] = []
    length = 0
    position = 0
    for match in _MENTION.finditer(body):
        chunk = body[position : match.start()]
        if re.search(r"[\[\]{}]", chunk):
            raise ValueError(f"{where}: stray bracket near {chunk[-30:]!r}")
        text.append(chunk)
        length += len(chunk)
        if match.group(0) == "[":
            stack.append(length)
        else:
            if not stack:
                raise ValueError(f"{where}: ']{{{match.group(1)}}}' without its '['")
            label = match.group(1)
            if label not in LABELS:
                raise ValueError(f"{where}: unknown label {label}")
            start = stack.pop()
            if start == length:
                raise ValueError(f"{where}: empty mention")
            spans.append((start, length, label))
        position = match.end()
    tail = body[position:]
    if re.search(r"[\[\]{}]", tail):
        raise ValueError(f"{where}: stray bracket near {tail[:30]!r}")
    if stack:
        raise ValueError(f"{where}: '[' never closed")
    text.append(tail)
    return "".join(text), sorted(spans, key=lambda s: (s[0], -s[1]))


def read_markup(path: Path) -> dict[str, str]:
    blocks: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            if current is not None:
                blocks[current] = "\n".join(lines).strip("\n")
            current, lines = line[4:].strip(), []
            if current in blocks:
                raise ValueError(f"{path.name}: excerpt {current} twice")
        elif current is not None:
            lines.append(line)
    if current is not None:
        blocks[current] = "\n".join(lines).strip("\n")
    return blocks


def write_markup(path: Path, excerpts: list[Excerpt]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"### {e.excerpt_id}\n{to_markup(e)}\n\n" for e in excerpts)
    path.write_text(body, encoding="utf-8")


# ---------------------------------------------------------------- building


def _file_name(excerpt_id: str) -> str:
    corpus, rest = excerpt_id.split("/", 1)
    return f"{corpus.split('-')[0]}__{rest.replace(':', '__').replace('-', '_')}"


def brat_annotation(text: str, spans: list[tuple[int, int, str]], where: str) -> tuple[str, list[str]]:
    """The ``.ann`` text of one excerpt's spans, and its problems: a mention with edge whitespace or a line break."""
    problems: list[str] = []
    ann = []
    for number, (start, end, label) in enumerate(spans, start=1):
        covered = text[start:end]
        if covered != covered.strip() or "\n" in covered:
            problems.append(f"{where}: mention {covered!r} has edge whitespace or a line break")
        ann.append(f"T{number}\t{label} {start} {end}\t{covered}\n")
    return "".join(ann), problems


def read_back_problems(folder: Path, where: str) -> list[str]:
    """Read a written BRAT folder back with the tagger's own reader: each span's text must be at its offsets."""
    return [
        f"{where}/{doc.doc_id}: span text differs at {span.start}"
        for doc in read_brat_folder(folder)
        for span in doc.spans
        if doc.text[span.start : span.end] != span.text
    ]


def report(problems: list[str]) -> int:
    """Print the problems (standard error) and their count; the exit status: 1 when there are any."""
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(problems)} problems")
    return 1 if problems else 0


def build(languages: tuple[str, ...]) -> list[str]:
    """Write BRAT for every markup file present and return the problems found (empty: all good)."""
    problems: list[str] = []
    for split in SPLITS:
        source_path = MARKUP / f"es-{split}.md"
        if split not in ("train", "val") and not source_path.is_file():
            continue  # an optional extension
        if not source_path.is_file():
            problems.append(f"{source_path} is missing (run `sample` first)")
            continue
        source = read_markup(source_path)
        source_labels = {k: Counter(label for *_, label in parse_markup(v, k)[1]) for k, v in source.items()}
        for lang in languages:
            path = MARKUP / f"{lang}-{split}.md"
            if not path.is_file():
                continue
            blocks = read_markup(path)
            missing = sorted(set(source) - set(blocks))
            extra = sorted(set(blocks) - set(source))
            problems += [f"{path.name}: excerpt {k} missing" for k in missing]
            problems += [f"{path.name}: excerpt {k} not in the Spanish source" for k in extra]
            folder = OUT / lang / split
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*"):
                old.unlink()
            for excerpt_id, body in blocks.items():
                where = f"{path.name} {excerpt_id}"
                try:
                    text, spans = parse_markup(body, where)
                except ValueError as error:
                    problems.append(str(error))
                    continue
                labels = Counter(label for *_, label in spans)
                if excerpt_id in source_labels and labels != source_labels[excerpt_id]:
                    problems.append(f"{where}: mentions {dict(labels)} but the Spanish has "
                                    f"{dict(source_labels[excerpt_id])}")
                name = _file_name(excerpt_id)
                ann, found = brat_annotation(text, spans, where)
                problems += found
                (folder / f"{name}.txt").write_text(text, encoding="utf-8")
                (folder / f"{name}.ann").write_text(ann, encoding="utf-8")
            problems += read_back_problems(folder, f"{lang}/{split}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es")
    s.add_argument("--train", type=int, default=240)
    s.add_argument("--val", type=int, default=60)
    s.add_argument("--seed", type=int, default=15)
    x = sub.add_parser("extend")
    x.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "es")
    x.add_argument("--train", type=int, default=240, help="how many more training excerpts")
    x.add_argument("--seed", type=int, default=15)
    b = sub.add_parser("build")
    b.add_argument("--lang", action="append", choices=LANGUAGES)
    args = parser.parse_args(argv)
    if args.command == "sample":
        chosen = sample(args.data, args.train, args.val, args.seed)
        for split, excerpts in chosen.items():
            write_markup(MARKUP / f"es-{split}.md", excerpts)
            print(f"es-{split}.md: {len(excerpts)} excerpts, {sum(len(e.spans) for e in excerpts)} mentions, "
                  f"{sum(len(e.text) for e in excerpts)} characters")
        return 0
    if args.command == "extend":
        first = read_markup(MARKUP / "es-train.md")
        drawn = sample(args.data, len(first) + args.train, 60, args.seed)["train"]
        if [e.excerpt_id for e in drawn[: len(first)]] != list(first):
            raise SystemExit("the first excerpts drawn are not es-train.md's: different data or seed")
        more = drawn[len(first) :]
        write_markup(MARKUP / "es-train2.md", more)
        print(f"es-train2.md: {len(more)} excerpts, {sum(len(e.spans) for e in more)} mentions, "
              f"{sum(len(e.text) for e in more)} characters")
        return 0
    return report(build(tuple(args.lang or LANGUAGES)))


if __name__ == "__main__":
    raise SystemExit(main())
