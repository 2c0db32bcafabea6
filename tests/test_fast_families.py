"""The C kernels (engine/fast.py, kernels.c) run every model family: against the model's own
PyTorch forward on random-init models of unusual shapes (GQA 7:1, head_dim unlike hidden/heads,
random norm weights and biases so a missing term shows, a sliding window shorter than the
prompt and crossing pages; mixtures of experts: Mixtral, Qwen3-MoE with dense layers among
sparse ones, Qwen2-MoE with its shared expert), on every path this machine runs: the C loops
of float weights (`tiles=False`, the engine's kernels=avx512; AVX-512, AVX2 and portable C) with
fp32 and with bf16 weights, AVX512-BF16 dot products and AMX tiles with bf16 weights, and the
int8 paths of q8 weights (vnni, avx2, scalar).

Tolerances: fp32 weights, 1e-4 absolute on logits of scale ~1 (the same sums in another order);
the C loops on bf16 weights, 0.1% of the logits' scale against the fp32 forward of the same
values; bf16 tiles and AVX512-BF16 dot products, 2% of the scale at most and 0.3% on average (activations, keys and values
rounded to bf16: PyTorch's own bf16 forward is as far); int8, 5% at most and 1% on average
(tests/test_quant.py allows 3% for a plain Llama; Gemma's norms amplify the rounding)."""

import copy
import random

import pytest
import torch

from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.engine import Engine
from parley.engine.fast import FLOAT_CEILING, FLOAT_ISAS, ISAS, FastDecoder, kernels
from parley.engine.sampling import SamplingParams
from parley.model import quant
from parley.model.transformer import ModelConfig, Transformer
from test_tiles import assert_cuts_change_no_bit

pytestmark = pytest.mark.usefixtures("one_thread")

GEMMA3 = dict(model_type="gemma3_text", hidden_act="gelu_pytorch_tanh", qk_norm=True, rope_local_base_freq=1e3,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=24,
              final_logit_softcapping=3.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=1e6)
