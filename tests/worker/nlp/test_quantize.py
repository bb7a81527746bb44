"""Int8 inference (ONNX Runtime): same decoding guarantees, cached export, `auto` only when validated."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import SAMPLE_NOTES, TRAINING_SPANS

from worker.nlp import quantize
from worker.nlp.decoding import refine_span
from worker.nlp.tagger import ClinicalTagger, TaggerPipeline

pytest.importorskip("onnxruntime")

# Multi-byte characters, combining marks, emoji, CJK, tabs and runs of spaces: offsets must stay exact.
AWKWARD_NOTES = [
    "Paciente con fiebre 🤒 y tos.\tDiagnóstico de neumonía (NAC).  Se realizó radiografía de tórax…",
    "Niega dolor torácico; 患者 hipertensión arterial conocida.\n\n\nEcocardiograma: normal.",
    "Cafe\u0301 y te\u0301 sin disnea — diabetes mellitus tipo 2 (DM2); colecistectomía ✔.",
    " ".join(SAMPLE_NOTES * 6),  # several windows once the window is shrunk below
]


def spans_of(pipeline: TaggerPipeline, texts: list[str]) -> list[set[tuple[str, int, int]]]:
    return [{(s.label, s.start, s.end) for s in doc} for doc in pipeline.predict(texts)]


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("int8-cache")


def test_layer_groups_name_the_sensitive_layers() -> None:
    groups = quantize.parameter_groups
    assert groups("encoder.encoder.layer.0.attention.output.dense", 12) == {
        "first",
        "block0",
        "attn_out",
        "attn_out.block0",
    }
    assert groups("encoder.encoder.layer.11.output.dense", 12) == {"last", "block11", "ffn_out", "ffn_out.block11"}
    assert groups("encoder.encoder.layer.5.intermediate.dense", 12) == {"block5", "ffn_in", "ffn_in.block5"}
    assert groups("encoder.encoder.layer.3.attention.self.key", 12) == {"block3", "key", "key.block3"}
    assert groups("encoder.embeddings.word_embeddings", 12) == {"embeddings"}
    assert groups("head.classifier", 12) == {"head"}
    assert quantize.check_groups(["block7", "head"]) == ["block7", "head"]
    assert "block3" in quantize._onnx_groups("Attention_3", "Attention", 12)  # the fused query/key/value
    assert "query.block3" in quantize._onnx_groups("Attention_3", "Attention", 12)
    assert "ffn_in.block3" not in quantize._onnx_groups("Attention_3", "Attention", 12)
    assert quantize.check_groups(["ffn_in.block3", "ffn_out.block11", "ffn_out"]) == [
        "ffn_in.block3",
        "ffn_out",
        "ffn_out.block11",
    ]
    for unknown in (["attention"], ["block"], ["block7x"], ["ffn_in.block"], ["head.block3"], ["ffn_in.3"]):
        with pytest.raises(ValueError, match="unknown layer groups"):
            quantize.check_groups(unknown)


def test_int8_finds_the_same_spans_as_fp32(tiny_tagger_path: Path, int8_cache: Path) -> None:
    fp32 = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path), precision="fp32")
    int8 = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path), precision="int8", cache_dir=int8_cache)
    assert int8.precision == "int8" and isinstance(int8.runner, quantize.OnnxRunner)
    assert all(p.device.type == "meta" for p in int8.tagger.parameters())  # torch weights released
    assert spans_of(int8, SAMPLE_NOTES) == spans_of(fp32, SAMPLE_NOTES)
    for index, (text, found) in enumerate(zip(SAMPLE_NOTES, int8.predict(SAMPLE_NOTES), strict=True)):
        assert {(s.label, text[s.start : s.end]) for s in found} == set(TRAINING_SPANS[index])


def test_word_embeddings_are_read_outside_the_session(tiny_tagger_path: Path, int8_cache: Path) -> None:
    """The cached graph's word-embedding table is a file read row by row, not an initializer of the session:
    the session is fed only the batch's rows, and the graph computes what the table inside it computed."""
    import numpy as np

    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    table = tagger.encoder.get_input_embeddings().weight.detach().numpy()
    path = quantize.int8_model_path(tagger, int8_cache)
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["word_table"] == list(table.shape)
    runner = quantize.OnnxRunner(path, threads=1)
    names = {i.name for i in runner.session.get_inputs()}
    assert names == {quantize.WORD_INDEX_INPUT, quantize.WORD_TABLE_INPUT, "attention_mask"}
    assert runner.words is not None
    ids = np.array([7, 2, table.shape[0] - 1, 7])
    assert np.array_equal(runner.words.lookup(ids), table[ids])
    with pytest.raises(ValueError, match="outside the word-embedding table"):
        runner.words.lookup(np.array([table.shape[0]]))
    # Each call feeds the unique rows of its batch only, and the logits match those of the whole table.
    fed: list[dict[str, np.ndarray]] = []
    run = runner.session.run
    runner.session.run = lambda names, feed: fed.append(feed) or run(names, feed)  # type: ignore[method-assign]
    batch = torch.tensor([[0, 5, 9, 5, 2], [0, 9, 9, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    logits = runner(batch, mask)
    assert fed[0][quantize.WORD_TABLE_INPUT].shape == (5, table.shape[1])  # rows 0, 1, 2, 5, 9
    whole = run(
        ["logits"],
        {quantize.WORD_TABLE_INPUT: table, quantize.WORD_INDEX_INPUT: batch.numpy(), "attention_mask": mask.numpy()},
    )[0]
    assert np.array_equal(logits.numpy(), whole)


@pytest.mark.parametrize(("policy", "spins"), [("PASSIVE", "0"), ("passive", "0"), ("ACTIVE", "1"), (None, "1")])
def test_the_int8_sessions_threads_wait_as_pytorchs_do(
    tiny_tagger_path: Path, int8_cache: Path, monkeypatch: pytest.MonkeyPatch, policy: str | None, spins: str
) -> None:
    """ONNX Runtime's threads spin between operations by default. Where the worker made OpenMP's threads sleep
    (``OMP_WAIT_POLICY=PASSIVE``, from ``FHIR_NER_THREAD_WAIT``), the int8 tagger's session sleeps too, so it does
    not take CPU from an I/O worker on the same cores; elsewhere it keeps ONNX Runtime's default."""
    path = quantize.int8_model_path(ClinicalTagger.from_pretrained(tiny_tagger_path), int8_cache)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    pipeline = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path), precision="int8", cache_dir=int8_cache)
    assert isinstance(pipeline.runner, quantize.OnnxRunner)
    for runner in (pipeline.runner, quantize.OnnxRunner(path, threads=2)):
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == spins
    forced = quantize.OnnxRunner(path, threads=2, spin=spins == "0")  # an explicit choice wins
    flipped = "1" if spins == "0" else "0"
    assert forced.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == flipped
    # Waiting differently changes when threads run, never what they compute.
    other = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path), precision="int8", cache_dir=int8_cache)
    other.runner = quantize.OnnxRunner(path, threads=2, rowwise=True, spin=spins == "0")
    assert spans_of(other, SAMPLE_NOTES) == spans_of(pipeline, SAMPLE_NOTES)


