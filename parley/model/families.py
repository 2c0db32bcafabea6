"""The model families Parley reads and writes: Hugging Face config.json <-> ModelConfig, and
each family's tensor names <-> the Transformer's.

    cfg = config_from_hf(json.load(open("Qwen3-0.6B/config.json")))   # refuses what we cannot compute
    d = config_to_hf(cfg)                                              # config.json transformers loads
    for ours, rows in hf_to_ours(cfg, "model.layers.0.self_attn.qkv_proj.weight"): ...   # Phi-3: three
    state = ours_to_hf(cfg, model.state_dict())

Supported: Llama (1-3.x, RoPE scaling llama3 / linear / yarn / longrope), Mistral (sliding window
too), Mixtral, Qwen2/2.5, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma 3 text (Gemma3ForCausalLM) and
Phi-3/3.5. Everything else raises UnsupportedModelError naming what is missing. Where a config
leaves a key out, transformers' default for that family applies (`_DEFAULTS`).
"""

from __future__ import annotations

import re

import torch

from parley.model.transformer import ROPE_TYPES, ModelConfig


class WeightsError(ValueError):
    """A weights file or config that cannot be loaded (corrupt, mismatched, or not a model)."""


class UnsupportedModelError(WeightsError):
    """A model that `Transformer` does not implement: another architecture or feature."""


# HF architecture -> model_type, and the model_type each exports as (llama covers Mistral and Mixtral)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3ForCausalLM": "qwen3",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "Gemma3ForCausalLM": "gemma3_text",
                 "Phi3ForCausalLM": "phi3"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# what a known but unsupported architecture lacks here, for the refusal
