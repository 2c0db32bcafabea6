"""The Parley decoder: Llama-style dense layers or Mixtral-style sparse experts, in one file.

    from parley.model.transformer import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    logits = model(torch.randint(0, 256, (1, 8)))            # (batch, time, vocab)

Parameter names and shapes follow Hugging Face's LlamaForCausalLM / MixtralForCausalLM
(`model.layers.0.self_attn.q_proj.weight`, `...block_sparse_moe.experts.3.w1.weight`), so a
state dict moves between the two without renaming. Config fields use HF's names too.

Two forwards: without a cache, the plain causal pass over whole sequences (training, and
the reference every faster path is tested against); with a `PagedBatch` (implemented by
engine/cache.py), inference: the new tokens of several sequences packed into one row, each
attending to its own sequence's keys and values in the paged cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
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
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        experts = self.num_experts_per_tok if active else self.num_local_experts
        ffn = 3 * h * self.intermediate_size * (experts if self.is_moe else 1)
        ffn += h * self.num_local_experts if self.is_moe else 0
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + ffn + 2 * h) + h + emb


class PagedBatch(Protocol):
    """One step over a paged KV cache: the input row packs tokens of several sequences."""

    positions: torch.Tensor  # (1, N): each packed token's position in its own sequence
    outputs: torch.Tensor  # (M,): the packed tokens whose logits the forward returns

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (1, kv_heads, N, hd) and return attention outputs shaped like q (1, heads, N, hd)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalize in fp32 as HF does, then scale in the input's dtype
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, shape (length, head_dim), HF's half-split layout."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate (x1, x2) halves of each head: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=b)

    def forward(self, x, cos, sin, layer: int, cache: PagedBatch | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            y = cache.attend(layer, q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One Mixtral expert: w2(silu(w1(x)) * w3(x)); names as in HF Mixtral checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routed experts. Each token's k expert outputs are mixed by renormalized router
    probabilities. Only experts that received tokens run (a plain loop beats grouped
    matmuls at the small batches a CPU serves)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_local_experts))

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        flat = chosen.flatten()
        for e in flat.unique().tolist():
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y)
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe:
            self.block_sparse_moe = SparseMoE(cfg)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
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
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the rotary tables in fp32 whatever dtype the weights move to, as HF does
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.rope_cos, self.rope_sin = (t.to(self.rope_cos.device) for t in
                                            rope_tables(self.config, self.config.max_position_embeddings))
        return self

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights for training from scratch: normal(0, std) linears and embeddings,
        output projections scaled down by depth (GPT-2), norms at one."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                scale = 1 / math.sqrt(2 * self.config.num_hidden_layers)
                out_proj = name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight"))
                nn.init.normal_(p, mean=0.0, std=std * (scale if out_proj else 1.0))

    def forward(self, input_ids: torch.Tensor, cache: PagedBatch | None = None, last_only: bool = False,
                return_router_logits: bool = False):
        """Logits for every position (or only the last, with `last_only`).

        Without a cache this is the training forward: one causal pass over whole sequences.
        With a `PagedBatch`, input_ids is its packed row (1, N), the keys and values go to the
        cache's pages, and the logits are those of `cache.outputs` (1, M, vocab).
        """
        B, T = input_ids.shape
        if cache is not None:
            positions = cache.positions
        else:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {T} tokens is longer than the model's context "
                                 f"({self.config.max_position_embeddings})")
            positions = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        x = self.model.embed_tokens(input_ids)
        router_logits = []
        for i, block in enumerate(self.model.layers):
            x, r = block(x, cos, sin, i, cache)
            if r is not None:
                router_logits.append(r)
        if cache is not None:
            x = x[:, cache.outputs]
        x = self.model.norm(x[:, -1:] if last_only else x)
        logits = self.lm_head(x)
        return (logits, router_logits) if return_router_logits else logits
