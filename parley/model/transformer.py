"""The Parley decoder: one transformer for the Llama family and its named variations, in one file.

    from parley.model.transformer import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    logits = model(torch.randint(0, 256, (1, 8)))            # (batch, time, vocab)

Parameter names and shapes follow Hugging Face's LlamaForCausalLM / MixtralForCausalLM
(`model.layers.0.self_attn.q_proj.weight`, `...block_sparse_moe.experts.3.w1.weight`), so a
state dict moves between the two without renaming. Config fields use HF's names too.

The other families are the same network with small, named variations, each a config field
(parley/model/weights.py maps each family's files onto them):
  - RoPE scaling `rope_scaling` of type llama3 / linear / yarn / longrope (Llama 3, Phi-3);
  - `qkv_bias` (Qwen2), `qk_norm` and an explicit `head_dim` (Qwen3, Gemma 3);
  - MoE routing options: `norm_topk_prob`, `moe_intermediate_size`, a shared expert,
    dense layers among sparse ones (`decoder_sparse_step`, `mlp_only_layers`) (Qwen-MoE);
  - Gemma 3 (`model_type` "gemma3_text"): GeGLU (`hidden_act`), embeddings scaled by
    sqrt(hidden), (1 + weight) RMSNorms, norms before and after both sublayers,
    `query_pre_attn_scalar`, per-layer sliding or full attention (`layer_types`,
    `sliding_window`) with their own RoPE base (`rope_local_base_freq`), logit soft-capping.
Phi-3's fused qkv and gate/up projections are split on import and fused again on export.

Two forwards: without a cache, the plain causal pass over whole sequences (training, and
the reference every faster path is tested against); with a `PagedBatch` (implemented by
engine/cache.py), inference: the new tokens of several sequences packed into one row, each
attending to its own sequence's keys and values in the paged cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


FAMILIES = ("llama", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma3_text", "phi3")  # llama: Mistral, Mixtral too
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


# what each field of ModelConfig may hold; None only where the field's default is None
_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts_per_tok", "decoder_sparse_step",
           "sliding_window", "moe_intermediate_size")  # whole numbers >= 1
_SIZES = ("num_local_experts", "shared_expert_intermediate_size")  # whole numbers >= 0
_SCALES = ("rope_theta", "rms_norm_eps", "query_pre_attn_scalar", "rope_local_base_freq")  # finite, > 0
_CAPS = ("router_aux_loss_coef", "final_logit_softcapping", "attn_logit_softcapping")  # finite, >= 0
_OPTIONAL = ("head_dim", "sliding_window", "moe_intermediate_size", "query_pre_attn_scalar", "rope_local_base_freq",
             "final_logit_softcapping", "attn_logit_softcapping")
# the parameters each kind of RoPE scaling computes with (transformer's modeling_rope_utils); numbers, or lists
_ROPE_NEEDS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"),
               "yarn": ("original_max_position_embeddings",), "longrope": ("original_max_position_embeddings",)}


def _bad_number(cfg: "ModelConfig") -> str | None:
    """What is wrong with the first number-valued field that is not a number in its range, or None."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in (*_COUNTS, *_SIZES, *_SCALES, *_CAPS):
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL:
            continue
        if name in _COUNTS or name in _SIZES:
            low = 1 if name in _COUNTS else 0
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                return f"{name} must be a whole number >= {low} (got {v!r})"
        elif not (number(v) and (v > 0 if name in _SCALES else v >= 0)):
            return f"{name} must be a finite number {'> 0' if name in _SCALES else '>= 0'} (got {v!r})"
    if not (isinstance(cfg.mlp_only_layers, list) and all(isinstance(i, int) for i in cfg.mlp_only_layers)):
        return f"mlp_only_layers must be a list of layer numbers (got {cfg.mlp_only_layers!r})"
    return None


def _bad_rope_scaling(cfg: "ModelConfig") -> str | None:
    """What rope_scaling lacks for its kind, or None: its parameters are numbers (longrope's
    factors one per rotated pair), checked here rather than where the tables are computed."""
    scaling = cfg.rope_scaling
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        return f"rope_scaling must be a mapping of RoPE parameters (got {scaling!r})"
    kind = scaling.get("rope_type", "default")
    for key in (*_ROPE_NEEDS.get(kind, ()), *(k for k in ("factor", "attention_factor") if scaling.get(k) is not None)):
        v = scaling.get(key)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            return f"rope_scaling ({kind}) needs {key} as a positive number (got {v!r})"
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            v = scaling.get(key)
            if not (isinstance(v, list) and len(v) == cfg.head_dim // 2 and
                    all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v)):
                return f"rope_scaling (longrope) needs {key} as a list of {cfg.head_dim // 2} positive numbers"
    return None


