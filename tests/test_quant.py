"""Quantized weights (model/quant.py) and the int8 kernels that read them (kernels.c, engine/fast.py).

Formats: packing and GGUF blocks round-trip exactly. Kernels: every int8 path this CPU runs
(vnni, avx2, scalar: `kernels=` caps the path) against a float64 reference computed from the same
integers, to float32 rounding. Models: a tiny random model through the engine on each path, and
SmolLM2's own Q4_1 file kept quantized against the same file dequantized: logits, greedy text and
perplexity on held-out text (benchmarks/data/perplexity_heldout.txt), with the margins stated below.
"""

import copy
import ctypes
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.engine import Engine
from parley.engine.fast import ISAS, FastDecoder, QWeight, kernels
from parley.engine.sampling import SamplingParams
from parley.model import quant, weights
from parley.model.quant import QuantError, QuantLinear
from parley.model.transformer import ModelConfig, Transformer

HELDOUT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "perplexity_heldout.txt"
CFG = ModelConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                  tie_word_embeddings=False)  # 96 and 160 inputs: odd numbers of blocks (3, 5)


def runnable(path: str) -> bool:
    lib = kernels()
    return lib is not None and lib.quant_isa(ISAS.index(path)) == ISAS.index(path)


PATHS = [pytest.param(p, marks=pytest.mark.skipif(not runnable(p), reason=f"this CPU cannot run the {p} path"))
         for p in ISAS]


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantize_rounds_each_weight_to_its_blocks_grid(fmt):
    torch.manual_seed(0)
    w = torch.randn(7, 96) * torch.rand(7, 1) * 3
    layer = QuantLinear.quantize(w, fmt)
    back = layer.dequantize().reshape(7, 3, 32)
    step = quant._half(layer.d)[..., None]
    # within half a step of the block's grid (plus the half-float rounding of the scale itself)
    assert ((back - w.reshape(7, 3, 32)).abs() <= step * (0.5 + (127 if fmt == "q8" else 15) * 2**-11)).all()
    assert layer.integers().min() >= (-127 if fmt == "q8" else 0)
    assert layer.integers().max() <= (127 if fmt == "q8" else 15)


def test_q4_packs_two_weights_a_byte_in_gguf_order():
    ints = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    q = torch.cat([ints[:, :16] | ints[:, 16:32] << 4, ints[:, 32:48] | ints[:, 48:] << 4], dim=1)
    layer = QuantLinear("q4", q, torch.zeros(4, 2, dtype=torch.int16), torch.zeros(4, 2, dtype=torch.int16))
    assert torch.equal(layer.integers(), ints)