FAMILIES = {
    "qwen2": dict(model_type="qwen2", qkv_bias=True),
    "qwen3": dict(model_type="qwen3", qk_norm=True, attention_bias=True),
    "gemma3": dict(GEMMA3, sliding_window=5),
    "gemma3_attention_softcap": dict(GEMMA3, sliding_window=3, attn_logit_softcapping=2.0),
    "mistral_sliding": dict(sliding_window=5),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "yarn_rope": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "phi3_longrope": dict(model_type="phi3", sliding_window=9, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": 16,
        "short_factor": [1.0 + i / 4 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", qk_norm=True, num_local_experts=5, num_experts_per_tok=3,
                      moe_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen2_moe_shared_expert": dict(model_type="qwen2_moe", qkv_bias=True, num_local_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=64, shared_expert_intermediate_size=96,
                                    norm_topk_prob=False),
}
# 7 query heads to 1 key/value head, 16-wide heads on a 56-wide residual (not 56 / 7)
SMALL = dict(vocab_size=97, hidden_size=56, intermediate_size=48, num_hidden_layers=3, num_attention_heads=7,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
# the same ratios in whole AMX tiles: 32-wide heads, 7 of them on a 128-wide residual
TILED = dict(vocab_size=304, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=7,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=160, tie_word_embeddings=False)


def family_model(name: str, shape: dict, window: int | None = None, **overrides) -> Transformer:
    """Random values everywhere, norms and biases included (projections a little smaller, so
    that bf16 logits keep a clear best token)."""
    extra = {**FAMILIES[name], **overrides}
    if window and extra.get("sliding_window"):
        extra["sliding_window"] = window
    scaling = extra.get("rope_scaling") or {}
    if scaling.get("rope_type") == "longrope":  # a factor per pair of head dims
        half = shape["head_dim"] // 2
        extra["rope_scaling"] = {**scaling, "short_factor": [1.0 + i / half for i in range(half)],
                                 "long_factor": [2.0 + i for i in range(half)]}
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15 if p.dim() == 1 or shape is SMALL else 0.08)
    return model


def tokens(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def run_both(fast: FastDecoder, reference: Transformer, kv_dtype: torch.dtype, page_size: int, cuts: list[list[int]],
             lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same steps on the C path and on the reference's paged forward (each on its own cache
    with the same scattered pages): cuts[step][row] tokens fed to each row (1: a decode row; they
    go first). Returns (got, expected) logits of every step."""
    cfg = reference.config
    caches = [PagedKVCache(cfg, 2**23, page_size, dtype) for dtype in (kv_dtype, torch.float32)]
    pages = min(cache.num_pages for cache in caches)
    order = random.Random(7).sample(range(pages), pages)
    rows = []
    for cache in caches:
        free = list(order)
        rows.append([CachedSequence(tokens=tokens(n, cfg.vocab_size, seed=n),
                                    pages=[free.pop() for _ in range(cache.pages_for(n))]) for n in lengths])
    out = []
    with torch.inference_mode():
        for cut in cuts:
            feeds = [sorted([(seq, n) for seq, n in zip(mine, cut) if n], key=lambda f: f[1] > 1) for mine in rows]
            batch = caches[0].batch(feeds[0])
            got = (fast.step_rows(batch) if batch.prefill else fast.step_paged(batch)).clone()
            batch = caches[1].batch(feeds[1])
            out.append((got, reference(torch.tensor([batch.ids]), batch)[0]))
    return out


# two prompts of 20 and 10 tokens in chunks, the second decoding beside the first's second chunk; then
# decode steps: every window (3, 5, 9) is shorter than the prompts and crosses 4-token pages
CUTS = [[12, 9], [8, 1], [0, 1], [1, 1], [1, 1], [1, 1]]


def float_runnable(path: str) -> bool:
    """Whether this CPU runs the float path `path` (FLOAT_ISAS, or avx512-fma)."""
    lib, level = kernels(), FLOAT_CEILING.get(path, FLOAT_ISAS.index(path) if path in FLOAT_ISAS else -1)
    return lib is not None and lib.float_isa(level) == level


FLOAT_PATHS = [pytest.param(p, marks=pytest.mark.skipif(not float_runnable(p), reason=f"no {p} here"))
               for p in ("avx512-fma", "avx2", "scalar")]


@pytest.mark.parametrize("path", FLOAT_PATHS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_c_path_equals_the_model_forward_in_fp32(name, path):
    model = family_model(name, SMALL)
    assert FastDecoder.unsupported(model) is None
    fast = FastDecoder.create(model, tiles=False, path=path)
    assert fast is not None and fast.path == path.removesuffix("-fma") and not fast.all_rows  # fp32: PyTorch's
    for got, expected in run_both(fast, model, torch.float32, 4, CUTS, [23, 14]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # and the last step's logits of the first row are the plain (uncached) forward's
    with torch.no_grad():
        whole = model(torch.tensor([tokens(20, SMALL["vocab_size"], seed=20)]))[0, -1]
    first, _ = run_both(fast, model, torch.float32, 4, [[19, 0], [1, 0]], [20, 14])[-1]
    torch.testing.assert_close(first[0], whole, atol=1e-4, rtol=0)


def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_text_on_the_c_path_equals_the_models_forward(name, monkeypatch):
    monkeypatch.delenv("PARLEY_KERNELS", raising=False)
    model = family_model(name, SMALL)
    prompts = [tokens(15, SMALL["vocab_size"], seed=1), tokens(6, SMALL["vocab_size"], seed=2)]
    with Engine(model, kernels="avx512", page_size=4, max_batch=2) as engine:
        assert engine.fast is not None and engine.kernels_path == "avx512"
        got = [c.tokens for c in engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))]
    assert got == [greedy(model, p, 10) for p in prompts]


@pytest.fixture(scope="module")
def amx():
    model = family_model("qwen3", TILED).to(torch.bfloat16)
    fast = FastDecoder.create(model)
    if fast is None or not fast.amx:
        pytest.skip("this CPU (or kernel) offers no AMX tiles: the tile path is not used here")


def bf16_and_reference(name: str, window: int | None = None) -> tuple[Transformer, Transformer]:
    """A bf16 model and the fp32 model of the same (bf16) values."""
    model = family_model(name, TILED, window).to(torch.bfloat16)
    reference = Transformer(model.config).eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return model, reference


# a 100-token prompt in chunks of 61 and 39 beside a 17-token one (decoding beside the second
# chunk), then decode steps: the windows (37, 9) start inside 16-position key tiles and
# 32-position value tiles
TILE_CUTS = [[61, 17], [39, 1], [1, 1], [1, 1]]


TILE_FAMILIES = ["qwen2", "qwen3", "gemma3", "gemma3_attention_softcap", "phi3_longrope", "qwen3_moe",
                 "qwen2_moe_shared_expert"]


@pytest.mark.parametrize("name", TILE_FAMILIES)
def test_c_loops_on_bf16_weights_equal_the_fp32_forward(name):
    """tiles=False with bf16 weights on the AVX2 path (a CPU without AVX-512): fp32 activations,
    keys and values, so only the order of the sums differs from the fp32 forward of the same
    values."""
    model, reference = bf16_and_reference(name, window=37)
    fast = FastDecoder.create(model, tiles=False, path="avx2")
    assert not fast.amx and not fast.packed and fast.kv_dtype == torch.float32
    for got, expected in run_both(fast, reference, torch.float32, 16, TILE_CUTS, [102, 20]):
        assert (got - expected).abs().max() < 1e-3 * expected.abs().max()


@pytest.mark.parametrize("name", TILE_FAMILIES)
def test_packed_fma_path_keeps_bf16_keys_within_bf16_precision_of_fp32(name):
    """tiles=False with bf16 weights on AVX-512 FMAs (packed weights): fp32 activations, keys and
    values kept in bf16 as on the tiles, so the tiles' bounds hold."""
    model, reference = bf16_and_reference(name, window=37)
    fast = FastDecoder.create(model, tiles=False, path="avx512-fma")
    assert not fast.amx and fast.packed and fast.kv_dtype == torch.bfloat16
    for got, expected in run_both(fast, reference, fast.kv_dtype, 16, TILE_CUTS, [102, 20]):
        scale = expected.abs().max()
        assert (got - expected).abs().max() < 0.02 * scale
        assert (got - expected).abs().mean() < 0.003 * scale


@pytest.mark.skipif(not float_runnable("avx512-bf16"), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("name", TILE_FAMILIES)
def test_bf16_dot_products_stay_within_bf16_precision_of_fp32(name):
    """tiles=False with bf16 weights on a CPU with AVX512-BF16: projection inputs rounded to bf16
    and keys and values kept in bf16, as on the tiles, so the tiles' bounds hold."""
    model, reference = bf16_and_reference(name, window=37)
    fast = FastDecoder.create(model, tiles=False, path="avx512-bf16")
    assert fast.path == "avx512-bf16" and fast.kv_dtype == torch.bfloat16 and fast.all_rows
    for got, expected in run_both(fast, reference, fast.kv_dtype, 16, TILE_CUTS, [102, 20]):
        scale = expected.abs().max()
        assert (got - expected).abs().max() < 0.02 * scale
        assert (got - expected).abs().mean() < 0.003 * scale


@pytest.mark.parametrize("name", TILE_FAMILIES)
def test_tile_path_stays_within_bf16_precision_of_fp32(amx, name):
    """Within 2% of the logits' scale at most and 0.3% on average: PyTorch's own bf16 forward of
    these models is as far from fp32 (0.020 and 0.0032 measured on gemma3). The best token is the
    same wherever fp32's best two differ by more than 2% of the scale."""
    model, reference = bf16_and_reference(name, window=37)
    fast = FastDecoder.create(model)
    assert fast.amx and fast.kv_dtype == torch.bfloat16 and fast.all_rows
    for got, expected in run_both(fast, reference, torch.bfloat16, 16, TILE_CUTS, [102, 20]):
        scale = expected.abs().max()
        assert (got - expected).abs().max() < 0.02 * scale
        assert (got - expected).abs().mean() < 0.003 * scale
        top = expected.topk(2, dim=-1).values
        clear = top[:, 0] - top[:, 1] > 0.02 * scale
        assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


@pytest.mark.parametrize("page_size", [16, 8], ids=["key-tiles", "one-key-at-a-time"])
def test_where_a_prompt_is_cut_changes_no_bit_in_a_sliding_window(amx, page_size):
    """A row's bits on tiles do not depend on how its prompt was fed, its window's first position
    anywhere in a tile of keys or values (tests/test_tiles.py checks the same without windows)."""
    model, _ = bf16_and_reference("gemma3", window=37)
    assert_cuts_change_no_bit(FastDecoder.create(model), page_size)


def runnable(path: str) -> bool:
    lib = kernels()
    return lib is not None and lib.quant_isa(ISAS.index(path)) == ISAS.index(path)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.skipif(not runnable(p), reason=f"no {p} here"))
                                  for p in ISAS])
