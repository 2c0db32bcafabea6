"""Shared fixtures: an offline environment, a tiny real model folder, and the SmolLM2 GGUF."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers must never reach for a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch


def _flushing_denormals() -> bool:
    """Whether this thread's CPU flushes subnormal floats to zero (torch.set_flush_denormal)."""
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@pytest.fixture(autouse=True)
def denormals_as_found():
    """A test that runs a front end in-process (`parley.cli.main`, which turns flushing of
    subnormal floats on for CPU speed) leaves the process as it found it: Hypothesis, and the
    tests of tiny sampling values, need subnormals."""
    before = _flushing_denormals()
    yield
    if _flushing_denormals() != before:
        torch.set_flush_denormal(before)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, and are then immune to busy neighbours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from parley.registry import smollm2_gguf

    try:
        return smollm2_gguf(install=False)
    except FileNotFoundError as e:
        pytest.skip(f"{e} (make setup installs it)")


# The SmolLM2 GGUF takes seconds to load each way: every test module shares one copy of each.
# They are fp32 references: never change them in place (copy first, e.g. for bf16).

@pytest.fixture(scope="session")
def smollm2_ours(smollm2_path):
    """(model, GGUF metadata) as parley.model.weights.load_gguf gives them."""
    from parley.model.weights import load_gguf

    return load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name).eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


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


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_hf_dir, tmp_path_factory):
    """(model, tokenizer): the tiny model's config and tokenizer with room for a real chat
    prompt (the HF folder's has 96 positions; a system prompt alone is longer), random weights."""
    import dataclasses

    from parley.model.transformer import Transformer
    from parley.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("tiny-chat-home"))
    registry.import_model(str(tiny_hf_dir), name="tiny")
    small, tokenizer, _ = registry.load("tiny")
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(small.config, max_position_embeddings=4096)).eval(), tokenizer


@pytest.fixture(scope="session")
def embedder():
    """The real sentence-embedding model, loaded once for every test that needs it."""
    from parley.pipeline.embed import Embedder

    return Embedder.load()


@pytest.fixture(scope="session")
def tiny768_registry(tiny_hf_dir, tmp_path_factory):
    """A registry holding "tiny768": the tiny model's tokenizer and shape with a 768-token context
    (room for the assistant's prompt) and larger random weights, so answers differ from prompt to
    prompt (a mix-up between concurrent streams shows). Servers in tests serve it."""
    import dataclasses

    from parley.model.transformer import Transformer
    from parley.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("tiny768-home"))
    registry.import_model(str(tiny_hf_dir), name="tiny")
    small, tokenizer, meta = registry.load("tiny")
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(small.config, max_position_embeddings=768)).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.5)
    registry.save("tiny768", model, tokenizer, {**meta, "name": "tiny768"})
    return registry


@pytest.fixture(scope="module")
def tiny768_own_home(tiny768_registry, tmp_path_factory) -> Path:
    """A copy of tiny768_registry's home, for a module whose requests may change the registry: an admin's fuzzed
    `/api/learn/promote` made "tiny768" a versioned model for every later test of the session."""
    import shutil

    home = tmp_path_factory.mktemp("tiny768-own-home")
    shutil.copytree(tiny768_registry.home / "models", home / "models", symlinks=True)
    return home


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (.ci/run does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