def test_wrong_shapes_and_formats_are_refused():
    with pytest.raises(QuantError, match="multiple of 32"):
        QuantLinear.quantize(torch.randn(4, 40), "q8")
    with pytest.raises(QuantError, match="unknown quantized format"):
        QuantLinear.quantize(torch.randn(4, 32), "q3")
    with pytest.raises(QuantError, match="do not match"):
        QuantLinear("q8", torch.zeros(4, 16, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.int16))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_are_kept_exactly(kind):
    kind = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 2, (6, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(w, kind)
    layer = quant.from_gguf_blocks(blocks, kind)
    assert torch.equal(layer.dequantize(), torch.from_numpy(gguf.quants.dequantize(blocks, kind)))
    assert layer.fmt == ("q8" if kind == gguf.GGMLQuantizationType.Q8_0 else "q4")


# ---------------------------------------------------------------- kernels, each path

def run_kernel(layer: QuantLinear, x: torch.Tensor, isa: int, rows16: bool = False) -> torch.Tensor:
    """y = x W^T by kernels.c's quant_linear on path isa; `rows16`: from the weights interleaved 16
    rows at a time (quant.interleave16), which the VNNI path reads when it has them."""
    lib = kernels()
    B, I = x.shape
    y = torch.empty(B, layer.out_features)
    xq, xs = torch.empty(B * I, dtype=torch.int8), torch.empty(B * 3 * I // 32)
    packed = quant.interleave16(layer) if rows16 else None
    w = QWeight.of(layer, packed)
    lib.quant_linear(ctypes.byref(w), isa, x.data_ptr(), xq.data_ptr(), xs.data_ptr(), y.data_ptr(), B, I,
                     layer.out_features)
    return y


LAYOUTS = [pytest.param(p.values[0], True, id=f"{p.values[0]}-rows16", marks=p.marks) for p in PATHS[1:]] + \
          [pytest.param(p.values[0], False, id=p.values[0], marks=p.marks) for p in PATHS]


@pytest.mark.parametrize("path,rows16", LAYOUTS)
@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("rows", [1, 6, 13])
def test_kernel_equals_the_float64_product_of_the_same_integers(path, rows16, fmt, rows):
    """Integer sums are exact on every path and layout; only float32 rounding of the block sums
    differs. 13 rows: the 16-row layout's batch of 8 and a remainder of 5."""
    torch.manual_seed(2)
    for I in (96, 576):  # 3 blocks (VNNI's odd last block) and SmolLM2's width
        layer = QuantLinear.quantize(torch.randn(48 if rows16 else 37, I), fmt)
        x = torch.randn(rows, I) * 4
        x[0, :32] = 0  # an all-zero block of activations
        got = run_kernel(layer, x, ISAS.index(path), rows16).double()
        ref = quant.reference_product(layer, x)
        assert (got - ref).abs().max() <= 2e-6 * ref.abs().max(), (path, fmt, I)
        if rows16 and rows > 1:  # a row's bits do not depend on its batch
            assert torch.equal(run_kernel(layer, x[-1:], ISAS.index(path), True)[0], got[-1].float())
        if rows16 and path == "avx2" and runnable("vnni"):  # the same integers, the same float steps
            assert torch.equal(run_kernel(layer, x, ISAS.index("vnni"), True), got.float())


def test_interleave16_holds_every_weight_and_scale_where_the_kernel_reads_it():
    """The 16-row layout, read back in Python byte by byte as kernels.c documents it."""
    torch.manual_seed(5)
    for fmt in ("q4", "q8"):
        layer = QuantLinear.quantize(torch.randn(32, 64), fmt)
        rec = quant.interleave16(layer)
        assert rec.shape == (2, 2, quant.RECORD[fmt])
        ints = layer.integers().to(torch.int16)
        for g, k, r in ((0, 0, 0), (1, 1, 15), (1, 0, 7)):
            row, block = 16 * g + r, rec[g, k].to(torch.int16)
            for i in range(32):
                j, t = (i % 16) // 4, i % 4
                if fmt == "q4":
                    byte = block[64 * j + 4 * r + t]
                    got = byte & 15 if i < 16 else byte >> 4
                else:
                    got = block[64 * (i // 4) + 4 * r + t] - 128
                assert got == ints[row, 32 * k + i], (fmt, g, k, r, i)
            scales = rec[g, k, (256 if fmt == "q4" else 512):].contiguous().view(torch.int16)
            assert scales[r] == layer.d[row, k] and (fmt == "q8" or scales[16 + r] == layer.m[row, k])
    with pytest.raises(QuantError, match="groups of 16"):
        quant.interleave16(QuantLinear.quantize(torch.randn(40, 32), "q4"))


@pytest.mark.slow
@pytest.mark.skipif(not runnable("avx2"), reason="this CPU cannot run an AVX2 build")
def test_an_avx2_build_runs_every_path_it_can(tmp_path):
    """The kernels compiled for an AVX2 CPU (-march=haswell: no AVX-512 outside the VNNI path's
    own functions, no AMX), into a cache of their own, through this file's kernel and decode tests."""
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\nexec cc "$@" -march=haswell\n')  # the last -march wins over -march=native
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "kernel_equals or decode_step or interleave16"], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list((tmp_path / "cache" / "parley").glob("kernels-*.so")), "the AVX2 build was not made"


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_int8_activations_stay_close_to_the_float_product(fmt):
    """What rounding the inputs to int8 costs: within 1% of the product's scale."""
    torch.manual_seed(3)
    layer = QuantLinear.quantize(torch.randn(64, 576), fmt)
    x = torch.randn(3, 576)
    got = run_kernel(layer, x, kernels().quant_isa(len(ISAS)))
    exact = x @ layer.dequantize().t()
    assert (got - exact).abs().max() < 0.01 * exact.abs().max()


# ---------------------------------------------------------------- a tiny model through the engine

def tiny(fmt: str) -> Transformer:
    torch.manual_seed(4)
    model = Transformer(CFG)
    model.init_weights(std=0.1)
    return quant.quantize_model(model.eval(), fmt)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_decode_step_on_each_path_follows_the_reference_forward(path, fmt):
    """The C step (int8 activations) against the PyTorch forward over the same quantized weights
    (fp32 activations): within 3% of the logits' scale; a row's logits the same bits alone or batched."""
    model = tiny(fmt)
    fast = FastDecoder.create(model, path=path)
    assert fast is not None and fast.quant and not fast.amx and fast.path.startswith(path)
    cache = PagedKVCache(CFG, 2**22, 8, fast.kv_dtype)
    ref_cache = PagedKVCache(CFG, 2**22, 8, torch.float32)
    prompts = [[5, 17, 33, 2, 9, 11], [7, 1, 250]]
    seqs, ref_seqs = ([CachedSequence(tokens=list(p), pages=c.allocate(4)) for p in prompts] for c in (cache, ref_cache))
    with torch.inference_mode():
        for pool, rows in ((cache, seqs), (ref_cache, ref_seqs)):  # prompts through the reference
            batch = pool.batch([(q, len(q.tokens) - 1) for q in rows])
            model(torch.tensor([batch.ids]), batch)
        got = fast.step_paged(cache.batch([(q, 1) for q in seqs])).clone()
        batch = ref_cache.batch([(q, 1) for q in ref_seqs])
        expected = model(torch.tensor([batch.ids]), batch)[0]
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()
        seqs[1].length -= 1  # the second row's step again, alone
        alone = fast.step_paged(cache.batch([(seqs[1], 1)]))
        assert torch.equal(alone[0], got[1])


ENGINE_PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [2, 71, 82], [1] * 40]


def engine_paths() -> list[tuple[str, str]]:
    """(int8 path, the engine's `kernels=` setting for it) of each path this CPU runs."""
    return [(path, "avx512" if path == "vnni" else path) for path in ISAS if runnable(path)]


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_engine_paths_agree_and_prompts_run_in_c(fmt, monkeypatch):
    """Greedy tokens of every runnable path are the same (their sums differ only in float order),
    prompt chunks included (step_rows), and a prompt's tokens are those it gets alone."""
    monkeypatch.delenv("PARLEY_KERNELS", raising=False)
    prompts = ENGINE_PROMPTS
    outs = {}
    for path, setting in engine_paths():
        engine = Engine(tiny(fmt), kernels=setting, max_batch=4, prefill_chunk=16, prefill_budget=32)
        assert engine.fast.all_rows
        outs[path] = [c.tokens for c in engine.generate(prompts, SamplingParams(max_tokens=8))]
        alone = [engine.generate([p], SamplingParams(max_tokens=8))[0].tokens for p in prompts]
        assert alone == outs[path], path
    assert len({str(o) for o in outs.values()}) == 1, outs


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_keys_and_values_in_bf16_on_every_int8_path(fmt, monkeypatch):
    """engine.kv_dtype=bfloat16 keeps the cache in bf16 on each runnable int8 path: a prompt's tokens
    are still those it gets alone, and every step's logits stay within 4% of the logits' scale of the
    same path with fp32 keys and values (teacher-forced on that path's own greedy tokens; measured at
    most 2.7% on this tiny model, where the attention output is rounded to int8 after them)."""
    monkeypatch.delenv("PARLEY_KERNELS", raising=False)
    prompts = ENGINE_PROMPTS
    for path, setting in engine_paths():
        engine = Engine(tiny(fmt), kernels=setting, kv_dtype="bfloat16", max_batch=4, prefill_chunk=16,
                        prefill_budget=32)
        assert engine.fast.kv_dtype == torch.bfloat16 and engine.cache.k[0].dtype == torch.bfloat16
        together = [c.tokens for c in engine.generate(prompts, SamplingParams(max_tokens=8))]
        assert [engine.generate([p], SamplingParams(max_tokens=8))[0].tokens for p in prompts] == together, path
        fp32 = FastDecoder.create(tiny(fmt), path=setting)
        assert fp32.kv_dtype == torch.float32  # the default on the int8 paths
        for prompt, tokens in zip(prompts, together):
            with torch.inference_mode():
                got, expected = all_logits(engine.fast, prompt + tokens), all_logits(fp32, prompt + tokens)
            assert (got - expected).abs().max() < 0.04 * expected.abs().max(), path


def test_keys_and_values_in_bf16_on_the_float_paths_and_pytorch():
    """kv_dtype=bfloat16 where the default is fp32: the AVX2 and portable float paths of fp32 weights and
    the PyTorch path; each greedy answer the same batched as alone, and the cache in bf16."""
    torch.manual_seed(4)
    model = Transformer(CFG)
    model.init_weights(std=0.1)
    prompts = ENGINE_PROMPTS[:2]
    for kernels in ("avx2", "scalar", "torch"):
        engine = Engine(model.eval(), kernels=kernels, kv_dtype="bfloat16", max_batch=4)
        assert engine.cache.k[0].dtype == torch.bfloat16 and (kernels == "torch") == (engine.fast is None)
        together = [c.tokens for c in engine.generate(prompts, SamplingParams(max_tokens=6))]
        assert [engine.generate([p], SamplingParams(max_tokens=6))[0].tokens for p in prompts] == together, kernels


def test_a_checkpoint_keeps_its_quantized_layers(tmp_path):
    from parley.model.weights import load_checkpoint, save_checkpoint

    model = tiny("q4")
    model.lm_head = QuantLinear.quantize(model.lm_head.dequantize(), "q8")  # mixed formats, as SmolLM2's file
    save_checkpoint(tmp_path / "m", model)
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert quant.formats(loaded) == quant.formats(model) and quant.formats(loaded)["lm_head"] == "q8"
    for name, layer in quant.quantized_layers(model).items():
        assert torch.equal(loaded.get_submodule(name).dequantize(), layer.dequantize())


# ---------------------------------------------------------------- SmolLM2's own Q4_1 file

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of", "Le chat est sur",
           "My favourite recipe for pancakes", "The theory of relativity says that"]


@pytest.fixture(scope="module")
def smol_q(smollm2_path, smollm2_ours):
    from parley.model.tokenizer import Tokenizer

    model = weights.keep_gguf_blocks(copy.deepcopy(smollm2_ours[0]), smollm2_path)
    return model, smollm2_ours[0], Tokenizer.from_gguf(smollm2_path)


def all_logits(fast: FastDecoder, tokens: list[int]) -> torch.Tensor:
    """Logits after every token of `tokens`, one prompt chunk through the C layers."""
    cache = PagedKVCache(fast.cfg, 2**26, 16, fast.kv_dtype)
    seq = CachedSequence(tokens=list(tokens), pages=cache.allocate(cache.pages_for(len(tokens))))
    batch = cache.batch([(seq, len(tokens))])
    batch.outputs = torch.arange(len(tokens))
    return fast.step_rows(batch).clone()


def test_smollm2_keeps_the_files_blocks_exactly(smol_q):
    model, dequantized, _ = smol_q
    layers = quant.quantized_layers(model)
    assert len(layers) == 7 * 30 + 1 and layers["lm_head"].fmt == "q8"  # the file's Q8_0 embedding
    for name, layer in layers.items():  # q and k rows un-permuted as whole rows: exact
        assert torch.equal(layer.dequantize(), dequantized.get_submodule(name).weight), name
    assert quant.weight_bytes(model) < 0.2 * quant.weight_bytes(dequantized)  # fp32 there


def kept_against_dequantized(kept: Transformer, dequantized: Transformer, tok, text: str, prompts: list[str]) -> dict:
    """A model of kept blocks (in bf16) through the C step against the same file dequantized (fp32,
    the exact sums of its weights), each figure printed: logits after each of `text`'s first 400
    tokens (max and mean difference over the fp32 logits' largest magnitude); perplexity of those
    tokens kept, in bf16 and in fp32; on how many `prompts` greedy 12-token continuations are equal."""
    fast = FastDecoder.create(copy.deepcopy(kept).to(torch.bfloat16))
    reference = FastDecoder.create(dequantized)
    assert fast.quant and not reference.quant
    ids = tok.encode(text)[:400]
    with torch.inference_mode():
        got, exact = all_logits(fast, ids), all_logits(reference, ids)
        scale, diff = exact.abs().max(), (got - exact).abs()

        def perplexity(logits):
            return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())

        bf16 = FastDecoder.create(copy.deepcopy(dequantized).to(torch.bfloat16))
        out = dict(max=(diff.max() / scale).item(), mean=(diff.mean() / scale).item(), ppl_kept=perplexity(got),
                   ppl_bf16=perplexity(all_logits(bf16, ids)), ppl_fp32=perplexity(exact))
    params = SamplingParams(max_tokens=12)
    encoded = [tok.encode(p) for p in prompts]
    ours = [c.tokens for c in Engine(copy.deepcopy(kept).to(torch.bfloat16)).generate(encoded, params)]
    theirs = [c.tokens for c in Engine(dequantized, kernels="avx512").generate(encoded, params)]
    out["same"] = sum(a == b for a, b in zip(ours, theirs))
    print(f"logits within {out['max']:.4f} (mean {out['mean']:.5f}) of their scale; perplexity on {len(ids)} held-out "
          f"tokens: kept {out['ppl_kept']:.3f}, bf16 {out['ppl_bf16']:.3f}, fp32 {out['ppl_fp32']:.3f}; greedy "
          f"continuations equal on {out['same']} of {len(prompts)} prompts")
    return out


