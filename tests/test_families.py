"""Every model family against its `transformers` implementation, on random-init models of
unusual shapes (GQA 7:1, head_dim unlike hidden/heads, random norm weights and biases, a
sliding window shorter than the prompt): logits, greedy text through the Engine, export
round trip and a LoRA training step."""

import json
import math

import numpy as np
import pytest
import torch
import transformers as hf
from safetensors.torch import load_file

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model.families import UnsupportedModelError, config_from_hf
from parley.model.lora import apply_lora
from parley.model.transformer import ModelConfig, Transformer
from parley.model.weights import export_hf, load_gguf, load_hf
from parley.train.losses import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")
# 7 query heads to 1 key/value head, 16-wide heads on a 56-wide residual (not 56 / 7)
SHAPE = dict(vocab_size=97, hidden_size=56, intermediate_size=48, num_hidden_layers=3, num_attention_heads=7,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 5e4}
CASES = {
    "llama3_rope": (hf.LlamaConfig, dict(rope_parameters=LLAMA3)),
    "llama3_rope_old_spelling": (hf.LlamaConfig, dict(rope_theta=5e4, rope_scaling={
        "type": "llama3", **{k: v for k, v in LLAMA3.items() if k not in ("rope_type", "rope_theta")}})),
    "llama_linear_rope": (hf.LlamaConfig, dict(rope_scaling={"type": "linear", "factor": 4.0})),
    "llama_yarn_rope": (hf.LlamaConfig, dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                              "original_max_position_embeddings": 16})),
    "mistral_sliding": (hf.MistralConfig, dict(sliding_window=5)),
    "qwen2": (hf.Qwen2Config, dict()),
    "qwen3": (hf.Qwen3Config, dict(attention_bias=True)),
    "qwen3_moe": (hf.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                          norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe_unnormalized": (hf.Qwen3MoeConfig, dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=24,
                                                       norm_topk_prob=False, decoder_sparse_step=2)),
    "qwen2_moe_shared_expert": (hf.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                        shared_expert_intermediate_size=32, norm_topk_prob=False)),
    "gemma3": (hf.Gemma3TextConfig, dict(sliding_window=5, layer_types=["sliding_attention", "full_attention",
                                                                        "sliding_attention"],
                                         query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                             "rope_theta": 1e6},
                                                          "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 1e3}})),
    # transformers and llama.cpp ignore a Gemma 3 config's attn_logit_softcapping; so do we
    "gemma3_untied_pattern": (hf.Gemma3TextConfig, dict(sliding_window=4, sliding_window_pattern=2,
                                                        attn_logit_softcapping=2.0, tie_word_embeddings=False)),
    # Phi-3 has no head_dim key: 16-wide heads need a 112-wide residual
    "phi3_longrope": (hf.Phi3Config, dict(hidden_size=112, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                          original_max_position_embeddings=32,
                                          rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 4 for i in range(8)],
                                                        "long_factor": [2.0 + i for i in range(8)]})),
}
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38, 32, 79, 50, 28]]


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, norms and biases included, so a missing term shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    """(case name, the transformers model, ours loaded from its saved folder)."""
    config_class, overrides = CASES[request.param]
    config = config_class(**{**SHAPE, "attention_bias": False, **overrides})
    reference = randomize(hf.AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    ours, _ = load_hf(folder)
    return request.param, reference, ours


def test_logits_match_transformers(family):
    name, reference, ours = family
    x = torch.tensor([PROMPTS[0] * 2])  # 22 tokens: past every window and Llama 3's original context (16)
    with torch.no_grad():
        expected = reference(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)


def hf_greedy(reference, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, reference(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_greedy_text_through_the_engine_matches_transformers(family):
    """Paged cache with 4-token pages: windows cross pages; two prompts decode in one batch."""
    name, reference, ours = family
    engine = Engine(ours, page_size=4, max_batch=2)
    got = [c.tokens for c in engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0))]
    assert got == [hf_greedy(reference, p, 10) for p in PROMPTS]
    engine.close()


def test_export_round_trip_loads_in_transformers(family, tmp_path):
    name, reference, ours = family
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(reference).__name__]
    assert config_from_hf(config) == ours.config
    back = hf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), atol=1e-4, rtol=0)


