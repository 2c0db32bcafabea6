"""The guard's second design (issue 16): the language model with LoRA adapters and a linear head on the last
token, trained and calibrated like the other designs; the pipeline refuses its file with a clear error."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from parley.pipeline.guard import PRINCIPLES, Guard, GuardError
from parley.registry import Registry
from parley.train.guard import GuardTrainConfig, lora_ids, lora_states, main as train_main
from parley.train.guard_data import GuardDataError
from tests.test_guard_encoder import _tiny_data


@pytest.fixture
def tiny_home(tiny_hf_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    Registry(home).import_model(str(tiny_hf_dir), name="tiny")
    monkeypatch.setenv("PARLEY_HOME", str(home))
    return home


def test_the_states_are_what_the_output_layer_reads(tiny_home):
    model, tokenizer, _ = Registry(tiny_home).load("tiny", dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("the states under the output layer")])
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model.states(ids)), model(ids), atol=1e-5)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model.states(torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long))


def test_a_text_in_a_padded_batch_reads_as_it_does_alone(tiny_home):
    model, tokenizer, _ = Registry(tiny_home).load("tiny", dtype=torch.float32)
    texts = ["short", "a much longer text that the batch is padded to, with a few more words in it"]
    ids = lora_ids(tokenizer, texts)
    assert ids[0][-len(tokenizer.encode("\nVerdict:")):] == tokenizer.encode("\nVerdict:")
    with torch.no_grad():
        together = lora_states(model, ids)
        alone = torch.cat([lora_states(model, [i]) for i in ids])
    assert torch.allclose(together, alone, atol=1e-5)
    long = lora_ids(tokenizer, ["word " * 500])[0]
    assert len(long) == 64 + len(tokenizer.encode("\nVerdict:"))  # cut before the suffix, which stays


def test_a_tiny_lora_design_trains_calibrates_saves_and_the_pipeline_refuses_its_file(tiny_home, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _tiny_data(data)
    out = tmp_path / "lora.safetensors"
    cfg = GuardTrainConfig(data=str(data), out=str(out), design="lora", lora_model="tiny", lora_examples=0,
                           lora_batch=8, lora_lr=1e-3, per_example=1, lora_device="cpu")
    assert train_main(cfg) == 0
    printed = capsys.readouterr().out
    assert "calibration fold: harmful recall" in printed and "unseen written: harmful recall" in printed
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["format"] == "parley-guard-lora-1" and f.metadata()["model"] == "tiny"
        names = set(f.keys())
        adapters = [f.get_tensor(k) for k in names if k.endswith("lora_B")]
        thresholds = f.get_tensor("thresholds")
    assert {"head.weight", "head.bias", "thresholds"} <= names
    assert adapters and any(b.abs().max() > 0 for b in adapters)  # lora_B starts at zero: it was trained
    assert thresholds.shape == (len(PRINCIPLES) + 1,)
    with pytest.raises(GuardError, match="LoRA design"):
        Guard.load(out, lambda texts: None)


@pytest.mark.parametrize("setting", [{"lora_batch": 0}, {"lora_rank": 0}, {"lora_lr": 0.0}, {"lora_examples": -1},
                                     {"lora_eval_every": 0}, {"lora_device": "tpu"},
                                     *([{"lora_device": "cuda"}] if not torch.cuda.is_available() else [])])
def test_the_lora_design_rejects_bad_settings(setting):
    with pytest.raises(GuardDataError, match="design=lora"):
        train_main(GuardTrainConfig(design="lora", **setting))