_MISSING = {
    "Gemma3ForConditionalGeneration": "the vision tower (Parley runs the text model only: Gemma3ForCausalLM)",
    "LlavaForConditionalGeneration": "the vision tower", "Qwen2VLForConditionalGeneration": "the vision tower",
    "Qwen2_5_VLForConditionalGeneration": "the vision tower", "MllamaForConditionalGeneration": "the vision tower",
    "DeepseekV2ForCausalLM": "multi-head latent attention (MLA)",
    "DeepseekV3ForCausalLM": "multi-head latent attention (MLA)",
    "Gemma2ForCausalLM": "Gemma 2's layout", "GemmaForCausalLM": "Gemma 1's layout",
    "PhiForCausalLM": "Phi-1/2's layout (LayerNorm, parallel attention, partial rotary)",
}
_COMMON = dict(rms_norm_eps=1e-6, rope_theta=1e4, sliding_window=None)
_DEFAULTS = {  # transformers' defaults for keys a config.json may leave out, per model_type
    "llama": dict(_COMMON, max_position_embeddings=2048),
    "mistral": dict(_COMMON, max_position_embeddings=131072, sliding_window=4096),
    "mixtral": dict(_COMMON, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=1e6,
                    num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
    "qwen2": dict(_COMMON, max_position_embeddings=32768),
    "qwen3": dict(_COMMON, max_position_embeddings=32768),
    "qwen2_moe": dict(_COMMON, max_position_embeddings=32768, num_experts=60, num_experts_per_tok=4,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, norm_topk_prob=False,
                      router_aux_loss_coef=0.001),
    "qwen3_moe": dict(_COMMON, max_position_embeddings=32768, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, norm_topk_prob=False, router_aux_loss_coef=0.001),
    "gemma3_text": dict(_COMMON, max_position_embeddings=131072, rope_theta=1e6, rope_local_base_freq=1e4,
                        sliding_window=4096, query_pre_attn_scalar=256, head_dim=256),
    "phi3": dict(_COMMON, rms_norm_eps=1e-5, max_position_embeddings=4096),
}
_EXPORTS = {"qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# config.json keys read as numbers, flags, mappings or lists: checked for their type before any is used
# (ModelConfig then checks the ranges)
_NUMBERS = (*_SHAPE_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "partial_rotary_factor", "sliding_window", "sliding_window_pattern", "max_window_layers",
            "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size", "decoder_sparse_step", "query_pre_attn_scalar", "rope_local_base_freq",
            "final_logit_softcapping", "attn_logit_softcapping", "router_aux_loss_coef",
            "original_max_position_embeddings")
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "norm_topk_prob",
          "use_bidirectional_attention")
_TYPED = {**{k: ((int, float), "a number") for k in _NUMBERS}, **{k: (bool, "true or false") for k in _FLAGS},
          "rope_parameters": (dict, "an object"), "rope_scaling": (dict, "an object"),
          "architectures": (list, "a list of class names"), "layer_types": (list, "a list"),
          "mlp_only_layers": (list, "a list"), "model_type": (str, "a string"),
          "hidden_act": (str, "a string"), "hidden_activation": (str, "a string")}


def _check_types(d: dict) -> None:
    """WeightsError naming the first key of config.json whose value has the wrong type (null is a default)."""
    for key, (kind, what) in _TYPED.items():
        value = d.get(key)
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise WeightsError(f"config.json: {key} must be {what}, not {value!r}")
    if not all(isinstance(a, str) for a in d.get("architectures") or []):
        raise WeightsError(f"config.json: architectures must be a list of class names, not {d['architectures']!r}")


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class a model exports as."""
    if cfg.model_type == "llama":
        return "MixtralForCausalLM" if cfg.is_moe else "MistralForCausalLM" if cfg.sliding_window else \
            "LlamaForCausalLM"
    return _EXPORTS[cfg.model_type]


# ---------------------------------------------------------------- config.json -> ModelConfig

def _rope(d: dict, defaults: dict, unsupported) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling, rope_local_base_freq) from either spelling: transformers 5's
    rope_parameters (Gemma 3: one per layer type) or the older rope_theta + rope_scaling."""
    params = d.get("rope_parameters") or {}
    full, local = (params.get("full_attention") or {}, params.get("sliding_attention") or {}) \
        if "full_attention" in params else (params, {})
    for part in (full, local, d.get("rope_scaling") or {}):
        if not isinstance(part, dict):
            raise WeightsError(f"config.json: rope_parameters must map each layer type to an object, not {part!r}")
        for key in ("rope_theta", "partial_rotary_factor"):
            if part.get(key) is not None and (isinstance(part[key], bool) or not isinstance(part[key], (int, float))):
                raise WeightsError(f"config.json: rope_parameters' {key} must be a number, not {part[key]!r}")
    merged = {**(d.get("rope_scaling") or {}), **full}
    kind = merged.pop("rope_type", merged.pop("type", "default")) or "default"
    if not isinstance(kind, str):
        raise WeightsError(f"config.json: rope_type must be a string, not {kind!r}")
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's first name for LongRoPE
    if kind not in ROPE_TYPES:
        raise unsupported(f"rope scaling {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if float(merged.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise unsupported("partial rotary embeddings (partial_rotary_factor < 1)")
    if local.get("rope_type", "default") != "default":
        raise unsupported(f"rope scaling {local['rope_type']!r} on sliding layers")
    theta = float(_given(merged.pop("rope_theta", None), d.get("rope_theta"), defaults["rope_theta"]))
    scaling = None
    if kind != "default":
        merged.pop("partial_rotary_factor", None)
        original = merged.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
        if kind != "linear" and original is None:
            raise WeightsError(f"rope scaling {kind!r} needs original_max_position_embeddings")
        scaling = {"rope_type": kind, **merged}
        if original is not None:
            scaling["original_max_position_embeddings"] = original
    local_theta = _given(local.get("rope_theta"), d.get("rope_local_base_freq"), defaults.get("rope_local_base_freq"))
    return theta, scaling, None if local_theta is None else float(local_theta)


def _given(*values):
    """The first value that is not None (a 0 given is kept, for ModelConfig to refuse, not read as absent)."""
    return next((v for v in values if v is not None), None)


def _windows(d: dict, model_type: str, max_pos: int, n_layers: int) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types): which layers attend within a window, and how far."""
    window = d.get("sliding_window", _DEFAULTS[model_type]["sliding_window"])
    if model_type.startswith("qwen") and not d.get("use_sliding_window"):
        window = None  # Qwen configs carry a window they do not use
    layer_types = d.get("layer_types")
    if model_type == "gemma3_text" and layer_types is None:
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    elif model_type.startswith("qwen") and window and layer_types is None:
        first = d.get("max_window_layers", n_layers)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if window is None or window >= max_pos:  # a window as long as the context changes nothing
        return None, None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None, None
    return window, (list(layer_types) if layer_types is not None else None)


def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; refuses what we cannot compute exactly."""
    if not isinstance(d, dict):
        raise WeightsError(f"config.json must hold a JSON object, not {type(d).__name__}")
    _check_types(d)
    archs = d.get("architectures") or [a for a, t in ARCHITECTURES.items() if t == d.get("model_type")][:1]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        name = ", ".join(archs) or d.get("model_type") or "unknown"
        missing = _MISSING.get(archs[0]) if len(archs) == 1 else None
        if missing:
            raise UnsupportedModelError(f"{name} is not supported: Parley lacks {missing}")
        raise UnsupportedModelError(
            f"unsupported architecture {name!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    arch = archs[0]
    model_type = ARCHITECTURES[arch]
    defaults = _DEFAULTS[model_type]

    def unsupported(feature: str):
        return UnsupportedModelError(f"{arch} with {feature} is not supported")

    def get(key):
        return d[key] if d.get(key) is not None else defaults[key]

    gemma = model_type == "gemma3_text"
    act = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise unsupported(f"activation {act!r}")
    if d.get("mlp_bias"):
        raise unsupported("mlp_bias")
    if d.get("use_bidirectional_attention"):
        raise unsupported("bidirectional attention")
    missing = [k for k in _SHAPE_KEYS if d.get(k) is None]
    if missing:
        raise WeightsError(f"config.json lacks {', '.join(missing)}")
    max_pos = d.get("max_position_embeddings") or defaults["max_position_embeddings"]
    theta, scaling, local_theta = _rope(d, defaults, unsupported)
    window, layer_types = _windows(d, model_type, max_pos, d["num_hidden_layers"])
    moe = model_type in ("mixtral", "qwen2_moe", "qwen3_moe")
    experts = (d.get("num_local_experts") or d.get("num_experts") or defaults.get("num_local_experts")
               or defaults.get("num_experts")) if moe else 0
    return ModelConfig(
        **{k: d[k] for k in _SHAPE_KEYS},
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or defaults.get("head_dim"),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rms_norm_eps=float(get("rms_norm_eps")),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        attention_bias=bool(d.get("attention_bias", False)) and model_type != "phi3",
        num_local_experts=experts,
        num_experts_per_tok=get("num_experts_per_tok") if moe else 2,
        router_aux_loss_coef=get("router_aux_loss_coef") if moe else 0.01,
        model_type=model_type if model_type in _EXPORTS else "llama",
        hidden_act=act,
        qkv_bias=model_type in ("qwen2", "qwen2_moe"),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        rope_scaling=scaling,
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")) if gemma else None,
        sliding_window=window,
        layer_types=layer_types,
        rope_local_base_freq=local_theta if gemma else None,
        final_logit_softcapping=d.get("final_logit_softcapping"),
        # Gemma 3 configs carry the key, but neither transformers (5.24) nor llama.cpp applies it
        attn_logit_softcapping=None if gemma else d.get("attn_logit_softcapping"),
        moe_intermediate_size=get("moe_intermediate_size") if model_type.startswith("qwen") and moe else None,
        shared_expert_intermediate_size=get("shared_expert_intermediate_size") if model_type == "qwen2_moe" else 0,
        norm_topk_prob=bool(get("norm_topk_prob")) if model_type.startswith("qwen") and moe else True,
        decoder_sparse_step=d.get("decoder_sparse_step") or 1,
        mlp_only_layers=list(d.get("mlp_only_layers") or []),
    )


# ---------------------------------------------------------------- ModelConfig -> config.json

def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None) -> dict:
    """config.json for the transformers class of cfg's family (`hf_architecture`)."""
    arch = hf_architecture(cfg)
    if cfg.attn_logit_softcapping:
        raise UnsupportedModelError(f"{arch} has no attention soft-capping: this model cannot be exported")
    if arch == "MixtralForCausalLM" and cfg.attention_bias:
        raise UnsupportedModelError("MixtralForCausalLM has no attention bias: this model cannot be exported")
    if cfg.model_type == "llama" and (cfg.qkv_bias or cfg.qk_norm or cfg.layer_types or cfg.hidden_act != "silu"):
        raise UnsupportedModelError("a llama-type model with Qwen or Gemma features cannot be exported")
    dtype_name = str(dtype).removeprefix("torch.")
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    d = {
        "architectures": [arch],
        "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                       "MixtralForCausalLM": "mixtral"}.get(arch, cfg.model_type),
        **{k: getattr(cfg, k) for k in _SHAPE_KEYS},
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act,
        # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta + rope_scaling
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "sliding_window": cfg.sliding_window,
        "pad_token_id": None,  # else a family's default (Phi-3: 32000) may lie outside a smaller vocabulary
    }
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        d.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    if cfg.is_moe:
        d.update(num_local_experts=cfg.num_local_experts, num_experts=cfg.num_local_experts,
                 num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.router_aux_loss_coef)
    if cfg.model_type.startswith("qwen"):
        d.update(use_sliding_window=cfg.sliding_window is not None, layer_types=cfg.layer_types or
                 ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_hidden_layers)
        if cfg.model_type in ("qwen3", "qwen3_moe"):
            d["attention_bias"] = cfg.attention_bias
    if cfg.model_type.endswith("_moe"):
        d.update(moe_intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
                 norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                 mlp_only_layers=cfg.mlp_only_layers,
                 shared_expert_intermediate_size=cfg.shared_expert_intermediate_size)
    if cfg.gemma:
        del d["hidden_act"]
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq}
        scalar = cfg.query_pre_attn_scalar
        d.update(hidden_activation=cfg.hidden_act, query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
                 layer_types=cfg.layer_types or ["full_attention"] * cfg.num_hidden_layers,
                 rope_parameters={"full_attention": rope, "sliding_attention": local},
                 rope_local_base_freq=cfg.rope_local_base_freq, attention_bias=cfg.attention_bias,
                 final_logit_softcapping=cfg.final_logit_softcapping)
    if cfg.model_type == "phi3" and cfg.rope_scaling and "original_max_position_embeddings" in cfg.rope_scaling:
        d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    d.update({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)) if v is not None})
    return d


