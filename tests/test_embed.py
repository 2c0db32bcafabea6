"""Our MiniLM encoder against sentence-transformers on the same weights."""

import numpy as np
import pytest

from parley.pipeline.embed import Embedder, EmbedderError, cosine_top, from_blob, to_blob


def test_matches_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    from parley.pipeline.embed import default_model_dir

    texts = ["hello", "How do I kill a python process?", "", "word " * 600, "Paris is in France."]
    reference = SentenceTransformer(str(default_model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    ours = embedder(texts)
    assert ours.shape == (5, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_batched_equals_alone_and_order_kept(embedder):
    texts = ["a short one", "a much longer sentence about the weather in Lisbon in May", "mid length text"]
    together = embedder(texts)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(embedder([t])[0], together[i], atol=1e-5)


def test_similarity_ranks_paraphrase_first(embedder):
    docs = embedder(["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten rested on a rug."])
    q = embedder(["a small cat lying on a carpet"])[0]
    assert [i for i, _ in cosine_top(q, docs, 2)] == [2, 0]


def test_blob_round_trip_and_errors(embedder, tmp_path):
    v = embedder(["x"])[0]
    np.testing.assert_array_equal(from_blob(to_blob(v)), v)
    with pytest.raises(EmbedderError, match="expected 384"):
        from_blob(b"\0" * 12)
    with pytest.raises(TypeError, match="list"):
        embedder("not a list")
    with pytest.raises(EmbedderError, match="cannot load"):
        Embedder.load(tmp_path)


def test_recent_texts_are_not_computed_twice(embedder):
    first = embedder(["a fresh sentence about owls", "another one about bats"])
    calls = []
    forward = embedder._forward
    embedder._forward = lambda batch: calls.append(len(batch)) or forward(batch)
    try:
        again = embedder(["another one about bats", "a new third one", "a fresh sentence about owls"])
    finally:
        del embedder._forward
    assert calls == [1]  # only the new text went through the model
    np.testing.assert_array_equal(again[[2, 0]], first)


def test_last_lengths_are_the_token_counts_the_encoder_read(embedder):
    texts = ["short", "a somewhat longer sentence about the encoder", "x " * 400]  # the last one is cut at 256
    embedder.encode(texts, remember=False)
    assert embedder.last_lengths == [len(embedder.tokenizer.encode(t).ids) for t in texts]
    assert embedder.last_lengths[2] == embedder.max_tokens


def test_the_fused_layer_equals_the_plain_one(embedder):
    """Without gradients a layer runs through oneDNN's fused linear (bias, GELU and residual
    inside the product); with them, the plain modules. Same numbers, fp32."""
    import torch

    x = torch.randn(3, 11, 384, generator=torch.Generator().manual_seed(0))
    keep = torch.arange(11) < torch.tensor([[11], [4], [1]])
    layer = embedder.layers[2]
    with torch.no_grad():
        fused = layer(x, keep[:, None, None, :])
    plain = layer(x, keep[:, None, None, :]).detach()  # grad enabled: the plain path
    torch.testing.assert_close(fused[keep], plain[keep], atol=2e-5, rtol=1e-5)


def test_tile_attention_equals_sdpa_on_padded_rows(monkeypatch):
    """kernels.c's encoder_attend (AMX) against PyTorch's attention on bf16 projections, rows of
    several lengths (1, a tile's 16, past it, not a multiple of 16, full); padded rows come out
    zero. On a CPU without AMX, or with a lower path forced (PARLEY_KERNELS=avx512), the kernel is
    not offered and SDPA runs: checked too."""
    import torch
    import torch.nn.functional as F

    import parley.pipeline.embed as embed

    b, t, heads, hd = 5, 77, 12, 32
    qkv = (torch.randn(b * t, 3 * heads * hd, generator=torch.Generator().manual_seed(1)) * 2).bfloat16()
    lens = torch.tensor([77, 1, 16, 33, 50])
    keep = torch.arange(t) < lens[:, None]
    out = embed._tile_attention(qkv, keep[:, None, None, :], b, t, heads)
    from parley.engine.config import EngineConfig

    if "amx_bf16" not in embed.cpu_flags() or EngineConfig().resolved_kernels() not in ("auto", "amx"):
        assert out is None and embed._attention_kernel() is None  # no tiles, or a lower path forced
        return
    assert out is not None and out.dtype == torch.bfloat16 and out.shape == (b * t, heads * hd)
    q, k, v = qkv.float().view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]).transpose(1, 2).reshape(b * t, -1)
    got = out.float()
    flat = keep.reshape(-1)
    assert (got[~flat] == 0).all()
    torch.testing.assert_close(got[flat], ref[flat], atol=0.04, rtol=0.02)  # bf16 probabilities and outputs
    # left padding is not what the kernel reads: it declines, and SDPA runs
    assert embed._tile_attention(qkv, keep.flip(1)[:, None, None, :], b, t, heads) is None
    # the engine's setting forces the lower path
    monkeypatch.setenv("PARLEY_KERNELS", "avx512")
    embed._attention_kernel.cache_clear()
    try:
        assert embed._tile_attention(qkv, keep[:, None, None, :], b, t, heads) is None
    finally:
        monkeypatch.delenv("PARLEY_KERNELS")
        embed._attention_kernel.cache_clear()


def test_bf16_embeddings_with_and_without_the_tile_kernel(monkeypatch):
    """Whole bf16 embeddings of texts of many lengths: the AMX attention kernel against SDPA
    (forced by PARLEY_KERNELS=avx512), both within the fp32 tolerance of tests/test_ingest.py."""
    import parley.pipeline.embed as embed

    texts = ["hi", "How do I kill a python process that hangs?", "word " * 600,
             "asyncio.gather(*aws) runs awaitables concurrently. " * 9, "Rent is due on the first day."]
    fp32 = Embedder.load(precision="fp32")(texts, remember=False)
    tiles = Embedder.load(precision="bf16")(texts, remember=False)
    monkeypatch.setenv("PARLEY_KERNELS", "avx512")
    embed._attention_kernel.cache_clear()
    try:
        sdpa = Embedder.load(precision="bf16")(texts, remember=False)
    finally:
        monkeypatch.delenv("PARLEY_KERNELS")
        embed._attention_kernel.cache_clear()
    assert (fp32 * tiles).sum(1).min() >= 0.999 and (fp32 * sdpa).sum(1).min() >= 0.999
    assert (tiles * sdpa).sum(1).min() >= 0.9995


TEXTS = ["hi", "How do I kill a python process that hangs?", "word " * 600,
         "asyncio.gather(*aws) runs awaitables concurrently. " * 9, "Rent is due on the first day."]


@pytest.mark.parametrize("path, name", [("avx2", "avx2"), ("avx512-fma", "avx512"), ("avx512-bf16", "avx512-bf16")])
def test_bf16_linear_products_on_each_kernel_path(path, name):
    """In bf16 on a CPU without tiles the encoder's linear products run on kernels.c (bf16 weights,
    packed for the AVX-512 paths; fp32 activations); each path this CPU can execute is forced by the
    engine's setting and checked against fp32, texts of many lengths in one padded batch. Only a path
    whose instructions the CPU lacks is skipped (a laptop with AVX2 runs the first)."""
    import torch

    from parley.engine.fast import FLOAT_CEILING, kernels

    if kernels() is None:
        pytest.fail("the C kernels did not build: is a C compiler installed (make setup)?")
    if kernels().float_isa(FLOAT_CEILING[path]) != FLOAT_CEILING[path]:
        pytest.skip(f"this CPU lacks the instructions of {path}")
    fp32 = Embedder.load()
    want = fp32(TEXTS, remember=False)
    half = Embedder.load().in_precision("bf16", path)
    assert half.linear_path == name and half.precision == "bf16"
    assert all(layer.kernel is not None for layer in half.layers)
    assert half.layers[0].qkv.weight.dtype == torch.float32  # activations and the rest stay fp32
    got = half(TEXTS, remember=False)
    assert (want * got).sum(1).min() >= 0.9999
    one = half([TEXTS[1]], remember=False)  # alone, unpadded: the same vector as in the batch
    assert float(one[0] @ got[1]) >= 0.99999


def test_the_kernel_copies_follow_their_weights():
    """The bf16 copies are used only while the weights are the ones they were copied from: a copy of
    the model, weights loaded in place, or the model moved to bf16 compute in oneDNN, and give its
    numbers; "torch" keeps oneDNN in bf16 throughout."""
    import copy

    import torch

    from parley.pipeline.embed import kernel_path

    assert kernel_path("torch") is None
    plain = Embedder.load().in_precision("bf16", "torch")
    assert plain.linear_path == "torch" and plain.layers[0].qkv.weight.dtype == torch.bfloat16
    if kernel_path("avx2") is None:
        pytest.skip("no kernels.c float path on this CPU")
    fp32 = Embedder.load()
    half = Embedder.load().in_precision("bf16", "avx2")
    twin = copy.deepcopy(half)
    assert all(layer.kernel is None for layer in twin.layers)
    np.testing.assert_allclose(twin(TEXTS[:2], remember=False), fp32(TEXTS[:2], remember=False), atol=1e-5)
    layer = half.layers[3]
    assert layer.kernel.packs("up", layer.up)
    with torch.no_grad():
        layer.up.weight.mul_(0.0)  # written in place: the copy is stale, oneDNN reads the new weights
    assert not layer.kernel.packs("up", layer.up) and layer.kernel.packs("down", layer.down)
    x = torch.randn(1, 5, 384)
    with torch.no_grad():
        assert torch.equal(layer._project(x[0], "up"), torch.zeros(5, 1536) + layer.up.bias)