def test_int8_tags_a_window_the_same_whatever_it_is_batched_with(tiny_tagger_path: Path, int8_cache: Path) -> None:
    """Dynamic int8 quantises a call's activations with one scale, so in a batch a window's logits depend on the
    other windows (and on its padding); the pipeline runs the int8 graph row by row, so they do not."""
    import numpy as np

    path = quantize.int8_model_path(ClinicalTagger.from_pretrained(tiny_tagger_path), int8_cache)
    generator = torch.Generator().manual_seed(0)
    window = torch.randint(3, 200, (1, 24), generator=generator)
    others = torch.randint(3, 200, (3, 40), generator=generator)
    batch = torch.zeros((4, 40), dtype=torch.long)
    mask = torch.zeros((4, 40), dtype=torch.long)
    batch[0, :24], mask[0, :24] = window[0], 1
    batch[1:], mask[1:] = others, 1
    alone_mask = torch.ones((1, 24), dtype=torch.long)
    rowwise = quantize.OnnxRunner(path, threads=1, rowwise=True)
    alone = rowwise(window, alone_mask).numpy()[0]
    assert np.array_equal(rowwise(batch, mask).numpy()[0, :24], alone)
    assert np.array_equal(rowwise(batch[[0, 3]], mask[[0, 3]]).numpy()[0, :24], alone)
    batched = quantize.OnnxRunner(path, threads=1)
    assert not np.array_equal(batched(batch, mask).numpy()[0, :24], alone)  # what row by row prevents
    pipeline = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path), precision="int8", cache_dir=int8_cache)
    assert isinstance(pipeline.runner, quantize.OnnxRunner) and pipeline.runner.rowwise
    together = spans_of(pipeline, SAMPLE_NOTES)
    assert [spans_of(pipeline, [note])[0] for note in SAMPLE_NOTES] == together


