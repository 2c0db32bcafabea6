"""Our wav2vec 2.0 against transformers' Wav2Vec2ForCTC on random weights of several shapes: the
same logits (fp32, within 1e-4) and the same greedy CTC text, through the folder an HF model saves."""

import json

import numpy as np
import pytest
import torch

from parley.voice.asr import ASRError, load_asr
from parley.voice.audio import Clip, resample
from parley.voice.wav2vec2 import Wav2Vec2Config, Wav2Vec2Error, load_folder

transformers = pytest.importorskip("transformers")

CHARS = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list("ETAONISHRDLUCMWFGYPBVKJXQZ'")

SHAPES = {  # base-like (group norm, post-norm), large-like (layer norm, pre-norm), odd kernels and groups
    "base": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4, feat_extract_norm="group", do_stable_layer_norm=False),
    "large": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=96,
                  conv_dim=(24, 32, 32, 32), conv_stride=(5, 2, 2, 2), conv_kernel=(10, 3, 3, 2), conv_bias=True,
                  num_conv_pos_embeddings=15, num_conv_pos_embedding_groups=3, feat_extract_norm="layer",
                  do_stable_layer_norm=True),
    "narrow": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                   conv_dim=(8, 12), conv_stride=(4, 4), conv_kernel=(8, 4), num_conv_pos_embeddings=6,
                   num_conv_pos_embedding_groups=2, hidden_act="gelu_new", feat_extract_activation="relu"),
}


def save_hf(folder, shape: dict, rate=16_000, normalize=True, seed=0):
    """A random-init Wav2Vec2ForCTC with its tokenizer and feature extractor, saved as HF does."""
    torch.manual_seed(seed)
    config = transformers.Wav2Vec2Config(vocab_size=len(CHARS), pad_token_id=0, **shape)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():  # larger random weights, so the argmax moves from frame to frame
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(CHARS)}))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    extractor = transformers.Wav2Vec2FeatureExtractor(sampling_rate=rate, do_normalize=normalize,
                                                      return_attention_mask=False)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return model, transformers.Wav2Vec2Processor.from_pretrained(folder)


def speechlike(seconds=1.0, rate=16_000, seed=1):
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * g.standard_normal(len(t))
    return Clip(x.astype(np.float32), rate)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_greedy_text_equal_transformers(shape, tmp_path):
    hf, processor = save_hf(tmp_path, SHAPES[shape])
    ours = load_asr(str(tmp_path))
    clip = speechlike()
    inputs = processor(clip.samples, sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        expected = hf(inputs.input_values).logits[0]
    got = ours.logits(clip)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    ids = expected.argmax(-1)
    text = processor.batch_decode(ids[None])[0]
    assert len(set(ids.tolist())) > 3 and text  # the test means something: several characters
    assert ours.transcribe(clip).text == text


def test_the_feature_extractors_rate_and_normalisation_are_honoured(tmp_path):
    hf, processor = save_hf(tmp_path, SHAPES["base"], rate=8_000, normalize=False)
    ours = load_asr(str(tmp_path))
    clip = speechlike(rate=16_000)  # what load_audio gives: the model wants 8 kHz, unnormalised
    at8k = resample(clip.samples, 16_000, 8_000)
    with torch.no_grad():
        expected = hf(processor(at8k, sampling_rate=8_000, return_tensors="pt").input_values).logits[0]
    assert ours.rate == 8_000 and not ours.normalize
    assert torch.allclose(ours.logits(clip), expected, atol=1e-4, rtol=0)


def test_old_weight_norm_names_bin_weights_and_preprocessor_config_load(tmp_path):
    hf, processor = save_hf(tmp_path, SHAPES["large"])
    state = {k.replace("parametrizations.weight.original0", "weight_g")
             .replace("parametrizations.weight.original1", "weight_v"): v for k, v in hf.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "processor_config.json").unlink()  # the older layout: the extractor's own file
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16_000, do_normalize=True).save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    clip = speechlike(0.5)
    with torch.no_grad():
        expected = hf(processor(clip.samples, sampling_rate=16_000, return_tensors="pt").input_values).logits[0]
    assert torch.allclose(load_asr(str(tmp_path)).logits(clip), expected, atol=1e-4, rtol=0)
    bf16 = load_asr(str(tmp_path), dtype="bfloat16").logits(clip)
    assert (bf16.argmax(-1) == expected.argmax(-1)).float().mean() > 0.5  # close, not equal: float32 is


def test_folders_that_do_not_fit_are_clear_errors(tmp_path):
    with pytest.raises(ASRError, match="no speech model"):
        load_asr(str(tmp_path / "missing"))
    with pytest.raises(ASRError, match="not a Wav2Vec2ForCTC folder"):
        load_asr(str(tmp_path))
    save_hf(tmp_path, SHAPES["narrow"])
    with pytest.raises(ASRError, match="dtype"):
        load_asr(str(tmp_path), dtype="int4")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ASRError, match="do not fit"):
        load_asr(str(tmp_path))
    with pytest.raises(Wav2Vec2Error, match="adapters"):
        Wav2Vec2Config.from_hf({**config, "add_adapter": True})
    with pytest.raises(ASRError, match="shorter"):
        (tmp_path / "config.json").write_text(json.dumps(config))
        load_asr(str(tmp_path)).logits(Clip(np.ones(4, np.float32), 16_000))
    assert load_folder(tmp_path)[1].decode([5, 5, 0, 5, 4, 6, 6, 0]) == "EE T"
