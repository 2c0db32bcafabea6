"""wav2vec 2.0 with a CTC head, our own: loads Hugging Face `Wav2Vec2ForCTC` folders and equals
`transformers` on them (tests/test_voice_wav2vec2.py).

    model, vocab, extractor = load_folder("path/to/folder")   # config.json, weights, vocab.json, ...
    vocab.decode(model(audio)[0].argmax(-1).tolist())          # greedy CTC decoding
    load_asr("path/to/folder").transcribe(clip)                # behind the ASR interface (asr.py)

The model, bottom up (Baevski et al. 2020):
- feature encoder: a stack of 1-D convolutions over the raw waveform (the first normalised by
  GroupNorm, or every one by LayerNorm), 320 samples per output frame in the base shape (20 ms);
- feature projection: LayerNorm and a linear map to the transformer's width;
- convolutional positional embedding: a wide grouped convolution over time (weight-normalised)
  added to the frames, instead of position vectors, so any length works;
- a transformer encoder, post-norm (the base models) or pre-norm ("stable layer norm", large);
- the CTC head: a linear map to the character vocabulary, where <pad> is the CTC blank and `|`
  separates words. Greedy decoding takes each frame's best character, merges repeats, drops blanks.

Module names equal those of `transformers`, so a checkpoint's state dict loads as it is. The
feature extractor's settings come from preprocessor_config.json (or processor_config.json): its
sampling rate (audio is resampled to it) and `do_normalize` (zero mean, unit variance per clip, as
transformers does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from parley.model.tokenizer import read_optional_json, token_text


class Wav2Vec2Error(ValueError):
    """A folder or config this implementation cannot load (one line, saying why)."""


@dataclass
class Wav2Vec2Config:
    """The fields of an HF Wav2Vec2Config that inference uses (same names and defaults)."""

    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False

    @classmethod
    def from_hf(cls, config: dict) -> Wav2Vec2Config:
        if config.get("model_type", "wav2vec2") != "wav2vec2":
            raise Wav2Vec2Error(f"model_type {config.get('model_type')!r} is not wav2vec2")
        if config.get("add_adapter") or config.get("adapter_attn_dim"):
            raise Wav2Vec2Error("wav2vec 2.0 adapters (add_adapter, adapter_attn_dim) are not supported")
        cfg = cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})
        if cfg.feat_extract_norm not in ("group", "layer"):
            raise Wav2Vec2Error(f"feat_extract_norm must be group or layer, not {cfg.feat_extract_norm!r}")
        if not len(cfg.conv_dim) == len(cfg.conv_stride) == len(cfg.conv_kernel):
            raise Wav2Vec2Error("conv_dim, conv_stride and conv_kernel must have the same length")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise Wav2Vec2Error("hidden_size must be a multiple of num_attention_heads")
        return cfg

    @property
    def frame_samples(self) -> int:
        """Input samples per output frame (320 in the base shape: 20 ms at 16 kHz)."""
        return int(np.prod(self.conv_stride))


_ACT = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "silu": F.silu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def _act(name: str):
    if name not in _ACT:
        raise Wav2Vec2Error(f"activation {name!r} is not supported: use one of {', '.join(_ACT)}")
    return _ACT[name]


class ConvLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, i: int, norm: str | None):
        super().__init__()
        cin, cout = cfg.conv_dim[i - 1] if i else 1, cfg.conv_dim[i]
        self.conv = nn.Conv1d(cin, cout, cfg.conv_kernel[i], stride=cfg.conv_stride[i], bias=cfg.conv_bias)
        self.norm = norm
        if norm == "group":  # one group per channel: each channel normalised over time
            self.layer_norm = nn.GroupNorm(cout, cout)
        elif norm == "layer":  # over the channels of each frame
            self.layer_norm = nn.LayerNorm(cout)
        self.act = _act(cfg.feat_extract_activation)

    def forward(self, x):  # (batch, channels, time)
        x = self.conv(x)
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return self.act(x)


class FeatureEncoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        norms = ["group" if i == 0 else None for i in range(len(cfg.conv_dim))] if cfg.feat_extract_norm == "group" \
            else ["layer"] * len(cfg.conv_dim)
        self.conv_layers = nn.ModuleList(ConvLayer(cfg, i, n) for i, n in enumerate(norms))

    def forward(self, audio):  # (batch, samples) -> (batch, frames, conv_dim[-1])
        x = audio[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x):
        return self.projection(self.layer_norm(x))


class PositionalConv(nn.Module):
    """A grouped convolution over time, weight-normalised along the kernel axis (dim 2)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=k // 2, groups=cfg.num_conv_pos_embedding_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if k % 2 == 0 else 0  # an even kernel with k//2 padding gives one frame too many
        self.act = _act(cfg.feat_extract_activation)

    def forward(self, x):  # (batch, frames, hidden)
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, :-self.trim]
        return self.act(y).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.hidden_size, cfg.hidden_size)
                                                                for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _act(cfg.hidden_act)

    def forward(self, x):
        return self.output_dense(self.act(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.attention = Attention(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = cfg.do_stable_layer_norm
        self.pos_conv_embed = PositionalConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x):
        x = x + self.pos_conv_embed(x)
        if not self.pre_norm:  # post-norm: normalise the input; pre-norm: the output
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.pre_norm else x


class Wav2Vec2(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.feature_extractor = FeatureEncoder(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, audio):
        return self.encoder(self.feature_projection(self.feature_extractor(audio)))


class Wav2Vec2CTC(nn.Module):
    """Raw audio (batch, samples) -> character logits (batch, frames, vocab)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.config = cfg
        self.wav2vec2 = Wav2Vec2(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, audio):
        return self.lm_head(self.wav2vec2(audio))


# ---------------------------------------------------------------- loading and decoding

def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, with the old weight-norm names (weight_g/weight_v) renamed to the
    parametrization's (original0/original1), and the pretraining-only mask vector dropped."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise Wav2Vec2Error(f"{folder} has no model.safetensors or pytorch_model.bin")
    renamed = {}
    for key, value in state.items():
        key = key.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
        key = key.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
        if not key.endswith("masked_spec_embed"):
            renamed[key] = value
    return renamed


class CTCVocab:
    """Characters of a Wav2Vec2CTCTokenizer's vocab.json; the pad token is the CTC blank."""

    def __init__(self, vocab: dict[str, int], blank: str = "<pad>", delimiter: str = "|"):
        self.tokens = {i: t for t, i in vocab.items()}
        self.blank, self.delimiter = blank, delimiter

    def decode(self, ids) -> str:
        chars = [self.tokens.get(int(i), "") for i, _ in groupby(ids)]
        return "".join(" " if c == self.delimiter else c for c in chars if c != self.blank).strip()


def load_folder(folder: str | Path, dtype: str = "float32") -> tuple[Wav2Vec2CTC, CTCVocab, dict]:
    """An HF Wav2Vec2ForCTC folder as (model in eval mode, its CTC vocabulary, the feature
    extractor's settings from preprocessor_config.json)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "vocab.json").is_file():
        raise Wav2Vec2Error(f"{folder} is not a Wav2Vec2ForCTC folder (config.json and vocab.json are needed)")
    if dtype not in ("float32", "bfloat16"):
        raise Wav2Vec2Error(f"dtype {dtype!r}: use float32 (equals transformers) or bfloat16")
    model = Wav2Vec2CTC(Wav2Vec2Config.from_hf(json.loads((folder / "config.json").read_text())))
    missing, unexpected = model.load_state_dict(load_state(folder), strict=False)
    if missing or unexpected:
        raise Wav2Vec2Error(f"{folder}: the weights do not fit the config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    tok = read_optional_json(folder / "tokenizer_config.json")
    vocab = json.loads((folder / "vocab.json").read_text())
    if vocab and isinstance(next(iter(vocab.values())), dict):  # a multilingual vocab: {lang: {char: id}}
        raise Wav2Vec2Error("multilingual wav2vec 2.0 vocabularies are not supported")
    ctc = CTCVocab(vocab, token_text(tok.get("pad_token")) or "<pad>", token_text(tok.get("word_delimiter_token")) or "|")
    # the feature extractor's settings: preprocessor_config.json, or (transformers 5) inside processor_config.json
    extractor = read_optional_json(folder / "preprocessor_config.json") or read_optional_json(
        folder / "processor_config.json").get("feature_extractor", {})
    return model.to(getattr(torch, dtype)).eval(), ctc, extractor