def test_int8_keeps_decodings_guarantees_on_awkward_text(tiny_encoder: Path, int8_cache: Path) -> None:
    """A random (untrained) tagger tags all over the place; every span must still be exact and inside."""
    torch.manual_seed(3)
    tagger = ClinicalTagger.from_encoder(str(tiny_encoder), cnn_channels=16, cnn_kernel_size=3, dropout=0.0)
    pipeline = TaggerPipeline(tagger, precision="int8", cache_dir=int8_cache, batch_size=3)
    pipeline.window, pipeline.overlap = 40, 12  # the long note is read in overlapping windows
    results = pipeline.predict(AWKWARD_NOTES)
    assert sum(len(found) for found in results) > 10
    assert pipeline.stats["windows"] > len(AWKWARD_NOTES)
    for text, found in zip(AWKWARD_NOTES, results, strict=True):
        tokens = pipeline._tokenize(text)[1]
        for span in found:
            assert 0 <= span.start < span.end <= len(text)
            surface = text[span.start : span.end]
            assert surface == surface.strip() and surface
            assert refine_span(text, span.start, span.end) == (span.start, span.end)  # already snapped and trimmed
            assert any(s < span.end and e > span.start for s, e in tokens)  # covers a token of the note
            assert 0.0 <= span.score <= 1.0


def test_the_int8_graph_is_built_once_and_keyed_by_recipe(tiny_tagger_path: Path, int8_cache: Path) -> None:
    cache = int8_cache
    first = quantize.int8_model_path(ClinicalTagger.from_pretrained(tiny_tagger_path), cache)
    built = first.stat().st_mtime_ns
    again = quantize.int8_model_path(ClinicalTagger.from_pretrained(tiny_tagger_path), cache)
    assert again == first and again.stat().st_mtime_ns == built
    # What only decoding reads does not rebuild the graph: a new threshold, window lead or revision suffix.
    decoding = ClinicalTagger.from_pretrained(tiny_tagger_path)
    decoding.config.min_span_score, decoding.config.window_leads = 0.7, {"*": "Paciente."}
    decoding.config.min_span_score_by_language = {"es": 0.75}
    decoding.config.model_revision += "-lead"
    assert quantize.int8_model_path(decoding, cache) == first and first.stat().st_mtime_ns == built
    meta = json.loads((first.parent / "meta.json").read_text())
    assert meta["keep_fp32"] == sorted(quantize.DEFAULT_KEEP_FP32) and meta["per_channel"] is True
    assert meta["method"] == "onnxruntime-dynamic"
    # The recipe keeps every block's feed-forward output projection fp32 (and nothing else of the encoder).
    n_layers = ClinicalTagger.from_pretrained(tiny_tagger_path).encoder.config.num_hidden_layers
    kept_ffn_out = [n for n in meta["kept_fp32_nodes"] if n.endswith("/output/dense/MatMul") and "/attention/" not in n]
    assert len(kept_ffn_out) == n_layers
    assert not [n for n in meta["kept_fp32_nodes"] if "/encoder/layer." in n and n not in kept_ffn_out]
    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    tagger.config.extra[quantize.RECORD_KEY] = {"keep_fp32": ["head"]}
    other = quantize.int8_model_path(tagger, cache)
    assert other.parent != first.parent
    assert json.loads((other.parent / "meta.json").read_text())["keep_fp32"] == ["head"]
    assert not list(cache.glob(".*.tmp"))  # no half-built entries left behind
    # Weights live beside the graph (memory-mapped by the session), the word-embedding table in its own file
    # (read row by row), and only the graph, weights, table and meta stay.
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [first.name, first.name + quantize.WEIGHTS_DATA_SUFFIX, first.name + quantize.WORD_TABLE_SUFFIX, "meta.json"]
    )
    assert first.stat().st_size < (first.parent / (first.name + quantize.WEIGHTS_DATA_SUFFIX)).stat().st_size


