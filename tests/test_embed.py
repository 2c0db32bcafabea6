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
