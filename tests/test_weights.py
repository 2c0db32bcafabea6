"""Weights in and out, checked against `transformers` through real files on disk: HF folders
load with identical logits, exports load back into transformers, checkpoints round-trip and
survive a crash mid-write, GGUF (SmolLM2 Q4_1) matches transformers' own GGUF loader, and
bad input fails with a clear message."""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MixtralConfig, MixtralForCausalLM)

from parley.model import weights
from parley.model.transformer import ModelConfig, Transformer
from parley.model.weights import (UnsupportedModelError, WeightsError, config_from_hf, config_to_hf,
                                  export_hf, load_checkpoint, load_gguf, load_hf, save_checkpoint)

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=5e4, rms_norm_eps=1e-5)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, norms and biases included, so a misplaced tensor shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def hf_model(moe=False, **overrides):
    torch.manual_seed(0)
    if moe:
        cfg = MixtralConfig(**{**TINY, "num_local_experts": 4, "num_experts_per_tok": 2, **overrides})
        return randomize(MixtralForCausalLM(cfg))
    return randomize(LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})))


def ours(**overrides) -> Transformer:
    torch.manual_seed(0)
    return randomize(Transformer(ModelConfig(**{**TINY, **overrides})))


def ids(n=2, t=11, vocab=211):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


HF_CASES = {"gqa_untied": {}, "gqa_tied": {"tie_word_embeddings": True},
            "attention_bias": {"attention_bias": True}, "mixtral": {"moe": True}}


@pytest.mark.parametrize("case", HF_CASES)
def test_load_hf_matches_transformers(case, tmp_path):
    reference = hf_model(**HF_CASES[case])
    reference.save_pretrained(tmp_path)
    model, raw = load_hf(tmp_path)
    assert raw["architectures"] == [type(reference).__name__]
    assert model.config.rope_theta == 5e4 and model.config.rms_norm_eps == 1e-5  # nested rope_parameters read
    x = ids()
    with torch.no_grad():
        diff = (model(x) - reference(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_load_hf_sharded_folder(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), reference(ids()).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", [dict(), dict(tie_word_embeddings=False, attention_bias=True),
                                  dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)])
def test_export_hf_loads_in_transformers(case, tmp_path):
    model = ours(**case)
    export_hf(model, tmp_path / "hf", bos_token_id=1, eos_token_id=2)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        diff = (model(ids()) - reference(ids()).logits).abs().max().item()
    assert diff <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config_from_hf(config) == model.config and config["eos_token_id"] == 2


def test_export_hf_bf16(tmp_path):
    export_hf(ours(), tmp_path, dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reference.dtype == torch.bfloat16
    assert load_hf(tmp_path, dtype=torch.bfloat16)[0].model.embed_tokens.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- Parley checkpoints

@pytest.mark.parametrize("case", [dict(), dict(num_local_experts=4, tie_word_embeddings=False)])
def test_checkpoint_round_trip_is_exact(case, tmp_path):
    model = ours(**case)
    save_checkpoint(tmp_path / "ckpt", model, meta={"step": 7})
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"step": 7} and loaded.config == model.config and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded(ids()), model(ids()), atol=0, rtol=0)


def test_checkpoint_keeps_dtype_and_converts_on_request(tmp_path):
    save_checkpoint(tmp_path, ours().to(torch.bfloat16))
    assert load_checkpoint(tmp_path)[0].lm_head.weight.dtype == torch.bfloat16
    assert load_checkpoint(tmp_path, dtype=torch.float32)[0].lm_head.weight.dtype == torch.float32


def test_crash_mid_write_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    old = ours()
    save_checkpoint(tmp_path / "ckpt", old, meta={"step": 1})
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # saved alongside by someone else

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", ours(num_local_experts=4), meta={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp folders left behind
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"step": 1} and torch.equal(loaded.lm_head.weight, old.lm_head.weight)

    monkeypatch.undo()
    save_checkpoint(tmp_path / "ckpt", ours(num_local_experts=4), meta={"step": 2})
    assert load_checkpoint(tmp_path / "ckpt")[1] == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_checkpoint_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(WeightsError, match="refusing to overwrite"):
        save_checkpoint(tmp_path, ours())
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, ours())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"].update(num_local_experts=4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"missing tensors .*block_sparse_moe.*unexpected tensors .*mlp"):
        load_checkpoint(tmp_path)
    config["model"].update(num_local_experts=0, intermediate_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"down_proj.weight has shape \(64, 96\), the config expects \(64, 128\)"):
        load_checkpoint(tmp_path)
    export_hf(ours(), tmp_path / "hf")
    with pytest.raises(WeightsError, match="not a Parley checkpoint.*use load_hf"):
        load_checkpoint(tmp_path / "hf")


# ---------------------------------------------------------------- GGUF

GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "block_sparse_moe.gate": "ffn_gate_inp"}


def write_gguf(path, model: Transformer, arch="llama"):
    """A float32 GGUF laid out as llama.cpp's convert_hf_to_gguf writes it (q/k rows permuted)."""
    cfg, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}

    def permute(w, n_head):  # llama.cpp rotates adjacent pairs: interleave each head's two halves
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    for add, value in [(w.add_context_length, cfg.max_position_embeddings), (w.add_embedding_length, cfg.hidden_size),
                       (w.add_feed_forward_length, cfg.intermediate_size), (w.add_block_count, cfg.num_hidden_layers),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_vocab_size, cfg.vocab_size)]:
        add(value)
    if cfg.is_moe:
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in GGUF_LAYER.items():
            for suffix in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{suffix}")
                if t is not None:
                    w.add_tensor(f"blk.{i}.{gg}.{suffix}", permute(t, heads[gg]) if gg in heads else t)
        for n, gg in enumerate(["ffn_gate_exps", "ffn_down_exps", "ffn_up_exps"] if cfg.is_moe else []):
            experts = [sd[f"model.layers.{i}.block_sparse_moe.experts.{e}.w{n + 1}.weight"]
                       for e in range(cfg.num_local_experts)]
            w.add_tensor(f"blk.{i}.{gg}.weight", np.stack(experts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", [dict(), dict(attention_bias=True),
                                  dict(tie_word_embeddings=False, num_local_experts=4)])