def test_one_blocks_ffn_in_is_kept_fp32_in_the_built_graph(tiny_tagger_path: Path, int8_cache: Path) -> None:
    """``ffn_in.block<k>`` keeps exactly block k's feed-forward expansion fp32 (a plain MatMul in the graph) and
    quantises every other block's; the keep set is part of the cache key, so it is a graph of its own."""
    import onnx

    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    n_layers = tagger.encoder.config.num_hidden_layers
    assert n_layers >= 2
    ffn_in = [f"/tagger/encoder/encoder/layer.{k}/intermediate/dense/MatMul" for k in range(n_layers)]
    paths = {}
    for keep in (["embeddings", "head", "ffn_out", "ffn_in.block1"], ["embeddings", "head", "ffn_out", "ffn_in"]):
        tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
        tagger.config.extra[quantize.RECORD_KEY] = {"keep_fp32": keep}
        paths[keep[-1]] = path = quantize.int8_model_path(tagger, int8_cache)
        meta = json.loads((path.parent / "meta.json").read_text())
        kept_in = sorted(n for n in meta["kept_fp32_nodes"] if n in ffn_in)
        assert kept_in == ([ffn_in[1]] if keep[-1] == "ffn_in.block1" else ffn_in)
        nodes = {n.name: n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        for k, name in enumerate(ffn_in):
            fp32 = k == 1 or keep[-1] == "ffn_in"
            assert (nodes.get(name) == "MatMul") == fp32  # kept: the original fp32 MatMul node
            assert any(n.startswith(name) and n != name for n in nodes) != fp32  # quantised: its int8 nodes
    assert paths["ffn_in.block1"].parent != paths["ffn_in"].parent


def test_auto_runs_int8_on_cpu_only_when_this_checkpoint_was_validated(
    tiny_tagger_path: Path, tmp_path: Path, int8_cache: Path
) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_tagger_path, checkpoint)
    assert TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu").precision == "fp32"

    def record(meets_bar: bool, digest: str) -> None:
        config = json.loads((checkpoint / "tagger_config.json").read_text())
        config["extra"][quantize.RECORD_KEY] = {"meets_bar": meets_bar, "weights_sha256": digest}
        (checkpoint / "tagger_config.json").write_text(json.dumps(config))

    digest = quantize.weights_digest(checkpoint)
    record(True, digest)
    # Same weights and config as the tiny checkpoint: its cached graph is reused (keyed by content, not path).
    auto = TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu", cache_dir=int8_cache)
    assert auto.precision == "int8"
    record(False, digest)  # int8 missed the bar
    assert TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu").precision == "fp32"
    config = json.loads((checkpoint / "tagger_config.json").read_text())
    config["extra"][quantize.RECORD_KEY] = {"meets_bar": True, "weights_sha256": digest, "auto": False}
    (checkpoint / "tagger_config.json").write_text(json.dumps(config))  # validated, but kept out of auto
    assert TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu").precision == "fp32"
    record(True, "0" * 64)  # a record copied from other weights is not trusted
    assert TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu").precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), precision="int4")


def test_native_bf16_means_amx_tiles_or_avx512_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    def probes(amx: bool | None, avx512_bf16: bool | None) -> None:
        for name, value in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16)):
            if value is None:
                monkeypatch.delattr(torch.cpu, name, raising=False)
            else:
                monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)

    probes(amx=True, avx512_bf16=False)  # Intel Sapphire Rapids and later
    assert quantize.cpu_has_fast_bf16() and quantize.cpu_bf16_units() == {"amx": True, "avx512_bf16": False}
    probes(amx=False, avx512_bf16=True)  # AMD Zen 4 and later, Intel Cooper Lake
    assert quantize.cpu_has_fast_bf16()
    probes(amx=False, avx512_bf16=False)  # AVX2 and plain AVX-512 CPUs: bf16 would be emulated
    assert not quantize.cpu_has_fast_bf16()
    probes(amx=None, avx512_bf16=None)  # a PyTorch without the probes
    assert not quantize.cpu_has_fast_bf16() and quantize.cpu_bf16_units() == {"amx": False, "avx512_bf16": False}


