"""GGUF's K-quants and 5-bit types kept quantized (model/quant.py, `from_gguf_blocks`), and any
architecture's GGUF kept (weights.keep_gguf_blocks), Gemma 3's above all.

Blocks of Q4_K and Q6_K, which the `gguf` package cannot quantize, are packed here by hand from the
format's definition (checked against gguf's own dequantization first); Q5_0 and Q5_1 come from gguf's
quantizers. Then: a tiny gemma3 GGUF holding every kept type, loaded kept against the same file
dequantized; and (slow, `--runslow`) the real Gemma 3 270M Q4_K_M: logits, greedy text, perplexity.
"""

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from parley.engine.engine import Engine
from parley.engine.fast import FastDecoder
from parley.engine.sampling import SamplingParams
from parley.model import quant, weights
from parley.model.quant import GGML, QuantError
from parley.model.transformer import ModelConfig

HELDOUT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "perplexity_heldout.txt"


def halves(rng, n, lo, hi) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float16)


def pack_q4_k(d, dmin, scales, minimums, ints) -> np.ndarray:
    """Q4_K super-blocks [n, 144] from d, dmin [n] (half), 6-bit scales and minimums [n, 8] and 4-bit
    integers [n, 256], as ggml's block_q4_K lays them out."""
    sc, mn = scales.astype(np.uint8), minimums.astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, mn[:, :4] | (mn[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 15) | (mn[:, 4:] & 15) << 4], axis=1)
    q = ints.astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)  # group j: sub-block 2j low, 2j + 1 high
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qs], axis=1)


def pack_q6_k(d, scales, ints) -> np.ndarray:
    """Q6_K super-blocks [n, 210] from d [n] (half), int8 scales [n, 16] (one a 16 values) and 6-bit
    integers [n, 256] (weight = d * scale * (q - 32)), as ggml's block_q6_K lays them out: each half
    of 128 values has 64 bytes of low nibbles (values r and r + 64 of the half) and 32 bytes of
    high bit pairs (values r, r + 32, r + 64, r + 96)."""
    q = ints.astype(np.uint8).reshape(-1, 2, 128)
    ql = (q[..., :64] & 15) | (q[..., 64:] & 15) << 4
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), scales.astype(np.int8).view(np.uint8),
                           d.reshape(-1, 1).view(np.uint8)], axis=1)


def random_q4_k(rng, rows, cols, size=0.02):
    """Q4_K blocks [rows, bytes] of weights about `size`, and what they hold."""
    n = rows * cols // 256
    d, dmin = halves(rng, n, size / 300, size / 100), halves(rng, n, size / 60, size / 20)
    sc, mn, ints = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8)), rng.integers(0, 16, (n, 256))
    return pack_q4_k(d, dmin, sc, mn, ints).reshape(rows, -1), (d, dmin, sc, mn, ints)


def random_q6_k(rng, rows, cols, size=0.02):
    n = rows * cols // 256
    d, sc = halves(rng, n, size / 2000, size / 1000), rng.integers(-128, 128, (n, 16))
    ints = rng.integers(0, 64, (n, 256))
    return pack_q6_k(d, sc, ints).reshape(rows, -1), (d, sc, ints)


def test_hand_packed_k_blocks_are_what_gguf_reads():
    """The packers above follow the format: gguf's dequantization gives their values back."""
    rng = np.random.default_rng(0)
    blocks, (d, dmin, sc, mn, ints) = random_q4_k(rng, 2, 512)
    want = (d.astype(np.float32)[:, None] * sc).repeat(32, 1) * ints - (dmin.astype(np.float32)[:, None] * mn).repeat(32, 1)
    assert np.allclose(gguf.quants.dequantize(blocks, GGML.Q4_K).reshape(-1, 256), want, rtol=1e-6, atol=0)
    blocks, (d, sc, ints) = random_q6_k(rng, 2, 512)
    want = (d.astype(np.float32)[:, None] * sc).repeat(16, 1) * (ints - 32)
    assert np.allclose(gguf.quants.dequantize(blocks, GGML.Q6_K).reshape(-1, 256), want, rtol=1e-6, atol=0)