def test_a_lora_training_step_moves_only_the_adapters(family):
    name, _, base = family
    model = Transformer(base.config)
    model.load_state_dict(base.state_dict())
    params = apply_lora(model, r=4, alpha=8)
    for p in params:  # B starts at zero; move it so the step's gradient reaches A too
        torch.nn.init.normal_(p, std=0.01) if p.shape[1] == 4 else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = torch.tensor([PROMPTS[0] * 2])
    loss = lm_loss(model, (batch[:, :-1], batch[:, 1:]))[0]
    loss.backward()
    torch.optim.SGD(params, lr=0.1).step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n
    with torch.no_grad():
        assert lm_loss(model, (batch[:, :-1], batch[:, 1:]))[0] < loss


def test_attention_soft_capping_paged_equals_uncached():
    """Gemma 2-style attention soft-capping (no HF family here uses it): it changes the output,
    and the paged cache applies it as the plain forward does."""
    cfg = ModelConfig(**SHAPE, model_type="gemma3_text", hidden_act="gelu_pytorch_tanh", qk_norm=True,
                      sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 1 + ["sliding_attention"],
                      rope_local_base_freq=1e3, attn_logit_softcapping=0.5)
    model = randomize(Transformer(cfg))
    plain = Transformer(ModelConfig(**{**cfg.to_dict(), "attn_logit_softcapping": None}))
    plain.load_state_dict(model.state_dict())
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert (model(x) - plain.eval()(x)).abs().max() > 1e-2
        ids = x  # the plain forward's greedy continuation, token by token
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    engine = Engine(model, page_size=4)
    [completion] = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0.0))
    assert completion.tokens == ids[0, len(PROMPTS[0]):].tolist()
    engine.close()


# ---------------------------------------------------------------- GGUF, as llama.cpp's converter writes it

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}
GEMMA_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
GGUF_CASES = {  # llama.cpp fixes Gemma 3's layer pattern (5:1), local base (1e4) and scale (1/sqrt(head_dim))
    "qwen2": (hf.Qwen2Config, dict()),
    "qwen3": (hf.Qwen3Config, dict()),
    "qwen3moe": (hf.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                         norm_topk_prob=True)),
    "phi3": (hf.Phi3Config, dict(hidden_size=112, pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=6)),
    "gemma3": (hf.Gemma3TextConfig, dict(num_hidden_layers=7, sliding_window=5, query_pre_attn_scalar=16,
                                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e5},
                                                          "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 1e4}})),
}


