"""Do mentions in the six other languages get the code their Spanish source gets? A check for choosing linker
settings that needs no coded corpus in those languages.

    .venv/bin/python benchmarks/crosslingual_codes.py [--split val] [--json OUT]

Reads the project's translated excerpts (``worker/nlp/data/translated``, the **val** split by default: the linker's
``--translated`` training reads only ``train``): each translated mention is paired with its Spanish source mention
(``train_linker.translated_pairs``). Both are coded through the production path (``worker.coding.code_mentions``,
as ``fhir-ner code`` codes them: the Spanish one with language ``es``, the translation with its own), and per
language it reports the share of pairs whose translation's first code is the Spanish mention's first code
(``agree@1``) and the share whose first five codes hold it (``agree@5``), over the pairs where the Spanish
mention gets a code. The Spanish code is not gold (CodiEsp dev gives Spanish figures): this measures whether a
mention's language changes its code, which it should not.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)

from benchmarks.train_linker import TRANSLATED_LANGUAGES, translated_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from mappings.profile import load_profile
    from worker.coding import code_mentions
    from worker.terminology import terminology_for

    profile = load_profile()
    service = terminology_for(profile, "auto")
    if service is None:
        print("no terminology service (FHIR_NER_TERMINOLOGY=off?)", file=sys.stderr)
        return 1
    pairs = translated_pairs(args.split)

    def codes(items: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], list[str]]:
        """(mention, label, language) -> its first five codes, as ``fhir-ner code`` ranks them."""
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for mention, label, language in sorted(set(items)):
            groups[(label, language)].append(mention)
        found = {}
        for (label, language), mentions in groups.items():
            for coded in code_mentions(mentions, label, language, 5, profile, service):
                found[(coded.mention, label, language)] = coded.ranked_codes()
        return found

    spanish = codes([(es, label, "es") for _, label, _, es in pairs])
    translated = codes([(m, label, language) for language, label, m, _ in pairs])
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for language, label, mention, es in pairs:
        source = spanish[(es, label, "es")]
        if not source:
            continue
        mine = translated[(mention, label, language)]
        for key in (language, "all"):
            counts[key]["n"] += 1
            counts[key]["agree1"] += bool(mine) and mine[0] == source[0]
            counts[key]["agree5"] += source[0] in mine[:5]
    report = {
        key: {
            "n": c["n"],
            "agree@1": round(c["agree1"] / c["n"], 4),
            "agree@5": round(c["agree5"] / c["n"], 4),
        }
        for key, c in counts.items()
    }
    order = [*TRANSLATED_LANGUAGES, "all"]
    print("language  pairs  agree@1  agree@5")
    for key in order:
        if key in report:
            r = report[key]
            print(f"{key:8s}  {r['n']:5d}  {r['agree@1']:.3f}    {r['agree@5']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({k: report[k] for k in order if k in report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
