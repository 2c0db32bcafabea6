"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=64)
    sampler = Sampler(params)
    token = sampler(logits_row, context_ids)        # one int

Each sequence gets its own `Sampler` (and so its own random generator), so a sequence
sampled with a seed gives the same tokens whether it runs alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    seed: int | None = None
    # requests share cached prompt pages only with requests of the same salt: a server gives each
    # user their own, so no one can tell by timing what another user's prompts began with
    cache_salt: str = ""
    # the LoRA adapter this request is served with (engine/adapters.py; "" = the base model alone)
    adapter: str = ""

    def __post_init__(self):
        self.stop_ids = frozenset(self.stop_ids)
        problems = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1 (got {self.max_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits.gather(-1, context)
    logits = logits.clone()
    logits.scatter_(-1, context, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest set with probability >= top_p to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (keeps at least one)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False  # the best token always stays, even when top_p rounds to 0
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Picks one token per call for one sequence."""

    def __init__(self, params: SamplingParams, device="cpu"):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> int:
        """logits: (vocab,) for the next position; context: 1-D ids seen so far."""
        p = self.params
        logits = apply_repetition_penalty(logits.float(), context, p.repetition_penalty)
        if p.greedy:
            return int(logits.argmax())
        logits = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