def test_auto_runs_bf16_on_a_cpu_with_native_bf16_only_when_this_checkpoint_validated_it(
    tiny_tagger_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_tagger_path, checkpoint)
    digest = quantize.weights_digest(checkpoint)

    def record(key: str, **fields: object) -> None:
        config = json.loads((checkpoint / "tagger_config.json").read_text())
        config["extra"][key] = fields
        (checkpoint / "tagger_config.json").write_text(json.dumps(config))

    def auto() -> str:
        return TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu").precision

    monkeypatch.setattr(quantize, "cpu_has_fast_bf16", lambda: True)
    assert auto() == "fp32"  # no record
    record(quantize.BF16_RECORD_KEY, meets_bar=True, weights_sha256=digest)
    assert auto() == "bf16"
    # bf16 finds what fp32 finds on the trained tiny tagger, with the same offsets.
    pipeline = TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu")
    fp32 = TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), device="cpu", precision="fp32")
    assert pipeline.precision == "bf16" and spans_of(pipeline, SAMPLE_NOTES) == spans_of(fp32, SAMPLE_NOTES)
    monkeypatch.setattr(quantize, "cpu_has_fast_bf16", lambda: False)
    assert auto() == "fp32"  # without AMX or AVX512-BF16 bf16 is emulated, slower than fp32
    monkeypatch.setattr(quantize, "cpu_has_fast_bf16", lambda: True)
    record(quantize.BF16_RECORD_KEY, meets_bar=False, weights_sha256=digest)  # missed the bar somewhere
    assert auto() == "fp32"
    record(quantize.BF16_RECORD_KEY, meets_bar=True, weights_sha256=digest, auto=False)  # opted out of auto
    assert auto() == "fp32"
    record(quantize.BF16_RECORD_KEY, meets_bar=True, weights_sha256="0" * 64)  # another checkpoint's record
    assert auto() == "fp32"
    # A validated int8 model comes first (it is the smaller one).
    record(quantize.BF16_RECORD_KEY, meets_bar=True, weights_sha256=digest)
    record(quantize.RECORD_KEY, meets_bar=True, weights_sha256=digest)
    monkeypatch.setattr(quantize, "int8_validated", lambda tagger: True)
    assert auto() == "int8"


def test_the_default_checkpoint_records_bf16_within_the_bar_in_every_language() -> None:
    from worker.runtime import default_model_path

    checkpoint = default_model_path()
    assert checkpoint is not None
    tagger = ClinicalTagger.from_pretrained(checkpoint)
    record = tagger.config.extra[quantize.BF16_RECORD_KEY]
    assert set(record["by_language"]) >= {"en", "it", "nl", "ro", "sv", "cs"}
    # Measured with bf16 kernels: native (AMX or AVX512-BF16) or PyTorch's emulation on other CPUs (session 15's
    # record: bf16-rounded inputs and outputs, float32 sums, as the native kernels; they round a little differently
    # from each other, so each kind keeps its own measurement and all must meet the bar).
    measurements = [record, *record.get("other_cpus", [])]
    assert {entry["measured_on"]["bf16_isa"] for entry in measurements} <= {"amx", "avx512_bf16", "emulated"}
    for entry in measurements:
        assert set(entry["by_language"]) >= {"es", "en", "it", "nl", "ro", "sv", "cs"} and entry["meets_bar"]
        for scores in entry["by_language"].values():
            assert min(scores["delta"].values()) >= -record["bar"]
            for key in ("strict_f1", "overlap_f1"):
                assert scores["delta"][key] == pytest.approx(scores["bf16"][key] - scores["fp32"][key], abs=1e-4)
    assert record["meets_bar"] and quantize.bf16_validated(tagger)


def test_a_bf16_record_keeps_each_cpu_kinds_measurement_and_meets_the_bar_only_if_all_did() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from eval_languages import merge_bf16_records

    def measured(isa: str, drop: float, weights: str = "a" * 64) -> dict[str, object]:
        scores = {"fp32": {"strict_f1": 0.6}, "bf16": {"strict_f1": 0.6 - drop}, "delta": {"strict_f1": -drop}}
        return {
            "by_language": {"es": scores},
            "meets_bar": drop <= 0.005,
            "weights_sha256": weights,
            "measured_on": {"machine": "x86_64", "bf16_isa": isa},
        }

    amx = measured("amx", 0.001)
    assert merge_bf16_records(None, amx) == amx
    both = merge_bf16_records(amx, measured("avx512_bf16", 0.002))
    assert both["measured_on"]["bf16_isa"] == "avx512_bf16" and both["meets_bar"]
    assert [entry["measured_on"]["bf16_isa"] for entry in both["other_cpus"]] == ["amx"]
    again = merge_bf16_records(both, measured("amx", 0.003))  # re-measured on AMX: replaces AMX's, keeps the other
    assert again["measured_on"]["bf16_isa"] == "amx"
    assert [entry["measured_on"]["bf16_isa"] for entry in again["other_cpus"]] == ["avx512_bf16"]
    missed = merge_bf16_records(again, measured("avx512_bf16", 0.02))  # one kind of CPU missed the bar
    assert not missed["meets_bar"]
    assert "other_cpus" not in merge_bf16_records(missed, measured("amx", 0.0, weights="b" * 64))  # other weights


