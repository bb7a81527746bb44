"""The linker's query encoders on CPUs: the full one in ONNX Runtime (its fused float32 graph, built once, PyTorch as
fallback) and the distilled one the worker runs, in per-token int8 (worker/token_int8.py): same codes as float32,
and a mention's vector never depends on its note."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mappings.profile import load_profile
from mappings.terminology import code_request
from worker.linker import shipped_linker_available
from worker.terminology import (
    QUERY_KEEP_FP32,
    LinkerEncoder,
    LinkerQueryEncoder,
    _OnnxQueries,
    linker_onnx_path,
    terminology_for,
)
from worker.token_int8 import TokenInt8Encoder

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(not shipped_linker_available(), reason="worker/linker/ has no trained linker")

# Mentions the exact text step does not answer (they reach the encoder), in the check set's seven languages.
MULTILINGUAL = [
    "dolor torácico opresivo irradiado al brazo izquierdo",
    "insuficiencia renal crónica agudizada",
    "acute exacerbation of chronic obstructive pulmonary disease",
    "infarto miocardico acuto",
    "fibrillazione atriale parossistica",
    "hartfalen met verminderde ejectiefractie",
    "insuficiență cardiacă congestivă",
    "förmaksflimmer",
    "cukrovka druhého typu",
    "x",
]
# Check-set mentions (with their codes) that reach the encoder and that the float32 path codes right, with a
# margin of 0.08 or more over the second candidate (closer calls may flip with int8 rounding, either way).
CHECK_SET = [
    ("insufficienza cardiaca", "it", "I50.9"),
    ("ictus ischemico", "it", "I63.9"),
    ("artrose", "nl", "M19.90"),
    ("griep", "nl", "J11.1"),
    ("insuficiență cardiacă", "ro", "I50.9"),
    ("anemie feriprivă", "ro", "D50.9"),
    ("typ 2-diabetes", "sv", "E11.9"),
    ("lungcancer", "sv", "C34.90"),
    ("revmatoidní artritida", "cs", "M06.9"),
    ("anémie", "cs", "D64.9"),
]


ENCODERS: dict[str, type[LinkerEncoder]] = {"full": LinkerEncoder, "distilled": LinkerQueryEncoder}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def cpu_encoder(kind: str) -> LinkerEncoder:
    # The default cache, as in production: the graph is built there once per machine (about a minute).
    encoder = ENCODERS[kind]()
    encoder.encode(["warm-up"])
    assert isinstance(encoder._model, _OnnxQueries if kind == "full" else TokenInt8Encoder)
    return encoder


@pytest.fixture(scope="module")
def float32_encoder(kind: str) -> LinkerEncoder:
    return ENCODERS[kind](runtime="torch", keep_fp32=None)


def test_cpu_query_vectors_agree_with_the_float32_path(
    cpu_encoder: LinkerEncoder, float32_encoder: LinkerEncoder
) -> None:
    vectors, reference = cpu_encoder.encode(MULTILINGUAL), float32_encoder.encode(MULTILINGUAL)
    assert vectors.shape == reference.shape == (len(MULTILINGUAL), 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cosine = (vectors * reference).sum(axis=1)
    if cpu_encoder.keep_fp32 is None:
        # The fused float32 graph (the full encoder): the same vectors as PyTorch's float32, up to rounding.
        assert cosine.min() > 0.9999, cosine
        alone = cpu_encoder.encode([MULTILINGUAL[0]])[0]
        assert float(alone @ vectors[0]) > 0.99999
    else:
        # The distilled encoder in per-token int8 with 7-bit tokens: near float32 (0.9977-0.9984 on these, "x"
        # 0.9951; with 8-bit tokens 0.999-0.9996 and 0.9990, the same CodiEsp dev figures within 0.2 points).
        assert cpu_encoder.keep_fp32 == QUERY_KEEP_FP32 == ("embeddings",)
        assert cosine.min() > 0.994 and cosine.mean() > 0.997, cosine
        # A mention's vector is exactly the one it gets alone, whatever else its note holds (dynamic int8 with one
        # scale per call moved it with its note: 2.7% of CodiEsp dev DISEASE mentions' top code changed).
        for position in (0, 4, 9):
            np.testing.assert_array_equal(cpu_encoder.encode([MULTILINGUAL[position]])[0], vectors[position])
        shuffled = cpu_encoder.encode(MULTILINGUAL[::-1] + ["dolor torácico opresivo irradiado al brazo izquierdo"])
        np.testing.assert_array_equal(shuffled[: len(MULTILINGUAL)][::-1], vectors)
    # The revision names the weights, not the arithmetic: the shipped index (float32) stays the one used.
    assert cpu_encoder.revision == float32_encoder.revision


def test_cpu_queries_give_the_float32_paths_top_codes(
    cpu_encoder: LinkerEncoder, float32_encoder: LinkerEncoder, tmp_path: Path
) -> None:
    profile = load_profile()
    service = terminology_for(profile, "auto", cache_root=tmp_path / "empty-cache")
    assert service is not None
    options = profile.labels["DISEASE"].codes
    requests = [code_request(text, "DISEASE", options, language) for text, language, _ in CHECK_SET]
    for encoder in (cpu_encoder, float32_encoder):
        found = [candidates[0].code for candidates in service.lookup(requests, encode=encoder.encode)]
        assert found == [code for *_, code in CHECK_SET]


def tiny_model(tiny_encoder: Path) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(tiny_encoder), add_pooling_layer=False).eval()


def test_the_graph_is_built_once_per_cache_and_keyed_by_recipe(tiny_encoder: Path, tmp_path: Path) -> None:
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return tiny_model(tiny_encoder)

    first = linker_onnx_path("tiny-r1", load, tmp_path)
    assert first.is_file() and len(loads) == 1
    meta = json.loads((first.parent / "meta.json").read_text())
    assert meta["keep_fp32"] == ["embeddings", "ffn_out"] and meta["fused"]["Attention"] == 2
    assert len([n for n in meta["kept_fp32_nodes"] if n.endswith("output/dense/MatMul")]) == 2  # ffn_out per layer
    assert linker_onnx_path("tiny-r1", load, tmp_path) == first and len(loads) == 1  # reused, not rebuilt
    other = linker_onnx_path("tiny-r1", load, tmp_path, keep_fp32=None)  # fp32: another entry
    another = linker_onnx_path("tiny-r2", load, tmp_path)  # other weights: another entry
    assert len({first, other, another}) == 3 and len(loads) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no scratch folder left behind


def test_a_failed_build_leaves_no_entry_and_the_encoder_falls_back_to_pytorch(
    tiny_encoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Any:
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        linker_onnx_path("tiny-r1", broken, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-built that a worker would pick up

    import worker.terminology as terminology

    def failing(*args: Any, **kwargs: Any) -> Path:
        raise RuntimeError("export failed")

    monkeypatch.setattr(terminology, "linker_onnx_path", failing)
    encoder = LinkerEncoder()
    with caplog.at_level(logging.WARNING, logger="fhir_ner.terminology"):
        vectors = encoder.encode(MULTILINGUAL[:3])
    assert not isinstance(encoder._model, _OnnxQueries)  # PyTorch, in the same arithmetic (float32)
    assert any("running PyTorch float32" in r.getMessage() for r in caplog.records)
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_the_query_encoder_needs_no_onnx_graph(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The distilled encoder's per-token int8 runs in PyTorch: a worker starts coding without exporting (or failing to
    export) the model to an ONNX Runtime graph, and warns about nothing (its integer products may run in ONNX
    Runtime's one-operator MatMulInteger sessions, built from the weights in memory)."""
    import worker.terminology as terminology

    def failing(*args: Any, **kwargs: Any) -> Path:
        raise RuntimeError("export failed")

    monkeypatch.setattr(terminology, "linker_onnx_path", failing)
    encoder = LinkerQueryEncoder()
    with caplog.at_level(logging.WARNING, logger="fhir_ner.terminology"):
        vectors = encoder.encode(MULTILINGUAL)
    assert isinstance(encoder._model, TokenInt8Encoder) and not caplog.records
    reference = LinkerQueryEncoder(runtime="torch", keep_fp32=None).encode(MULTILINGUAL)
    assert float((vectors * reference).sum(axis=1).min()) > 0.994  # 7-bit tokens: see the test above


def test_a_notes_mentions_encode_on_one_thread_however_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long note's mentions (more than one batch of them) run on one thread, as a short note's do: a second
    thread on short strings spins more than it computes. The process's thread count is restored after."""
    import torch

    encoder = LinkerQueryEncoder()
    seen: list[int] = []
    embed = encoder._embed

    def recording(batch: list[str]) -> np.ndarray:
        seen.append(torch.get_num_threads())
        return embed(batch)

    monkeypatch.setattr(encoder, "_embed", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mentions = [f"{text} {n}" for n in range(8) for text in MULTILINGUAL]  # 80: more than one batch of 64
        vectors = encoder.encode(mentions)
        assert vectors.shape == (80, 384) and len(seen) >= 2 and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