def test_gguf_names_and_permutation_round_trip(case, tmp_path):
    """Names, q/k row order (biases too), MoE expert stacks and metadata. That the permutation
    is llama.cpp's real one is checked against transformers on SmolLM2 below."""
    model = ours(**case)
    write_gguf(tmp_path / "tiny.gguf", model)
    loaded, meta = load_gguf(tmp_path / "tiny.gguf")
    assert loaded.config == model.config and meta["general.name"] == "tiny"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "1, 2, 3, 4, 5,", "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def smollm2(smollm2_ours, smollm2_hf, smollm2_hf_tokenizer):
    """SmolLM2 loaded by us and by transformers (both dequantize to fp32)."""
    model, meta = smollm2_ours
    return model, meta, smollm2_hf, smollm2_hf_tokenizer


def test_smollm2_gguf_config_and_metadata(smollm2):
    model, meta, _, _ = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5 and cfg.vocab_size == 49152
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.eos_token_id"] == 2
    assert "tokenizer.ggml.merges" not in meta  # big arrays stay in the file


def test_smollm2_gguf_logits_and_greedy_match_transformers(smollm2):
    """transformers generates 16 greedy tokens; one forward of ours over prompt + continuation
    then checks the logits and that our argmax picks each of those tokens. That is exactly
    what an uncached greedy loop would do (causal attention: position t sees only tokens <= t),
    at 1/16 of its cost: the loop itself takes minutes on two cores."""
    model, meta, reference, tokenizer = smollm2
    eos = meta["tokenizer.ggml.eos_token_id"]
    for prompt in PROMPTS:
        x = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                                     do_sample=False, pad_token_id=eos)
            logits, expected = model(seq), reference(seq).logits
        assert (logits - expected).abs().max().item() <= 1e-3, prompt
        continuation = seq[0, x.shape[1]:].tolist()
        greedy = logits[0, x.shape[1] - 1:-1].argmax(-1).tolist()
        assert len(continuation) == 16 or continuation[-1] == eos
        assert greedy == continuation, (prompt, tokenizer.decode(greedy), tokenizer.decode(continuation))


# ---------------------------------------------------------------- bad input

def test_missing_paths_raise_file_not_found(tmp_path):
    for load in (load_hf, load_gguf, load_checkpoint):
        with pytest.raises(FileNotFoundError, match="not found: .*nowhere"):
            load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_hf(tmp_path)


def test_pytorch_bin_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ModelConfig(**TINY))))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="only pytorch_model.*convert them to safetensors"):
        load_hf(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(damage, tmp_path):
    export_hf(ours(), tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2] if damage == "truncate" else os.urandom(4096))
    with pytest.raises(WeightsError, match="model.safetensors: file is corrupt or truncated"):
        load_hf(tmp_path)


def test_unexpected_and_misshaped_tensors_are_named(tmp_path):
    export_hf(ours(), tmp_path)
    extra = {"model.layers.0.mlp.gate_proj.weight": torch.zeros(5, 5)}
    sd = {k: v for k, v in ours().state_dict().items() if k != "lm_head.weight"}
    save_file({**sd, **extra, "model.extra.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="unexpected tensor model.extra.weight"):
        load_hf(tmp_path)
    save_file({**sd, **extra}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"gate_proj.weight has shape \(5, 5\)"):
        load_hf(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_gguf(damage, tmp_path):
    path = tmp_path / "bad.gguf"
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        write_gguf(path, ours())
        path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="bad.gguf: file is corrupt or truncated"):
        load_gguf(path)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    write_gguf(tmp_path / "falcon.gguf", ours(), arch="falcon")
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'falcon' "
                                                    "\\(supported: llama, qwen2, qwen3, qwen3moe, gemma3, phi3\\)"):
        load_gguf(tmp_path / "falcon.gguf")


LLAMA = config_to_hf(ModelConfig(**TINY))


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     r"unsupported architecture 'GPT2LMHeadModel' \(supported: LlamaForCausalLM, MistralForCausalLM, "
     r"MixtralForCausalLM, Qwen2ForCausalLM, .*Phi3ForCausalLM\)"),
    (dict(architectures=None, model_type="gemma"), "unsupported architecture 'gemma'"),
    (dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"), "lacks the vision tower"),
    (dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"),
     r"lacks multi-head latent attention \(MLA\)"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}), "rope scaling 'dynamic'"),
    (dict(rope_parameters=None, rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                "long_factor": [1.0] * 8}), "needs original_max_position_embeddings"),
    (dict(partial_rotary_factor=0.5), "partial rotary"),
    (dict(hidden_act="gelu"), "activation 'gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(WeightsError, match=message):
        config_from_hf({**LLAMA, **change})


def test_config_from_hf_accepts_harmless_variants():
    mistral = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral")
    assert config_from_hf({**mistral, "sliding_window": 64}) == config_from_hf({**mistral, "sliding_window": None})
    old_style = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}  # transformers 4.x: top-level rope_theta
    assert config_from_hf(old_style).rope_theta == 5e4
    assert config_from_hf({**old_style, "rope_scaling": None, "num_key_value_heads": None}).num_key_value_heads == 4
    with pytest.raises(WeightsError, match="config.json lacks hidden_size"):
        config_from_hf({k: v for k, v in LLAMA.items() if k != "hidden_size"})