def test_smollm2_quantized_logits_greedy_text_and_perplexity(smol_q):
    """Against the same weights dequantized, run in fp32 by the C kernels: logits within 4% of their
    scale (mean 0.5%); perplexity on held-out text within 2% of the dequantized model in bf16 (the
    engine's default dtype; measured: q4 26.50 on the VNNI path's 16-row layout (26.56 on the file's
    layout), bf16 26.39, fp32 26.42 on 312 tokens; 26.66 on 2026-12-06 with the kernels of then, on
    main as on branch kquant). Greedy continuations (12 tokens) equal on at least 3 of 8 prompts
    (measured 5 on the 16-row layout, 3 on the file's, 4 on 2026-12-06; bf16 on AMX tiles: 7 of 8):
    rounding the activations to int8 per block, as llama.cpp does, moves near-tied logits enough to
    flip a pick, after which the texts part (first differences at tokens 0, 6, 8, 9, 10). The
    PyTorch forward over the same quantized weights with float activations gives 8 of 8: the
    weights are exact, the activations' rounding is the difference."""
    model, dequantized, tok = smol_q
    got = kept_against_dequantized(model, dequantized, tok, HELDOUT.read_text(), PROMPTS)
    assert got["max"] < 0.04 and got["mean"] < 0.005
    assert abs(got["ppl_kept"] / got["ppl_bf16"] - 1) < 0.02
    assert got["same"] >= 3


