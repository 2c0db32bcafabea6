"""Decoding over token ids: KV-cached, batched, streamed. Knows nothing about text.

    engine = Engine(model)
    for event in engine.stream([[1, 2, 3]], SamplingParams(max_tokens=16)):
        print(event.index, event.token, event.finish_reason)
    [completion] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=16))

Several prompts decode together in one batch: rows are left-padded, prefilled in one
forward pass, then advanced one token per step; a finished row leaves the batch so the
rest run smaller. Every row has its own sampler, so a row's tokens do not depend on
which other rows share its batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from parley.engine.fast import FastDecoder
from parley.engine.sampling import Sampler, SamplingParams
from parley.model.transformer import KVCache, Transformer


class PromptError(ValueError):
    """A prompt the model cannot take (empty, unknown ids, longer than the context)."""


@dataclass
class Event:
    """One step of one sequence: a new token, or the end (`finish_reason` "stop" or "length").
    A stop token ends the sequence without being emitted (token is None)."""

    index: int
    token: int | None
    finish_reason: str | None = None


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def params_per_prompt(prompts: Sequence, params: SamplingParams | Sequence[SamplingParams]) -> list[SamplingParams]:
    """One SamplingParams for every prompt: the same for all, or one each."""
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    return list(params)


class Engine:
    """Generates from a model. With `fast` (the default), decode steps run on the C kernels
    of engine/fast.py where the model and machine allow; prefill always uses the model's
    own forward."""

    def __init__(self, model: Transformer, fast: bool = True):
        self.model = model.eval()
        self.config = model.config
        self.device = model.lm_head.weight.device
        self.fast = FastDecoder.create(model) if fast else None
        # the fast path keeps its cache in fp32, or bf16 on the AMX tile path (engine/fast.py)
        self.cache_dtype = self.fast.kv_dtype if self.fast else model.lm_head.weight.dtype

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def check_prompt(self, prompt: Sequence[int]) -> None:
        if len(prompt) == 0:
            raise PromptError("the prompt is empty: give at least one token")
        if len(prompt) >= self.context_length:
            raise PromptError(f"the prompt is {len(prompt)} tokens but the model's context is "
                              f"{self.context_length} tokens: shorten the prompt or the history")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        out = [Completion() for _ in prompts]
        for e in self.stream(prompts, params):
            if e.token is not None:
                out[e.index].tokens.append(e.token)
            if e.finish_reason:
                out[e.index].finish_reason = e.finish_reason
        return out

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> Iterator[Event]:
        """Decode all prompts together, yielding each new token as soon as it is chosen."""
        params = params_per_prompt(prompts, params)
        if not prompts:
            return
        for p in prompts:
            self.check_prompt(p)
        # each row may generate until max_tokens or until its positions reach the context
        budgets = [min(sp.max_tokens, self.context_length - len(p)) for p, sp in zip(prompts, params)]
        longest = max(len(p) for p in prompts)
        cache = KVCache(self.config, len(prompts), longest + max(budgets), self.cache_dtype, self.device)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.as_tensor(p)
            mask[i, longest - len(p):] = True
        samplers = [Sampler(sp, self.device) for sp in params]
        penalized = any(sp.repetition_penalty != 1.0 for sp in params)
        contexts = [list(p) for p in prompts] if penalized else None
        generated = [0] * len(prompts)
        active = list(range(len(prompts)))  # original index of each cache row

        logits = self.model(ids.to(self.device), cache, token_mask=mask.to(self.device), last_only=True)
        while active:
            next_tokens, keep = [], []
            for row, i in enumerate(active):
                context = torch.as_tensor(contexts[i], device=self.device) if penalized else _EMPTY
                token = samplers[i](logits[row, -1], context)
                if token in params[i].stop_ids:
                    yield Event(i, None, "stop")
                    continue
                generated[i] += 1
                done = generated[i] >= budgets[i]
                yield Event(i, token, "length" if done else None)
                if not done:
                    next_tokens.append(token)
                    keep.append(row)
                    if penalized:
                        contexts[i].append(token)
            if not keep:
                return
            if len(keep) < len(active):
                cache.select(torch.as_tensor(keep, device=self.device))
                active = [active[row] for row in keep]
            step = torch.as_tensor(next_tokens, device=self.device)
            if self.fast:
                logits = self.fast.step(step, cache)[:, None]
            else:
                logits = self.model(step[:, None], cache, last_only=True)


_EMPTY = torch.zeros(0, dtype=torch.long)