def test_q4_k_keeps_the_files_integers_and_rounds_its_scales_to_half_floats():
    """The 4-bit integers exactly; scale d * sc and minimum -dmin * mn each the nearest half, so a
    weight moves by at most 2^-11 (15 |d sc| + |dmin mn|) from gguf's dequantized value."""
    rng = np.random.default_rng(1)
    blocks, (d, dmin, sc, mn, ints) = random_q4_k(rng, 4, 512)
    layer = quant.from_gguf_blocks(blocks, GGML.Q4_K)
    assert layer.fmt == "q4" and (layer.out_features, layer.in_features) == (4, 512)
    assert torch.equal(layer.integers(), torch.from_numpy(ints.reshape(4, 512).astype(np.uint8)))
    step = (d.astype(np.float64)[:, None] * sc).reshape(4, 16)
    low = (dmin.astype(np.float64)[:, None] * mn).reshape(4, 16)
    assert not torch.equal(quant._half(layer.d).double(), torch.from_numpy(step))  # some did round
    bound = torch.from_numpy((15 * step + low) * 2**-11).repeat_interleave(32, 1)
    exact = torch.from_numpy(gguf.quants.dequantize(blocks, GGML.Q4_K)).double()
    assert ((layer.dequantize().double() - exact).abs() <= bound * (1 + 1e-6) + 1e-9).all()


def test_q6_k_goes_to_q8_within_an_eighth_of_its_own_step():
    """Within half a q8 step of gguf's values, which is under 0.127 of the larger of the Q6_K steps
    (d |sc|) of the two 16-value sub-blocks that share a q8 block; no integer clipped."""
    rng = np.random.default_rng(2)
    blocks, (d, sc, ints) = random_q6_k(rng, 4, 512)
    layer = quant.from_gguf_blocks(blocks, GGML.Q6_K)
    assert layer.fmt == "q8" and layer.integers().abs().max() <= 127
    exact = torch.from_numpy(gguf.quants.dequantize(blocks, GGML.Q6_K)).double()
    q8_step = quant._half(layer.d).double()  # [4, 16]
    err = (layer.dequantize().double() - exact).abs().reshape(4, 16, 32)
    assert (err <= q8_step[..., None] / 2 * (1 + 1e-6)).all()
    q6_step = torch.from_numpy(np.abs(d.astype(np.float64)[:, None] * sc)).reshape(4, 16, 2).amax(-1)
    assert (q8_step / 2 <= 0.127 * q6_step).all()


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_1"])
def test_five_bit_blocks_go_to_q8(kind):
    """Q5_0 (d (q - 16)) exactly, with the file's scales; Q5_1 (d q + m) within half a q8 step."""
    kind = GGML[kind]
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 2, (6, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(w, kind)
    layer = quant.from_gguf_blocks(blocks, kind)
    exact = torch.from_numpy(gguf.quants.dequantize(blocks, kind))
    assert layer.fmt == "q8"
    if kind == GGML.Q5_0:
        assert torch.equal(layer.dequantize(), exact)
        assert torch.equal(layer.d, torch.from_numpy(blocks.reshape(6, 4, 22)[..., :2].copy().view(np.int16)[..., 0]))
    else:
        step = quant._half(layer.d).repeat_interleave(32, 1)
        assert ((layer.dequantize() - exact).abs() <= step / 2 * (1 + 1e-6)).all()


def test_bad_blocks_are_refused():
    rng = np.random.default_rng(4)
    blocks, _ = random_q4_k(rng, 2, 256)
    with pytest.raises(QuantError, match="not whole blocks of 144"):
        quant.from_gguf_blocks(blocks[:, :-1], GGML.Q4_K)  # a truncated block
    with pytest.raises(QuantError, match="not whole blocks of 210"):
        quant.from_gguf_blocks(np.zeros((2, 300), np.uint8), GGML.Q6_K)
    with pytest.raises(QuantError, match="Q2_K tensors are not kept quantized"):
        quant.from_gguf_blocks(np.zeros((2, 84), np.uint8), GGML.Q2_K)
    with pytest.raises(QuantError, match="F16 tensors are not kept"):
        quant.from_gguf_blocks(np.zeros((2, 64), np.uint8), GGML.F16)
    big = pack_q4_k(np.array([60000.0], np.float16), np.array([0.0], np.float16), np.full((1, 8), 63),
                    np.zeros((1, 8)), np.zeros((1, 256)))
    with pytest.raises(QuantError, match="does not fit a half float"):
        quant.from_gguf_blocks(big, GGML.Q4_K)


# ---------------------------------------------------------------- a tiny gemma3 GGUF

GEMMA = ModelConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=128,
                    model_type="gemma3_text", hidden_act="gelu_pytorch_tanh", qk_norm=True, sliding_window=8,
                    rope_local_base_freq=10000.0, query_pre_attn_scalar=128.0, rope_theta=1e6,
                    layer_types=["sliding_attention", "sliding_attention"], tie_word_embeddings=True)