# ---------------------------------------------------------------- `parley models import --quantize`

def test_import_quantize_stores_quantized_weights_and_generates(tmp_path, tiny_hf_dir):
    from test_cli import assert_clean_error, parley_here

    from parley.registry import Registry

    out = parley_here(tmp_path, "models", "import", str(tiny_hf_dir), "--name", "tiny-q4", "--quantize", "q4")
    assert out.returncode == 0 and "imported tiny-q4" in out.stdout, out.stderr
    registry = Registry(tmp_path)
    registry.import_model(str(tiny_hf_dir), name="tiny-q8", quantize="q8")
    for fmt in ("q4", "q8"):
        model, _, meta = registry.load(f"tiny-{fmt}")
        assert meta["quantized"] == fmt and set(quant.formats(model).values()) == {fmt}
        assert len(quant.formats(model)) == 7 * 2 + 1  # every projection and the output layer
        engine = Engine(model)
        assert engine.fast.quant
        [done] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=5))
        assert len(done.tokens) == 5
    registry.export("tiny-q4", tmp_path / "out")  # an HF folder of the exact dequantized values
    from parley.model.weights import load_hf

    exported, _ = load_hf(tmp_path / "out")
    q4, _, _ = registry.load("tiny-q4")
    assert torch.equal(exported.model.layers[0].mlp.down_proj.weight, q4.model.layers[0].mlp.down_proj.dequantize())
    with pytest.raises(ValueError, match="applies to .gguf files"):
        registry.import_model(str(tiny_hf_dir), name="x", quantize="keep")
    assert_clean_error(parley_here(tmp_path, "models", "import", str(tiny_hf_dir), "--name", "x", "--quantize", "q5"),
                       "quantize")