@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_int8_paths_follow_the_forward_of_the_same_quantized_weights(name, path):
    """q/k norms and Gemma's terms on the int8 paths, against the PyTorch forward over the
    dequantized q8 weights (qwen3 without its biases: quantized layers keep none): within 5% of
    the logits' scale at most, 1% on average. Gemma's norms amplify the int8 rounding of
    activations: 3.7% at most (0.7% on average) measured here, against 1.2% for qwen3 and 1.0%
    for a plain Llama of this shape; the float paths above show the terms themselves are exact."""
    model = family_model(name, TILED, window=37, **({"attention_bias": False} if name == "qwen3" else {}))
    quantized = quant.quantize_model(copy.deepcopy(model), "q8")
    reference = quant.dequantize_model(copy.deepcopy(quantized))
    fast = FastDecoder.create(quantized, path=path)
    assert fast.quant and fast.path.startswith(path)
    for got, expected in run_both(fast, reference, fast.kv_dtype, 8, TILE_CUTS, [102, 20]):
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()
        assert (got - expected).abs().mean() < 0.01 * expected.abs().max()


def test_quantizing_a_model_with_biases_is_refused():
    with pytest.raises(quant.QuantError, match="biases"):
        quant.quantize_model(family_model("qwen2", SMALL), "q8")


