"""Tiny encoders and taggers built from scratch for tests: no network, no downloads, seconds to build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SAMPLE_NOTES = [
    "Paciente con fiebre y tos. Diagnóstico de neumonía. Se realizó radiografía de tórax.",
    "Patient with fever and cough. Diagnosis of pneumonia. A chest radiograph was performed.",
    "No presenta disnea. Antecedentes de diabetes mellitus. Se programa colecistectomía.",
    "Niega dolor torácico. Hipertensión arterial conocida. Ecocardiograma normal.",
]

TRAINING_SPANS = {
    0: [("SYMPTOM", "fiebre"), ("SYMPTOM", "tos"), ("DISEASE", "neumonía"), ("PROCEDURE", "radiografía de tórax")],
    1: [("SYMPTOM", "fever"), ("SYMPTOM", "cough"), ("DISEASE", "pneumonia"), ("PROCEDURE", "chest radiograph")],
    2: [("SYMPTOM", "disnea"), ("DISEASE", "diabetes mellitus"), ("PROCEDURE", "colecistectomía")],
    3: [("SYMPTOM", "dolor torácico"), ("DISEASE", "Hipertensión arterial"), ("PROCEDURE", "Ecocardiograma")],
}


def char_spans(index: int) -> list[tuple[str, int, int]]:
    text = SAMPLE_NOTES[index]
    spans = []
    for label, surface in TRAINING_SPANS[index]:
        start = text.index(surface)
        spans.append((label, start, start + len(surface)))
    return spans


def build_tiny_encoder(folder: Path, hidden: int = 32, layers: int = 2, max_positions: int = 512) -> Path:
    """A BERT-style encoder with a WordPiece tokenizer trained on the sample notes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(SAMPLE_NOTES * 4, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_positions,
    )
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=max_positions,
    )
    model = BertModel(config, add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def train_tiny_tagger(encoder_folder: Path, output: Path, steps: int = 150) -> Path:
    """Fit the tiny tagger on the sample notes until it reproduces their spans (a memorisation test)."""
    from worker.nlp.decoding import spans_to_tags
    from worker.nlp.encoders import special_affixes
    from worker.nlp.tagger import ClinicalTagger

    torch.manual_seed(0)
    tagger = ClinicalTagger.from_encoder(str(encoder_folder), cnn_channels=32, cnn_kernel_size=3, dropout=0.0)
    tokenizer = tagger.tokenizer
    batch_ids, batch_tags = [], []
    for index, text in enumerate(SAMPLE_NOTES):
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        offsets = np.asarray(encoded["offset_mapping"]).reshape(-1, 2)
        tags = spans_to_tags(offsets, char_spans(index), tagger.labels)
        prefix, suffix = special_affixes(tokenizer)
        ids = prefix + list(encoded["input_ids"]) + suffix
        full = np.full((len(ids), len(tagger.labels)), -100)
        full[len(prefix) : len(prefix) + len(tags)] = tags
        batch_ids.append(ids)
        batch_tags.append(full)
    width = max(len(i) for i in batch_ids)
    ids = torch.zeros((len(batch_ids), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    tags = torch.full((len(batch_ids), width, len(tagger.labels)), -100, dtype=torch.long)
    for row, (seq, tag) in enumerate(zip(batch_ids, batch_tags, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        tags[row, : len(seq)] = torch.tensor(tag)
    optimiser = torch.optim.AdamW(tagger.parameters(), lr=3e-3)
    tagger.train()
    for _ in range(steps):
        optimiser.zero_grad()
        _, loss = tagger(ids, mask, tags)
        assert loss is not None
        loss.backward()
        optimiser.step()
    tagger.eval()
    tagger.config.model_revision = "tiny-test"
    tagger.save_pretrained(output)
    return output