def write_gguf(path, arch: str, reference, extra: dict | None = None, meta: dict | None = None) -> None:
    """An fp32 GGUF of an HF model under llama.cpp's names and metadata (q/k rows interleaved per head
    for the llama architecture only; Gemma's norms stored as 1 + weight). `extra`: more tensors;
    `meta`: more metadata, uint32 or float32 (`ARCH.` is prefixed)."""
    import gguf

    reference.save_pretrained(path.parent / "hf")  # per-expert names, as checkpoints on disk have them
    c, sd = reference.config, {k: v.numpy() for k, v in load_file(path.parent / "hf" / "model.safetensors").items()}
    w = gguf.GGUFWriter(str(path), arch)
    for add, value in [(w.add_context_length, c.max_position_embeddings), (w.add_embedding_length, c.hidden_size),
                       (w.add_feed_forward_length, c.intermediate_size), (w.add_block_count, c.num_hidden_layers),
                       (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                       (w.add_key_length, c.head_dim), (w.add_value_length, c.head_dim),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_vocab_size, c.vocab_size)]:
        add(value)
    rope = c.rope_parameters["full_attention"] if arch == "gemma3" else c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if arch in ("gemma3", "phi3"):
        w.add_sliding_window(c.sliding_window)
    if arch == "qwen3moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    names = {**GGUF_NAMES, **(GEMMA_NAMES if arch == "gemma3" else {}),
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # Phi-3's fused ones
    out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, t in sd.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1.0
        if name in out:
            w.add_tensor(out[name], t)
            continue
        _, _, i, rest = name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        if ".experts." in module:
            if module.endswith("experts.0.gate_proj"):
                for proj, gg in (("gate_proj", "ffn_gate_exps"), ("down_proj", "ffn_down_exps"),
                                 ("up_proj", "ffn_up_exps")):
                    w.add_tensor(f"blk.{i}.{gg}.weight", np.stack(
                        [sd[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(c.num_experts)]))
            continue
        heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}
        if arch == "llama" and module in heads:  # the converter's rotary row order
            t = t.reshape(heads[module], 2, -1, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(f"blk.{i}.{names[module]}.{suffix}", t)
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    for key, value in (meta or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"{arch}.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def converter_rope_freqs(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """The divisors llama.cpp's convert_hf_to_gguf stores as `rope_freqs` for Llama 3's RoPE scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < original_max_position_embeddings / high_freq_factor:
            out.append(1.0)
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            out.append(factor)
        else:
            s = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("head_dim, rope", [
    (64, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),  # 3.1's
    (64, dict(factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=4096)),
    (16, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
])
def test_gguf_llama3_rope_freqs_tensor_matches_transformers(tmp_path, head_dim, rope):
    """Llama 3.x GGUFs carry their RoPE scaling only as the `rope_freqs` tensor: the parameters are
    recovered from it (fitted where 64-wide heads have several blended frequencies; the converter's
    defaults where 16-wide heads have one) and the logits equal transformers' on the HF config."""
    config = hf.LlamaConfig(**{**SHAPE, "hidden_size": 2 * head_dim, "num_attention_heads": 2, "head_dim": head_dim,
                               "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **rope}})
    reference = randomize(hf.AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    write_gguf(tmp_path / "l3.gguf", "llama", reference,
               extra={"rope_freqs.weight": converter_rope_freqs(head_dim, 5e5, **rope)})
    model, _ = load_gguf(tmp_path / "l3.gguf")
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.rope_scaling["factor"] == rope["factor"]
    x = torch.tensor([PROMPTS[0] * 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, atol=1e-4, rtol=0)


def test_gguf_rope_freqs_that_are_not_llama3s_are_refused(tmp_path):
    config = hf.LlamaConfig(**{**SHAPE, "hidden_size": 128, "num_attention_heads": 2, "head_dim": 64})
    reference = hf.AutoModelForCausalLM.from_config(config)
    factors = np.linspace(1.0, 8.0, 32, dtype=np.float32) ** 2 % 7 + 1  # neither monotone nor Llama 3's ramp
    write_gguf(tmp_path / "odd.gguf", "llama", reference, extra={"rope_freqs.weight": factors})
    with pytest.raises(UnsupportedModelError, match="does not follow Llama 3's RoPE scaling"):
        load_gguf(tmp_path / "odd.gguf")


def test_gguf_phi3_longrope_factors_match_transformers(tmp_path):
    """Phi-3's LongRoPE factors, stored by the converter as tensors with the original context and the
    attention factor in metadata, give transformers' logits."""
    config_class, overrides = CASES["phi3_longrope"]
    config = config_class(**{**SHAPE, **overrides, "sliding_window": SHAPE["max_position_embeddings"]})  # no window
    reference = randomize(hf.AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    scaling, original = config.rope_scaling, 32
    scale = SHAPE["max_position_embeddings"] / original
    write_gguf(tmp_path / "phi3.gguf", "phi3", reference,
               extra={f"rope_factors_{k}.weight": np.array(scaling[f"{k}_factor"], dtype=np.float32)
                      for k in ("short", "long")},
               meta={"rope.scaling.original_context_length": original,
                     "rope.scaling.attn_factor": math.sqrt(1 + math.log(scale) / math.log(original))})
    model, _ = load_gguf(tmp_path / "phi3.gguf")
    assert model.config.rope_scaling["rope_type"] == "longrope"
    x = torch.tensor([PROMPTS[0] * 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(GGUF_CASES))
def test_gguf_of_each_family_matches_transformers(arch, tmp_path):
    config_class, overrides = GGUF_CASES[arch]
    config = config_class(**{**SHAPE, "attention_bias": False, **overrides})
    reference = randomize(hf.AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    write_gguf(tmp_path / "tiny.gguf", arch, reference)
    model, meta = load_gguf(tmp_path / "tiny.gguf")
    assert meta["general.architecture"] == arch
    x = torch.tensor([PROMPTS[0] * 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, atol=1e-4, rtol=0)