# each kept type, as llama.cpp's Q4_K_M mixes them (Q5_0 / Q8_0 where rows are not whole super-blocks)
TYPES = {"attn_q": GGML.Q4_K, "attn_k": GGML.Q5_0, "attn_v": GGML.Q8_0, "attn_output": GGML.Q4_K,
         "ffn_gate": GGML.Q4_1, "ffn_up": GGML.Q5_1, "ffn_down": GGML.Q6_K, "token_embd": GGML.Q6_K}


def random_tensor(rng, kind, rows, cols) -> np.ndarray:
    if kind == GGML.Q4_K:
        return random_q4_k(rng, rows, cols)[0]
    if kind == GGML.Q6_K:
        return random_q6_k(rng, rows, cols)[0]
    return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), kind)


def write_gemma3_gguf(path, types: dict, cfg: ModelConfig = GEMMA) -> None:
    """A gemma3 GGUF of random blocks, each projection in the type `types` names (F32 for the rest)."""
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(str(path), "gemma3")
    for add, value in [(w.add_context_length, cfg.max_position_embeddings), (w.add_embedding_length, cfg.hidden_size),
                       (w.add_feed_forward_length, cfg.intermediate_size), (w.add_block_count, cfg.num_hidden_layers),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_vocab_size, cfg.vocab_size),
                       (w.add_rope_freq_base, cfg.rope_theta), (w.add_sliding_window, cfg.sliding_window)]:
        add(value)
    q, kv, hidden = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size
    shapes = {"attn_q": (q, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden), "attn_output": (hidden, q),
              "ffn_gate": (cfg.intermediate_size, hidden), "ffn_up": (cfg.intermediate_size, hidden),
              "ffn_down": (hidden, cfg.intermediate_size)}
    norms = {"attn_norm": hidden, "ffn_norm": hidden, "post_attention_norm": hidden, "post_ffw_norm": hidden,
             "attn_q_norm": cfg.head_dim, "attn_k_norm": cfg.head_dim}

    def add(name, kind, rows, cols):
        if kind == GGML.F32:
            w.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32))
        else:
            w.add_tensor(name, random_tensor(rng, kind, rows, cols), raw_dtype=kind)

    add("token_embd.weight", types.get("token_embd", GGML.F32), cfg.vocab_size, hidden)
    w.add_tensor("output_norm.weight", 1 + rng.uniform(-0.2, 0.2, hidden).astype(np.float32))
    for i in range(cfg.num_hidden_layers):
        for name, (rows, cols) in shapes.items():
            add(f"blk.{i}.{name}.weight", types.get(name, GGML.F32), rows, cols)
        for name, size in norms.items():  # stored as 1 + weight, as llama.cpp does for Gemma
            w.add_tensor(f"blk.{i}.{name}.weight", 1 + rng.uniform(-0.2, 0.2, size).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf"
    write_gemma3_gguf(path, TYPES)
    dequantized, _ = weights.load_gguf(path)
    return path, dequantized, weights.keep_gguf_blocks(copy.deepcopy(dequantized), path)


def test_a_gemma3_gguf_keeps_every_projection_in_its_format(tiny_gemma):
    _, dequantized, kept = tiny_gemma
    fmts = quant.formats(kept)
    assert len(fmts) == 7 * GEMMA.num_hidden_layers + 1  # the C step takes all of them
    want = {"q_proj": "q4", "k_proj": "q8", "v_proj": "q8", "o_proj": "q4", "gate_proj": "q4", "up_proj": "q8",
            "down_proj": "q8"}
    for name, fmt in fmts.items():
        assert fmt == ("q8" if name == "lm_head" else want[name.rsplit(".", 1)[-1]]), name
    exact = {"k_proj", "v_proj", "gate_proj"}  # Q5_0, Q8_0, Q4_1: the file's values bit for bit
    for name, layer in quant.quantized_layers(kept).items():
        if name.rsplit(".", 1)[-1] in exact:
            assert torch.equal(layer.dequantize(), dequantized.get_submodule(name).weight), name
    assert quant.weight_bytes(kept) < 0.4 * quant.weight_bytes(dequantized)  # fp32 there
    assert torch.equal(kept.model.embed_tokens.weight, dequantized.model.embed_tokens.weight)


def test_a_kept_gemma3_gguf_computes_what_the_dequantized_one_does(tiny_gemma):
    """PyTorch forward over the kept weights (float activations): within 1.5% of the logits' scale
    (measured 0.65%: the rounding of Q4_K's scales and of Q5_1 / Q6_K to q8). The C step (int8 activations) on
    the best int8 path: within 3% of the dequantized model's C step in fp32, and greedy tokens of
    a few prompts through the engine equal on at least 2 of 3."""
    _, dequantized, kept = tiny_gemma
    ids = torch.tensor([[2, 17, 101, 5, 250, 33, 7, 64, 12, 99, 3]])
    with torch.inference_mode():
        exact, ours = dequantized(ids), kept(ids)
        assert (ours - exact).abs().max() < 0.015 * exact.abs().max()
    fast = FastDecoder.create(copy.deepcopy(kept))
    assert fast is not None and fast.quant
    from test_quant import all_logits

    reference = FastDecoder.create(copy.deepcopy(dequantized))
    got, ref = all_logits(fast, ids[0].tolist()), all_logits(reference, ids[0].tolist())
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()
    prompts, params = [[2, 9, 8, 7], [2, 100, 200, 300, 31], [2] + list(range(40, 60))], SamplingParams(max_tokens=6)
    a = [c.tokens for c in Engine(copy.deepcopy(kept)).generate(prompts, params)]
    b = [c.tokens for c in Engine(copy.deepcopy(dequantized)).generate(prompts, params)]
    assert sum(x == y for x, y in zip(a, b)) >= 2, (a, b)


def test_a_float_projection_is_refused_by_name(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_gemma3_gguf(path, {**TYPES, "ffn_up": GGML.F32})
    model, _ = weights.load_gguf(path)
    with pytest.raises(QuantError, match=r"blk\.0\.ffn_up\.weight: GGUF F32 tensors are not kept.*without --quantize keep"):
        weights.keep_gguf_blocks(model, path)


def as_q8_0(src: Path, dst: Path) -> None:
    """A copy of the GGUF file `src` with every matrix stored as Q8_0 (kept exactly)."""
    reader, w = gguf.GGUFReader(src), None
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if array else None)
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim == 2:
            w.add_tensor(t.name, gguf.quants.quantize(data, GGML.Q8_0), raw_dtype=GGML.Q8_0)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch, config", [
    ("llama", dict()), ("qwen3", dict()), ("gemma3", dict(sliding_window=5, query_pre_attn_scalar=16)),
    ("phi3", dict(hidden_size=128, pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=6))])
