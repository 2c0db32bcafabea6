"""A tiny registry for the alignment tests (reward model, RL, debate): the conftest's tiny model with
room for chat prompts, registered as "tiny" under a fresh PARLEY_HOME, and pairs a tiny model can learn."""

import dataclasses
import json

import torch

from parley.model.transformer import Transformer
from parley.registry import Registry


def make_home(tiny_hf_dir, home, context: int = 256) -> Registry:
    registry = Registry(home)
    registry.import_model(str(tiny_hf_dir), name="tiny-import")
    small, tokenizer, meta = registry.load("tiny-import")
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(small.config, max_position_embeddings=context))
    model.init_weights()  # small weights: near-uniform next-token distributions, so samples vary
    registry.save("tiny", model, tokenizer, {**meta, "name": "tiny"})
    return registry


GOOD = ["Paris is the capital of France.", "Hello there, the capital is Paris.", "France: Paris, today.",
        "The capital of France is Paris, hello.", "Paris. Hello!", "How are you? The capital is Paris."]
BAD = ["0123456789", "café 東京 🙂", "Numbers 987 and 654.", "東京 東京 café", "9 8 7 6 5", "unicode: 🙂 0 1"]


def write_pairs(path, start: int, count: int) -> str:
    """`count` pairs: a sentence about Paris chosen over digits and unicode, under varied questions."""
    with open(path, "w") as f:
        for i in range(start, start + count):
            prompt = [{"role": "user", "content": f"question {i}: how are you today?"}]
            f.write(json.dumps({"prompt": prompt, "chosen": GOOD[i % len(GOOD)], "rejected": BAD[(i * 5 + 1) % len(BAD)],
                                "principle": None, "source": "written", "labeler": "human"}) + "\n")
    return str(path)
