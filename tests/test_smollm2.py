"""The default model end to end: SmolLM2-135M-Instruct from its GGUF, through our engine
(KV cache, fast decode path, batching) against transformers loading the same file, and
through `parley chat` with piped input."""

import copy

import pytest
import torch

from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of", "Le chat est sur"]


@pytest.fixture(scope="module")
def smol(smollm2_path, smollm2_ours, smollm2_hf):
    return smollm2_ours[0], smollm2_hf, Tokenizer.from_gguf(smollm2_path)


def test_engine_greedy_continuations_equal_transformers(smol):
    model, hf, tok = smol
    engine = Engine(model)  # fp32 weights: the fast path computes what transformers computes
    assert engine.fast is not None
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = [c.tokens for c in engine.generate(prompts, SamplingParams(max_tokens=16))]  # one padded batch
    for prompt, got in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                              pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        assert got == ref, (tok.decode(prompt), tok.decode(got), tok.decode(ref))


def test_bf16_engine_answers_in_chat_format(smol):
    model, _, tok = smol
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16))  # the shared fp32 model stays exact
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    [out] = engine.generate([ids], SamplingParams(max_tokens=30, stop_ids=tok.stop_ids))
    assert out.finish_reason == "stop" and "Paris" in tok.decode(out.tokens)