def test_every_family_keeps_its_blocks_in_the_models_row_order(arch, config, tmp_path):
    """Only llama.cpp's llama converter permutes q/k rows (load_gguf undoes it for floats, and
    keep_gguf_blocks for blocks); Phi-3's fused qkv and gate/up are split by rows. With every matrix
    Q8_0 (exact), each kept layer equals the dequantized model's, row for row."""
    import transformers as hf
    from test_families import randomize, write_gguf

    classes = {"llama": hf.LlamaConfig, "qwen3": hf.Qwen3Config, "gemma3": hf.Gemma3TextConfig, "phi3": hf.Phi3Config}
    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5)
    reference = randomize(hf.AutoModelForCausalLM.from_config(classes[arch](**{**shape, **config})))
    write_gguf(tmp_path / "f32.gguf", arch, reference)
    as_q8_0(tmp_path / "f32.gguf", tmp_path / "q8.gguf")
    dequantized, _ = weights.load_gguf(tmp_path / "q8.gguf")
    kept = weights.keep_gguf_blocks(copy.deepcopy(dequantized), tmp_path / "q8.gguf")
    layers = quant.quantized_layers(kept)
    assert len(layers) == 7 * 2 + 1
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(), dequantized.get_submodule(name).weight), name


# ---------------------------------------------------------------- the real Gemma 3 270M Q4_K_M