@dataclass
class ModelConfig:
    """Shape of the network. Field names match HF `config.json` keys."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None  # default: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v/o projections (HF Llama's `attention_bias`)
    num_local_experts: int = 0  # 0: dense SwiGLU feed-forward; >= 2: sparse mixture of experts
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    # -- the families' variations (defaults: plain Llama / Mixtral)
    model_type: str = "llama"  # the HF family it came from and exports as: FAMILIES
    hidden_act: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU, Gemma)
    qkv_bias: bool = False  # bias on q/k/v but not o (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    rope_scaling: dict | None = None  # HF's parameters: {"rope_type": llama3 | linear | yarn | longrope, ...}
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this), not 1/sqrt(head_dim) (Gemma)
    sliding_window: int | None = None  # sliding layers see this many positions, their own included
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention"; None: all
    # sliding when sliding_window is set (Mistral), else all full
    rope_local_base_freq: float | None = None  # RoPE base of the sliding layers (Gemma 3)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcapping: float | None = None  # the same on attention scores
    moe_intermediate_size: int | None = None  # expert width (default intermediate_size, as Mixtral)
    shared_expert_intermediate_size: int = 0  # an always-on expert beside the routed ones (Qwen2-MoE)
    norm_topk_prob: bool = True  # renormalize the top-k router probabilities (Mixtral: always)
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here

    def __post_init__(self):
        bad = _bad_number(self)
        if bad:  # before any arithmetic: a config.json or GGUF header may hold anything
            raise ValueError(f"invalid model config: {bad}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        bad = _bad_rope_scaling(self)
        if bad:
            raise ValueError(f"invalid model config: {bad}")
        checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.num_hidden_layers > 0, "num_hidden_layers must be positive"),
            (self.num_attention_heads > 0 and self.num_key_value_heads > 0, "head counts must be positive"),
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.head_dim % 2 == 0, "head_dim must be even (rotary embeddings rotate pairs)"),
            (self.num_local_experts == 0 or self.num_local_experts >= 2, "num_local_experts must be 0 or >= 2"),
            (self.num_local_experts == 0 or 1 <= self.num_experts_per_tok <= self.num_local_experts,
             "num_experts_per_tok must be between 1 and num_local_experts"),
            (self.model_type in FAMILIES, f"model_type must be one of {', '.join(FAMILIES)}"),
            (self.hidden_act in ACTIVATIONS, f"hidden_act must be one of {', '.join(ACTIVATIONS)}"),
            ((self.rope_scaling or {}).get("rope_type", "default") in ROPE_TYPES,
             f"rope_scaling's rope_type must be one of {', '.join(ROPE_TYPES)}"),
            (self.sliding_window is None or self.sliding_window >= 1, "sliding_window must be positive"),
            (self.layer_types is None or (len(self.layer_types) == self.num_hidden_layers and
                                          set(self.layer_types) <= {"sliding_attention", "full_attention"}),
             "layer_types must name sliding_attention or full_attention for each layer"),
            (self.layer_types is None or "sliding_attention" not in self.layer_types or self.sliding_window,
             "sliding layers need a sliding_window"),
            (self.decoder_sparse_step >= 1, "decoder_sparse_step must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid model config: {message}")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, context: int = 1024, experts: int = 0,
                   experts_per_token: int = 2, head_dim: int = 64) -> "ModelConfig":
        """The one size dial (as nanochat's --depth): width 64 * depth, 64-wide heads, GQA
        with half as many key/value heads, SwiGLU at 8/3 of the width. With experts, each
        expert is 1/experts_per_token of that width, so a token's active parameters equal
        the dense model's."""
        if depth < 1:
            raise ValueError(f"depth must be at least 1 (got {depth})")
        width = 64 * depth
        heads = max(1, width // head_dim)
        ffn = 64 * round(width * 8 / 3 / 64)
        if experts:
            ffn = max(64, 64 * round(ffn / experts_per_token / 64))
        return cls(vocab_size=vocab_size, hidden_size=width, intermediate_size=ffn, num_hidden_layers=depth,
                   num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
                   max_position_embeddings=context, tie_word_embeddings=True, num_local_experts=experts,
                   num_experts_per_tok=experts_per_token if experts else 2)

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def gemma(self) -> bool:
        """Gemma's variations: scaled embeddings, (1 + weight) norms, norms around both sublayers."""
        return self.model_type == "gemma3_text"

    def moe_layer(self, i: int) -> bool:
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def window(self, i: int) -> int | None:
        """Layer i's sliding window (None: it sees the whole context)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def has_window(self) -> bool:
        return any(self.window(i) for i in range(self.num_hidden_layers))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def num_params(self, active: bool = False) -> int:
        """Parameter count; with active=True, only what one token uses (top-k experts)."""
        h, hd, nh, nkv = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = h * hd * (nh * 2 + nkv * 2) + 2 * hd * self.qk_norm
        attn += (nh + 2 * nkv) * hd * (self.attention_bias or self.qkv_bias) + h * self.attention_bias
        norms = (4 if self.gemma else 2) * h
        experts = self.num_experts_per_tok if active else self.num_local_experts
        expert = self.moe_intermediate_size or self.intermediate_size
        sparse = 3 * h * expert * experts + h * self.num_local_experts
        if self.shared_expert_intermediate_size:
            sparse += 3 * h * self.shared_expert_intermediate_size + h
        dense = 3 * h * self.intermediate_size
        ffn = sum(sparse if self.moe_layer(i) else dense for i in range(self.num_hidden_layers))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + norms) + ffn + h + emb


class PagedBatch(Protocol):
    """One step over a paged KV cache: the input row packs tokens of several sequences."""

    positions: torch.Tensor  # (1, N): each packed token's position in its own sequence
    outputs: torch.Tensor  # (M,): the packed tokens whose logits the forward returns

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (1, kv_heads, N, hd) and return attention outputs shaped like q (1, heads, N, hd),
        attending as `attention` does with the config's scale, layer window and soft-cap."""


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees: causal, and within the layer's sliding window if it has one
    (a window of w sees w positions, its own included, as in transformers)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def attention(q, k, v, mask: torch.Tensor | None, cfg: ModelConfig, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v, with GQA; q (.., heads, T, hd), k and v
    (.., kv_heads, S, hd), mask broadcastable to (.., T, S) (True: visible)."""
    scale, cap = cfg.attention_scale, cfg.attn_logit_softcapping
    gqa = q.shape[-3] != k.shape[-3]
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale, enable_gqa=gqa)
    if gqa:  # soft-capping needs the scores themselves: SDPA cannot apply it
        k, v = (t.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for t in (k, v))
    scores = torch.tanh((q @ k.transpose(-1, -2)).float() * scale / cap) * cap
    if causal and mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).to(q.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight; Gemma's variant (`offset`) scales by (1 + weight), in fp32."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        # normalize in fp32 as HF does, then scale in the input's dtype (Gemma: in fp32)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def _inv_freq(cfg: ModelConfig, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies for `base` under HF's `rope_scaling` parameters, and the
    factor its cos and sin are multiplied by (yarn, longrope). Follows transformers'
    modeling_rope_utils, whose configs these are."""
    d = cfg.head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings")
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth blend between
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    if kind == "yarn":
        if factor is None:
            factor = cfg.max_position_embeddings / original
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale(1)
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
        dim_of = lambda turns: d * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = dim_of(fast), dim_of(slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp), attention_factor
    # longrope (Phi-3): per-dimension factors, the short ones within the original context
    factor = factor or cfg.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(scaling["short_factor"], dtype=torch.float64)
    return inv_freq / ext, attention_factor


def rope_tables(cfg: ModelConfig, length: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, shape (length, head_dim), HF's half-split layout;
    `local`: the sliding layers' tables (base rope_local_base_freq, no scaling; Gemma 3)."""
    if local:
        inv_freq, factor = _inv_freq(cfg, cfg.rope_local_base_freq, None)
    else:
        inv_freq, factor = _inv_freq(cfg, cfg.rope_theta, cfg.rope_scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    if (cfg.rope_scaling or {}).get("rope_type") == "longrope" and not local:
        # beyond the original context, the long factors (transformers switches the whole sequence
        # there; here positions past it take them, so keys already cached stay valid)
        original = cfg.rope_scaling["original_max_position_embeddings"]
        long = torch.outer(torch.arange(length, dtype=torch.float64),
                           inv_freq * torch.tensor(cfg.rope_scaling["short_factor"], dtype=torch.float64)
                           / torch.tensor(cfg.rope_scaling["long_factor"], dtype=torch.float64))
        angles[original:] = long[original:]
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


def apply_rope(x, cos, sin):
    """Rotate (x1, x2) halves of each head: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer, self.window = cfg, layer, cfg.window(layer)
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, qkv_b = cfg.attention_bias, cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=qkv_b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_b)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=b)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, offset=cfg.gemma)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, offset=cfg.gemma)

    def forward(self, x, cos, sin, cache: PagedBatch | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            y = cache.attend(self.layer, q, k, v)
        else:
            positions = torch.arange(T, device=x.device)
            mask = visible(positions, positions, self.window) if self.window and self.window < T else None
            y = attention(q, k, v, mask, self.cfg, causal=T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU, or GeGLU for Gemma."""

    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        width = width or cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One Mixtral expert: w2(silu(w1(x)) * w3(x)); names as in HF Mixtral checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.moe_intermediate_size or cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.w1 = nn.Linear(cfg.hidden_size, width, bias=False)
        self.w2 = nn.Linear(width, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, width, bias=False)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routed experts. Each token's k expert outputs are mixed by its router
    probabilities, renormalized over the k (`norm_topk_prob`); a shared expert, where the
    config has one, adds its output gated by sigmoid(shared_expert_gate(x)). Only experts
    that received tokens run (a plain loop beats grouped matmuls at the small batches a CPU serves)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_local_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        flat = chosen.flatten()
        for e in flat.unique().tolist():
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(B, T, H), router_logits


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all MoE layers: num_experts * sum_e f_e * p_e,
    where f_e is the share of routing slots sent to expert e and p_e its mean router
    probability. It is 1.0 with perfectly uniform routing and grows as routing collapses."""
    logits = torch.cat(router_logits, dim=0).float()
    probs = F.softmax(logits, dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    share = F.one_hot(chosen, num_experts).float().mean(dim=(0, 1))
    return num_experts * (share * probs.mean(0)).sum()


class Block(nn.Module):
    """Pre-norm residual block. Llama: x + attn(norm(x)), then x + ffn(norm(x)), the second
    norm named post_attention_layernorm. Gemma (HF's names): each sublayer's output is
    normalized too: x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.gemma)
        self.gemma = cfg.gemma
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm()
        if cfg.gemma:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        if cfg.moe_layer(layer):
            self.block_sparse_moe = SparseMoE(cfg)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache):
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache)
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), None
        x = x + h
        h = self.post_attention_layernorm(x)
        if hasattr(self, "mlp"):
            return x + self.mlp(h), None
        y, router_logits = self.block_sparse_moe(h)
        return x + y, router_logits


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.gemma)


def rope_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The rotary tables: rope_cos/sin, and rope_local_cos/sin where sliding layers have their own base."""
    cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
    tables = {"rope_cos": cos, "rope_sin": sin}
    if cfg.rope_local_base_freq is not None:
        tables["rope_local_cos"], tables["rope_local_sin"] = rope_tables(cfg, cfg.max_position_embeddings, local=True)
    return tables


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for name, table in rope_buffers(cfg).items():
            self.register_buffer(name, table, persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the rotary tables in fp32 whatever dtype the weights move to, as HF does
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            for name, table in rope_buffers(self.config).items():
                setattr(self, name, table.to(self.rope_cos.device))
        return self

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights for training from scratch: normal(0, std) linears and embeddings,
        output projections scaled down by depth (GPT-2), norms at one (Gemma's: zero, i.e. one)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("norm.weight") and not self.config.gemma:
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
            else:
                scale = 1 / math.sqrt(2 * self.config.num_hidden_layers)
                out_proj = name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight"))
                nn.init.normal_(p, mean=0.0, std=std * (scale if out_proj else 1.0))

    def forward(self, input_ids: torch.Tensor, cache: PagedBatch | None = None, last_only: bool = False,
                return_router_logits: bool = False, select: torch.Tensor | None = None):
        """Logits for every position (or only the last, with `last_only`; or, with `select`, a (B, T) bool
        mask, only the selected positions', as (N, vocab): the output layer skips the rest).

        Without a cache this is the training forward: one causal pass over whole sequences.
        With a `PagedBatch`, input_ids is its packed row (1, N), the keys and values go to the
        cache's pages, and the logits are those of `cache.outputs` (1, M, vocab).
        """
        cfg = self.config
        positions = cache.positions if cache is not None else self._positions(input_ids)
        x, router_logits = self._blocks(input_ids, positions, cache)
        if cache is not None:
            x = x[:, cache.outputs]
        x = self.model.norm(x[:, -1:] if last_only else x if select is None else x[select])
        logits = self.lm_head(x)
        if cfg.final_logit_softcapping:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return (logits, router_logits) if return_router_logits else logits

    def states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's output at every position (B, T, hidden): the training forward without the
        output layer, for a head of one's own on top (the guard's LoRA design reads the last token's)."""
        return self.model.norm(self._blocks(input_ids, self._positions(input_ids), None)[0])

    def _positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context "
                             f"({self.config.max_position_embeddings})")
        return torch.arange(T, device=input_ids.device)[None].expand(B, T)

    def _blocks(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedBatch | None):
        """Embeddings through every block: the hidden states before the final norm, and the MoE routers' logits."""
        cfg = self.config
        rope = {None: (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])}
        if cfg.rope_local_base_freq is not None:
            rope["local"] = self.rope_local_cos[positions][:, None], self.rope_local_sin[positions][:, None]
        x = self.model.embed_tokens(input_ids)
        if cfg.gemma:  # the scale rounded to the weights' dtype first, as Gemma does
            x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype)
        router_logits = []
        for i, block in enumerate(self.model.layers):
            cos, sin = rope["local" if "local" in rope and cfg.window(i) else None]
            x, r = block(x, cos, sin, cache)
            if r is not None:
                router_logits.append(r)
        return x, router_logits