# ---------------------------------------------------------------- tensor names

# Qwen-MoE names (left) for the Transformer's Mixtral-style ones (right); {} is the expert
_MOE_NAMES = [("mlp.gate.", "block_sparse_moe.gate."),
              ("mlp.experts.{}.gate_proj.", "block_sparse_moe.experts.{}.w1."),
              ("mlp.experts.{}.down_proj.", "block_sparse_moe.experts.{}.w2."),
              ("mlp.experts.{}.up_proj.", "block_sparse_moe.experts.{}.w3."),
              ("mlp.shared_expert.", "block_sparse_moe.shared_expert."),
              ("mlp.shared_expert_gate.", "block_sparse_moe.shared_expert_gate.")]


def _rename_moe(name: str, to_hf: bool) -> str:
    for theirs, ours in _MOE_NAMES:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        name = re.sub(re.escape("." + src).replace(r"\{\}", r"(\d+)"), ("." + dst).replace("{}", r"\1"), name)
    return name


def _fused(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Phi-3's fused projections: HF suffix -> [(our suffix, rows)], in row order."""
    q, kv, ffn = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    return {"self_attn.qkv_proj.weight": [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                          ("self_attn.v_proj.weight", kv)],
            "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", ffn), ("mlp.up_proj.weight", ffn)]}


def hf_to_ours(cfg: ModelConfig, name: str) -> list[tuple[str, slice | None]]:
    """The Transformer's parameter names for one tensor of an HF file of cfg's family, each
    with the rows it takes (None: all of it)."""
    if cfg.model_type.endswith("_moe"):
        name = _rename_moe(name, to_hf=False)
    if cfg.model_type == "phi3":
        for suffix, parts in _fused(cfg).items():
            if name.endswith(suffix):
                base, at, out = name[:-len(suffix)], 0, []
                for part, rows in parts:
                    out.append((base + part, slice(at, at + rows)))
                    at += rows
                return out
    return [(name, None)]


def ours_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict under cfg's family's HF names (Qwen-MoE's renamed, Phi-3's fused)."""
    moe = cfg.model_type.endswith("_moe")
    out = {_rename_moe(name, to_hf=True) if moe else name: t for name, t in state.items()}
    if cfg.model_type == "phi3":
        for suffix, parts in _fused(cfg).items():
            for base in sorted({n[:-len(parts[0][0])] for n in out if n.endswith(parts[0][0])}):
                out[base + suffix] = torch.cat([out.pop(base + part) for part, _ in parts])
    return out