@pytest.fixture(scope="module")
def gemma3():
    from parley.model.tokenizer import Tokenizer
    from parley.registry import gemma3_gguf

    try:
        path = gemma3_gguf(install=False)
    except FileNotFoundError as e:
        pytest.skip(f"{e} (make test-models installs it)")
    dequantized, _ = weights.load_gguf(path)
    return weights.keep_gguf_blocks(copy.deepcopy(dequantized), path), dequantized, Tokenizer.from_gguf(path), path


@pytest.mark.slow
def test_gemma3_keeps_its_q4_k_m_file(gemma3):
    """Every projection kept: Q5_0 and Q8_0 exactly, Q4_K within its scales' rounding bound, Q6_K
    within half a q8 step; about half the bytes a bf16 step reads."""
    kept, dequantized, _, path = gemma3
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {kind for kind in kinds.values()} == {GGML.F32, GGML.Q8_0, GGML.Q5_0, GGML.Q4_K, GGML.Q6_K}
    layers = quant.quantized_layers(kept)
    assert len(layers) == 7 * 18 + 1 and layers["lm_head"].fmt == "q8"
    for name, layer in layers.items():
        ref = dequantized.get_submodule(name).weight
        step = quant._half(layer.d).abs().repeat_interleave(32, 1)
        err = (layer.dequantize() - ref).abs()
        if layer.fmt == "q8":
            assert (err <= step / 2).all(), name
        else:  # 2^-11 of the exact scales, which the rounded ones are within 2^-11 of
            low = quant._half(layer.m).abs().repeat_interleave(32, 1)
            assert (err <= (15 * step + low) * 2**-10).all(), name
    bf16 = copy.deepcopy(dequantized).to(torch.bfloat16)
    assert quant.weight_bytes(kept) < 0.55 * quant.weight_bytes(bf16)


@pytest.mark.slow
def test_gemma3_kept_logits_greedy_text_and_perplexity(gemma3):
    """Against the same file dequantized, run in fp32 by the C kernels: logits within 5% of their
    scale (measured 2.9%), mean 0.5% (0.34%); perplexity on the held-out text (309 tokens) within 3%
    of the dequantized model in bf16 (measured: kept 23.18, bf16 23.28, fp32 23.29); greedy
    continuations (12 tokens) equal on most of the 8 prompts, at least 5 (measured 6; SmolLM2's Q4_1
    file, where every projection is 4-bit, 3 to 5)."""
    from test_quant import PROMPTS, kept_against_dequantized

    kept, dequantized, tok, _ = gemma3
    got = kept_against_dequantized(kept, dequantized, tok, HELDOUT.read_text(), PROMPTS)
    assert got["max"] < 0.05 and got["mean"] < 0.005
    assert abs(got["ppl_kept"] / got["ppl_bf16"] - 1) < 0.03
    assert got["same"] >= 5


@pytest.mark.slow
def test_import_gemma3_keeps_its_blocks_by_default(tmp_path, monkeypatch):
    """`parley models import gemma3-270m` stores the kept blocks (faster at the same quality:
    the tests above, benchmarks/RESULTS.md); the model loads back quantized and runs on the int8 path."""
    from parley.cli import main
    from parley.registry import GEMMA3_MODEL, Registry, gemma3_gguf

    monkeypatch.setenv("PARLEY_HOME", str(tmp_path))
    try:
        gemma3_gguf(install=False)
    except FileNotFoundError as e:
        pytest.skip(f"{e} (make test-models installs it)")
    assert main(["models", "import", GEMMA3_MODEL]) == 0
    model, tok, meta = Registry(tmp_path).load(GEMMA3_MODEL)
    assert meta["quantized"] == "keep" and len(quant.formats(model)) == 7 * 18 + 1
    engine = Engine(model.to(torch.bfloat16))
    assert engine.fast.quant
    [done] = engine.generate([tok.encode("The capital of France is")], SamplingParams(max_tokens=8))
    assert "France" in tok.decode(done.tokens)  # " the capital of the country of France." (a base model)