def test_smoothing_moves_outliers_into_the_weights_without_changing_the_function(tiny_tagger_path: Path) -> None:
    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    ids = torch.tensor([tagger.tokenizer(SAMPLE_NOTES[0])["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before, _ = tagger(ids, mask)
        absmax = quantize.activation_absmax(tagger, [ids[0].tolist()])
        assert set(absmax) == {
            n
            for n, _ in tagger.named_modules()
            if n.endswith(("intermediate.dense", "output.dense")) and "attention" not in n
        }
        scales = quantize.smoothing_scales(tagger, absmax)
        quantize.apply_smoothing(tagger, scales)
        after, _ = tagger(ids, mask)
    assert isinstance(tagger.get_submodule("encoder.encoder.layer.0.output.dense"), quantize.SmoothedLinear)
    assert torch.allclose(before, after, atol=1e-4)
    # The smoothed layers keep their groups, so keep_fp32 still finds them in the exported graph.
    assert quantize.parameter_groups("encoder.encoder.layer.1.output.dense.linear", 2) == {
        "last",
        "block1",
        "ffn_out",
        "ffn_out.block1",
    }


def test_predict_precision_flag_and_setting(
    tiny_tagger_path: Path, tmp_path: Path, int8_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from adapter.cli import main
    from core.settings import Settings, get_settings

    notes = tmp_path / "notes"
    notes.mkdir()
    for index, text in enumerate(SAMPLE_NOTES):
        (notes / f"note{index}.txt").write_text(text, encoding="utf-8")
    monkeypatch.setenv("FHIR_NER_CACHE_DIR", str(int8_cache))
    monkeypatch.setenv("FHIR_NER_PRECISION", "fp32")
    get_settings.cache_clear()
    try:
        outputs = {}
        for flag in (["--precision", "int8"], []):
            pred = tmp_path / f"pred{len(flag)}.tsv"
            args = ["predict", "--input", str(notes), "--output", str(pred), "--model", str(tiny_tagger_path), *flag]
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            outputs[len(flag)] = pred.read_text(encoding="utf-8")
            precision = json.loads(Path(f"{pred}.meta.json").read_text())["precision"]
            assert precision == ("int8" if flag else "fp32")  # the flag wins over FHIR_NER_PRECISION
        strip_scores = [[line.split("\t")[:5] for line in text.splitlines()] for text in outputs.values()]
        assert strip_scores[0] == strip_scores[1]  # same spans, same exact text slices
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("FHIR_NER_PRECISION", "int4")
    with pytest.raises(ValueError):
        Settings()


def test_static_int8_is_built_from_the_checkpoints_calibration_windows(
    tiny_tagger_path: Path, tmp_path: Path, int8_cache: Path
) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_tagger_path, checkpoint)
    fp32 = TaggerPipeline(ClinicalTagger.from_pretrained(checkpoint), precision="fp32")
    tokenizer = fp32.tokenizer
    windows = [list(tokenizer(text)["input_ids"]) for text in SAMPLE_NOTES]
    quantize.save_calibration_windows(checkpoint, windows)
    assert quantize.load_calibration_windows(checkpoint) == windows
    tagger = ClinicalTagger.from_pretrained(checkpoint)
    assert quantize.recipe(tagger)["method"] == "onnxruntime-static"
    int8 = TaggerPipeline(tagger, precision="int8", cache_dir=int8_cache)
    meta = json.loads((Path(int8.runner.path).parent / "meta.json").read_text())
    assert meta["method"] == "onnxruntime-static" and meta["calibration"]
    assert meta["keep_fp32"] == sorted(quantize.STATIC_KEEP_FP32)
    assert spans_of(int8, SAMPLE_NOTES) == spans_of(fp32, SAMPLE_NOTES)