def test_what_the_kernels_lack_runs_on_pytorch_and_the_startup_line_says_so(caplog):
    small = {**SMALL, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1}
    model = Transformer(ModelConfig(**small, num_local_experts=65, num_experts_per_tok=65))
    assert FastDecoder.unsupported(model) == "more than 64 experts a token" and FastDecoder.create(model) is None
    with caplog.at_level("WARNING", logger="parley.engine"):
        with Engine(model.eval(), kernels="auto") as engine:
            assert engine.fast is None
            assert engine.kernels_path == "torch (the C kernels lack more than 64 experts a token)"
    assert "more than 64 experts a token" in caplog.text


@pytest.mark.parametrize("path", ["torch", "c"])
def test_pages_behind_every_layers_window_are_given_back(path):
    """Every layer slides (window 5, 4-token pages): pages wholly behind the next query's window
    go back to the pool as the sequence moves on, another sequence overwrites them, and the
    logits stay those of the uncached forward, on the PyTorch path and in C."""
    model = family_model("mistral_sliding", SMALL)
    fast = FastDecoder.create(model, tiles=False) if path == "c" else None
    cache = PagedKVCache(model.config, 2**22, 4)
    assert cache.window == 5 and PagedKVCache(family_model("gemma3", SMALL).config, 2**22, 4).window is None
    prompt = tokens(40, SMALL["vocab_size"], seed=3)
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0]
    seq = CachedSequence(tokens=prompt, pages=cache.allocate(10))
    free_before = cache.pages_free
    with torch.inference_mode():
        for n in [12] + [1] * 28:
            batch = cache.batch([(seq, n)])
            got = fast.step_rows(batch) if fast and n > 1 else fast.step_paged(batch) if fast else \
                model(torch.tensor([batch.ids]), batch)[0]
            torch.testing.assert_close(got[-1], expected[seq.length - 1], atol=1e-4, rtol=0)
            # another sequence takes the free pages (those given back first) and writes them
            other = CachedSequence(tokens=tokens(12, SMALL["vocab_size"], seed=seq.length), pages=cache.allocate(3))
            feed = cache.batch([(other, 12)])
            model(torch.tensor([feed.ids]), feed)
            cache.release(other)
    assert seq.dropped == (39 - 5 + 1) // 4 and cache.pages_free == free_before + seq.dropped
    cache.release(seq)
    assert cache.pages_free == cache.num_pages
