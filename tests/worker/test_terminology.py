"""The worker's terminology: ICD-10-CM tables, text and nearest-neighbour matching, the embedding cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mappings.profile import load_profile
from mappings.terminology import CodeRequest, CodeSystemData, TerminologyError, parse_code_csv
from worker.terminology import (
    AUTO_EMBED_LIMIT,
    EXTENSION_KIND,
    ICD10CM_TABLE,
    EmbeddingStore,
    SourceIndex,
    TerminologyService,
    TextEncoder,
    build_icd10cm,
    code_for,
    icd10cm_version,
    length_batches,
    load_icd10cm,
    read_icd10cm_table,
    terminology_for,
)

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SUBSET = ("J18", "J12", "R50", "R05", "R06", "R07", "I10", "I11", "E11.9", "E10.9", "K35", "N39", "J45", "R51", "G43.9")


@pytest.fixture(scope="module")
def icd() -> CodeSystemData:
    return load_icd10cm()


@pytest.fixture(scope="module")
def icd_text(icd: CodeSystemData) -> TerminologyService:
    return TerminologyService.from_sources([icd], mode="lexical")


def best(
    service: TerminologyService, text: str, language: str | None = None, **prefixes: tuple[str, ...]
) -> str | None:
    request = CodeRequest(text, "X", ("icd-10-cm",), language, {k.replace("_", "-"): v for k, v in prefixes.items()})
    found = service.lookup([request])[0]
    return found[0].code if found else None


def test_the_icd10cm_tables_are_the_april_2026_release(icd: CodeSystemData) -> None:
    assert "2026" in icd10cm_version()
    codes = icd.codes()
    assert len(codes) > 45_000
    assert {"J18.9", "R50.9", "I10", "E11.9", "U07.1"} <= codes
    kinds = {entry.kind for entry in icd.entries}
    assert kinds == {"display", "core", "inclusion", "includes", EXTENSION_KIND}


def test_codes_that_need_a_7th_character_get_their_initial_encounter_or_unspecified_extension(
    icd: CodeSystemData,
) -> None:
    """Injuries, poisonings, external causes and some fractures and obstetric codes are billable only with a 7th
    character: a mention naming the code gets the extension a note most often means, with its own title."""
    defaults = {
        "S72.001": "S72.001A",  # closed fracture, initial encounter (never an open fracture's B or C)
        "S72.00": "S72.009A",  # through the unspecified child, then its extension
        "T68": "T68.XXXA",  # hypothermia: placeholder X
        "T14.90": "T14.90XA",
        "W19": "W19.XXXA",
        "M84.30": "M84.30XA",  # stress fracture: "initial encounter for fracture"
        "O60.10": "O60.10X0",  # no encounter: "not applicable or unspecified" fetus
        "R40.243": "R40.2430",  # Glasgow coma scale: unspecified time
    }
    for code, leaf in defaults.items():
        assert icd.billable(code) == leaf, code
        assert code not in icd.unembedded  # searched by nearest neighbour through its own names
    extensions = {entry.code: entry for entry in icd.entries if entry.kind == EXTENSION_KIND}
    assert set(defaults.values()) <= set(extensions)
    assert extensions["S72.001A"].display.endswith("initial encounter for closed fracture")
    assert len(extensions) > 12_000 and all(len(code.replace(".", "")) == 7 for code in extensions)
    assert icd.billable("S72.001A") == "S72.001A"  # the extension itself is billable
    # Its title is matched as text, but is no row of the nearest-neighbour index (its code's names are).
    service = TerminologyService.from_sources([icd], mode="lexical")
    assert best(service, extensions["T68.XXXA"].term) == "T68.XXXA"
    assert best(service, "Hypothermia") == "T68.XXXA"
    index = SourceIndex(icd)
    assert not any(entry.kind == EXTENSION_KIND for entry in index.entries)
    assert any(entry.code == "T68" for entry in index.entries)


def test_text_matching_on_the_full_tables(icd_text: TerminologyService) -> None:
    assert best(icd_text, "Fever NOS") == "R50.9"
    assert best(icd_text, "high blood pressure") == "I10"
    assert best(icd_text, "Pneumonia") == "J18.9"  # the leaf, not the category J18 with the same title
    assert best(icd_text, "Urinary tract infection") == "N39.0"
    assert best(icd_text, "hypertension", icd_10_cm=("R",)) is None  # SYMPTOM: chapter R only
    assert best(icd_text, "neumonía") is None  # another language: the nearest neighbour's job


def subset(icd: CodeSystemData) -> CodeSystemData:
    return CodeSystemData(icd.name, icd.url, tuple(e for e in icd.entries if e.code.startswith(SUBSET)))


@pytest.fixture(scope="module")
def e5_subset(
    icd: CodeSystemData, e5_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TerminologyService, EmbeddingStore]]:
    store = EmbeddingStore(tmp_path_factory.mktemp("terminology-cache"), TextEncoder(str(e5_encoder_dir)))
    service = TerminologyService.from_sources([subset(icd)], mode="embedding", store=store)
    service.index("icd-10-cm")
    yield service, store


@pytest.mark.parametrize(
    ("text", "language", "code"),
    [
        ("neumonía", "es", "J18.9"),
        ("polmonite", "it", "J18.9"),
        ("fiebre", "es", "R50.9"),
        ("febbre", "it", "R50.9"),
        ("hipertensión arterial", "es", "I10"),
        ("infección urinaria", "es", "N39.0"),
        ("chest pain", "en", "R07.9"),
    ],
)
def test_e5_nearest_neighbours_align_spanish_and_italian_with_icd10cm(
    e5_subset: tuple[TerminologyService, EmbeddingStore], text: str, language: str, code: str
) -> None:
    service, _ = e5_subset
    (found,) = service.lookup([CodeRequest(text, "DISEASE", ("icd-10-cm",), language)])
    assert found[0].code == code, [(c.code, round(c.score, 3)) for c in found]
    assert found[0].system == ICD and found[0].source == "icd-10-cm" and 0.0 < found[0].score <= 1.0


def test_embeddings_are_cached_on_disk_and_reused(
    icd: CodeSystemData, e5_subset: tuple[TerminologyService, EmbeddingStore]
) -> None:
    _, store = e5_subset
    files = sorted(p.name for p in store.root.glob("*.npy"))
    assert [name.split("-")[3] for name in files] == ["core", "display", "includes", "inclusion"]
    meta = json.loads(next(store.root.glob("icd-10-cm-display-*.json")).read_text())
    assert meta["revision"] == store.encoder.revision
    again = EmbeddingStore(store.root, TextEncoder(store.encoder.spec))
    service = TerminologyService.from_sources([subset(icd)], mode="embedding", store=again)
    service.index("icd-10-cm")
    assert again.encoder.encoded == 0  # nothing embedded again
    (found,) = service.lookup([CodeRequest("neumonía", "DISEASE", ("icd-10-cm",), "es")])
    assert found[0].code == "J18.9" and again.encoder.encoded == 1  # only the query


def test_a_cache_from_another_encoder_revision_is_not_used(tiny_encoder: Path, tmp_path: Path) -> None:
    data = parse_code_csv("code,display,synonyms\nA,alpha,first\nB,beta,second\n", "tiny", "http://tiny")
    store = EmbeddingStore(tmp_path, TextEncoder(str(tiny_encoder)))
    TerminologyService.from_sources([data], "embedding", store).index("tiny")
    assert store.encoder.encoded == 4  # alpha, beta (displays) and first, second (synonyms)
    for meta_path in tmp_path.glob("*.json"):
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "revision": "another"}))
    again = EmbeddingStore(tmp_path, TextEncoder(str(tiny_encoder)))
    TerminologyService.from_sources([data], "embedding", again).index("tiny")
    assert again.encoder.encoded == 4


def test_auto_mode_never_embeds_a_large_code_system_on_the_fly(
    tiny_encoder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = "".join(f"C{i},term number {i},\n" for i in range(AUTO_EMBED_LIMIT + 1))
    large = parse_code_csv("code,display,synonyms\n" + rows, "large", "http://large")
    small = parse_code_csv("code,display,synonyms\nA,alpha,\n", "small", "http://small")
    store = EmbeddingStore(tmp_path, TextEncoder(str(tiny_encoder)))
    service = TerminologyService.from_sources([large, small], "auto", store)
    with caplog.at_level(logging.WARNING, logger="fhir_ner.terminology"):
        assert service.index("large").matrix is None
    assert "python -m worker.terminology build" in caplog.text
    assert service.index("small").matrix is not None
    assert store.encoder.encoded == 1
    (found,) = service.lookup([CodeRequest("term number 7", "X", ("large",))])
    assert found[0].code == "C7" and found[0].score == 1.0  # text matching still answers


def write_profile(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "terms.csv").write_text(
        "code,display,synonyms,language\nHTA-1,Hipertensión arterial,HTA|tensión alta,es\n", encoding="utf-8"
    )
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "name: local\n"
        "code_systems:\n"
        "  - {name: hospital, file: terms.csv, system: 'http://hospital.example/cs'}\n"
        "labels:\n"
        "  DISEASE: {mapper: condition, codes: {systems: [icd-10-cm, hospital], min_score: 0.9}}\n"
        "  SYMPTOM: {mapper: observation, codes: {systems: [icd-10-cm], prefixes: {icd-10-cm: [R]}}}\n" + extra,
        encoding="utf-8",
    )
    return profile


def test_a_profile_code_system_wins_over_icd10cm_and_feeds_predict(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path))
    service = terminology_for(profile, mode="lexical")
    assert service is not None
    lookup = code_for(profile, service)
    assert lookup("DISEASE", "hipertensión arterial") == "http://hospital.example/cs|HTA-1"
    assert lookup("DISEASE", "essential hypertension") == "http://hl7.org/fhir/sid/icd-10-cm|I10"
    assert lookup("SYMPTOM", "Fever NOS") == "http://hl7.org/fhir/sid/icd-10-cm|R50.9"
    assert lookup("SYMPTOM", "essential hypertension") is None  # chapter R only
    assert lookup("PROCEDURE", "radiografía") is None  # no such label
    assert terminology_for(profile, mode="off") is None


def test_an_unreadable_profile_code_system_is_a_clear_error(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path))
    (tmp_path / "terms.csv").unlink()
    with pytest.raises(TerminologyError, match=r"code system hospital: cannot read .*terms\.csv"):
        terminology_for(profile, mode="lexical")
    (tmp_path / "terms.csv").write_text("code,name\n", encoding="utf-8")
    with pytest.raises(TerminologyError, match=r"code system hospital \(.*terms\.csv\): the CSV header lacks display"):
        terminology_for(profile, mode="lexical")


def test_mentions_are_batched_by_length_so_padding_wastes_little() -> None:
    lengths = [5, 5, 6, 6, 7, 12, 13, 30, 58]
    batches = length_batches(lengths, 64)
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    padded = sum(len(batch) * lengths[batch[-1]] for batch in batches)
    assert padded <= 1.25 * sum(lengths) + 8 * len(batches)
    assert len(batches) < len(lengths)  # similar lengths share a forward pass
    assert [len(b) for b in length_batches([4] * 10, 4)] == [4, 4, 2]


def test_the_shipped_icd10cm_table_is_the_installed_release_and_spares_its_memory() -> None:
    # The worker reads worker/linker/icd10cm.json.gz instead of importing simple-icd-10-cm (~175 MB resident in
    # every worker process); it must be exactly what the installed package gives.
    import subprocess
    import sys

    assert ICD10CM_TABLE.is_file()
    shipped, built = read_icd10cm_table(ICD10CM_TABLE), build_icd10cm()
    assert shipped == built and shipped.unbillable == built.unbillable and shipped.unembedded == built.unembedded
    # A fresh process that loads the code system never imports the package.
    probe = (
        "import sys; from worker.terminology import load_icd10cm; load_icd10cm(); "
        "print('simple_icd_10_cm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("count", [50, 7_999, 8_000, 86_003])
def test_the_top_positions_of_a_wide_row_are_its_top_values(count: int) -> None:
    """The narrowed search (best blocks first) finds the same top values as a plain argpartition, ties and a
    partial last block included; positions are distinct and inside the row."""
    import numpy as np

    from worker import terminology

    generator = np.random.default_rng(count)
    scores = np.round(generator.standard_normal((9, count)).astype(np.float32), 2)  # many equal values
    scores[0, -1] = 99.0  # the best value in the partial last block
    scores[1, :] = 0.5  # one row all ties
    for take in (1, 64, 320):
        if take > count:
            continue
        found = terminology._top_positions(scores, take)
        plain = np.argpartition(scores, count - take, axis=1)[:, count - take :]
        assert found.shape == (9, take)
        assert all(len(set(row.tolist())) == take for row in found)
        assert found.min() >= 0 and found.max() < count
        assert np.array_equal(
            np.sort(np.take_along_axis(scores, found, axis=1), axis=1),
            np.sort(np.take_along_axis(scores, plain, axis=1), axis=1),
        )
        assert count - 1 in found[0]  # the row's best value, in its partial last block


def test_each_term_is_normalised_once_for_the_exact_rows_and_the_reranker(
    tiny_encoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact-term rows, the re-ranker's n-grams and its features read one normalised list (ICD-10-CM: 86,000
    terms, normalised three times apart before, most of a worker's first note)."""
    from worker import terminology

    data = parse_code_csv("code,display,synonyms\nA,Alpha,first|Primo\nB,beta,second\n", "tiny", "http://tiny")
    store = EmbeddingStore(tmp_path, TextEncoder(str(tiny_encoder)))
    index = TerminologyService.from_sources([data], "embedding", store).index("tiny")
    calls: list[str] = []
    normalise = terminology.normalise

    def counted(text: str) -> str:
        calls.append(text)
        return normalise(text)

    monkeypatch.setattr(terminology, "normalise", counted)
    assert index.normal_terms() == [normalise(entry.term) for entry in index.entries]
    assert len(calls) == len(index.entries)
    calls.clear()
    assert index.term_vector("ALPHA") is not None and index.term_vector("gamma") is None
    index.ngram_idf()
    assert calls == ["ALPHA", "gamma"]  # the mentions only, never the index's terms again
