"""`parley train rl`: GRPO against the reward model plus the rails, held close to the base model by a
KL penalty (the distributional constraint).

    parley train rl recipes/rl-grpo.toml                                   # SmolLM2 + LoRA
    parley train rl recipes/rl-grpo.toml kl_coef=0.2 run=runs/rl-kl0.2 register=false

Each optimizer step takes train.batch_size prompts (a pure function of the step, as every stage's
batches are) and, inside the loss, (1) samples `group_size` answers per prompt from the current
policy with Parley's engine (its PyTorch path over the live weights, seeded by (seed, step, row), so
a resumed run samples what the uninterrupted one did), (2) scores each answer: the reward model's
score, minus `rails_penalty` when the rails' output check (parley/pipeline/safety.py check_output)
refuses it or it is empty, plus, with `refusal_reward` w > 0, +w when the answer declines exactly when
its prompt's label says it should (the line's "refuse", or a pair: declined where its chosen answer
declines, answered where only its rejected one does; `is_refusal`, the alignment benchmark's rule), 0
for a benign prompt's answer that dodges (`deflects`), -w otherwise (-over_refusal_cost instead for declining a
benign one, when set): a score of the answer in its context, which the rails' output check alone is not, (3)
normalises rewards within each prompt's group (GRPO's advantage, (r - mean) / (std + 1e-4); `scale_rewards=batch`
divides by the batch's std instead and `none` by nothing, as TRL's scale_rewards and Dr. GRPO: only then can
one kind of mistake cost more than another), (4) computes the reference model's per-token log-probs once for the
batch (the base model, frozen) and the policy's with gradients, and (5) returns

    loss = mean over answers of mean over their tokens of -(ratio * A - kl_coef * kl_t)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            # k3, Schulman's estimator, as TRL's GRPO

One policy update per batch of samples (TRL's default num_iterations=1), so the importance ratio is
exp(logp - logp.detach()) = 1 with the policy gradient as its gradient, and nothing needs clipping.
Logged per step: reward (mean of the total), reward_model, rails and refusal (the mean of each part:
rails is -rails_penalty times the share the rails refused), kl (nats per answer: the k3 terms summed over its tokens, the
"KL spent"), length (answer tokens), refusal_rate (answers that read as a refusal).
Departures from TRL: rewards are summed, not weighted, and the loss is GRPO's original per-answer
mean (TRL's default is DAPO's per-token mean). Single process only (no torchrun).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from parley.config import setting
from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.model.lora import merge_lora
from parley.model.tokenizer import Tokenizer
from parley.registry import Registry
from parley.train.align_data import deflects, is_refusal
from parley.train.data import _check_position, sample_ids
from parley.train.loop import TrainConfig, resolve_device, train
from parley.train.losses import grpo_loss
from parley.train.preferences import jsonl_rows, prompt_problem
from parley.train.rail_pairs import looks_like_refusal
from parley.train.sft import LoRAConfig, add_adapters
from parley.train.stage import claim_run, finish, model_name, processes

RewardFn = Callable[[list[list[dict]], list[str]], list[float]]  # (conversations, answers) -> one score each


def token_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t = 1 .. T-1 where `mask` ((batch, T-1) bool) is set, 0 elsewhere:
    (batch, T-1), fp32. The output layer runs on the masked positions alone (a prompt's positions would
    cost most of a GRPO batch's memory in full-vocabulary logits)."""
    logits = model(ids[:, :-1], select=mask).float()  # (N, vocab)
    picked = logits.gather(-1, ids[:, 1:][mask][:, None])[:, 0] - logits.logsumexp(-1)
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantage: each reward minus its group's mean, over (+1e-4) the group's std (`scale` "group",
    GRPO's), the whole batch's (`"batch"`) or nothing (`"none"`, Dr. GRPO's): TRL's scale_rewards. Divided by
    its own group's std, every group's advantages have the same size whatever its rewards were, so a reward
    that costs one mistake more than another changes nothing; with the batch's, or none, it does."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be a flat tensor of whole groups of {group_size}, got {tuple(rewards.shape)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        return (centred / (groups.std(1, keepdim=True, unbiased=False) + 1e-4)).flatten()
    return (centred / (rewards.std(unbiased=False) + 1e-4)).flatten() if scale == "batch" else centred.flatten()


def rails_reward(penalty: float) -> RewardFn:
    """-penalty for an answer the rails' output check refuses, or an empty one; 0 otherwise."""
    from parley.pipeline.safety import check_output, load_constitution

    constitution = load_constitution()

    def score(prompts, answers):
        return [-penalty if not a.strip() or check_output(a, constitution).action == "refuse" else 0.0 for a in answers]

    return score


def reward_model_reward(name: str) -> RewardFn:
    from parley.train.reward import load_reward_model

    rm = load_reward_model(name)

    def score(prompts, answers):  # an empty answer gets no score from the model: the rails penalise it
        return [s if a.strip() else 0.0 for s, a in zip(rm.score_many(prompts, [a or "." for a in answers]), answers)]

    return score


def _key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True)


def read_prompts(path) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a prompts file, its "prompt" checked as a pair's is; a
    ValueError names the file and the line. Read before the model loads, so a bad file fails at once."""
    rows = []
    for lineno, row in jsonl_rows(path, "prompts"):
        problem = prompt_problem(row.get("prompt")) if isinstance(row, dict) else "not a JSON object"
        if problem:
            raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": [messages ending with a user message]}}: "
                             f"{problem}")
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"prompts file {path} is empty")
    return rows


def refusal_labels(path) -> dict[str, bool]:
    """Whether each prompt of a prompts file should be declined: its line's "refuse" (true or false), or,
    for a pair, true where the chosen answer declines, false where only the rejected one does."""
    labels = {}
    for lineno, row in read_prompts(path):
        key = _key(row["prompt"])
        refuse = row.get("refuse")
        if refuse is None and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            refuse = True if is_refusal(row["chosen"]) else False if is_refusal(row["rejected"]) else None
        if not isinstance(refuse, bool):
            raise ValueError(f"{path}:{lineno}: refusal_reward needs to know whether this prompt should be declined: "
                             'give the line "refuse": true or false, or a chosen and a rejected answer of which '
                             "one declines")
        if labels.setdefault(key, refuse) != refuse:
            raise ValueError(f"{path}:{lineno}: this prompt is labelled both to be declined and to be answered")
    return labels


def refusal_reward(path, weight: float, over_refusal: float | None = None) -> RewardFn:
    """+weight for an answer that declines exactly when its prompt should be declined (refusal_labels),
    0 for a dodge of a prompt that should be answered, -over_refusal for declining a prompt that should
    be answered (None: -weight), -weight for answering one that should be declined."""
    labels = refusal_labels(path)
    cost = weight if over_refusal is None else over_refusal

    def score(prompts, answers):
        out = []
        for prompt, answer in zip(prompts, answers):
            refuse, refused = labels[_key(prompt)], is_refusal(answer)
            dodge = not refuse and not refused and deflects(answer, prompt[-1]["content"])
            out.append(0.0 if dodge else weight if refused == refuse else -cost if refused else -weight)
        return out

    return score


class Prompts:
    """The conversations of a JSONL file (each line's "prompt": messages ending with a user message;
    a pairs file qualifies), tokenized for generation; duplicates kept once, longer ones dropped."""

    def __init__(self, path, tokenizer: Tokenizer, max_prompt_tokens: int):
        path = Path(path)
        self.messages, self.ids, self.dropped, seen = [], [], 0, set()
        for _, row in read_prompts(path):
            prompt = row["prompt"]
            key = _key(prompt)
            if key in seen:
                continue
            seen.add(key)
            ids = tokenizer.encode_chat(prompt, add_generation_prompt=True)
            if len(ids) > max_prompt_tokens:
                self.dropped += 1
                continue
            self.messages.append(prompt)
            self.ids.append(ids)
        if not self.ids:
            raise ValueError(f"{path} holds no prompt of at most {max_prompt_tokens} tokens")

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, step: int, batch_size: int, seed: int) -> list[int]:
        start = _check_position(step, 0, 0, 1, batch_size, seed)
        return [int(i) for i in sample_ids(seed, step, start, batch_size, len(self))]


@dataclass
class GRPO:
    """What the loss needs besides the policy: prompts, rewards, the frozen reference, sampling."""

    prompts: Prompts
    tokenizer: Tokenizer
    rewards: list[RewardFn]
    reference: nn.Module
    kl_coef: float
    group_size: int
    max_new_tokens: int
    temperature: float
    seed: int
    scale_rewards: str = "group"

    def sample(self, policy: nn.Module, step: int, rows: list[int]) -> list[list[int]]:
        """group_size answers for each prompt from the live policy, seeded by (seed, step, answer)."""
        was = policy.training
        tokens = (len(max(self.prompts.ids, key=len)) + self.max_new_tokens) * len(rows) * self.group_size
        cfg = policy.config
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
        engine = Engine(policy, kernels="torch", max_batch=len(rows) * self.group_size,
                        kv_budget_bytes=2 * tokens * per_token + 2**20)
        prompts = [self.prompts.ids[r] for r in rows for _ in range(self.group_size)]
        params = [SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature,
                                 stop_ids=self.tokenizer.stop_ids,
                                 seed=hash((self.seed, step, i)) % 2**63) for i in range(len(prompts))]
        end = next(i for i in (self.tokenizer.eot_id, self.tokenizer.eos_id, *sorted(self.tokenizer.stop_ids))
                   if i is not None)
        with torch.no_grad():
            done = engine.generate(prompts, params)
        engine.close()
        policy.train(was)
        # the engine does not report the stop token it sampled: the end-of-turn token stands for it
        return [c.tokens + ([end] if c.finish_reason == "stop" else []) for c in done]

    def __call__(self, policy: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        step, rows = batch
        answers = self.sample(policy, step, rows)
        texts = [self.tokenizer.decode(a).strip() for a in answers]
        conversations = [self.prompts.messages[r] for r in rows for _ in range(self.group_size)]
        parts = [torch.tensor(fn(conversations, texts), dtype=torch.float32) for fn in self.rewards]
        rewards = torch.stack(parts).sum(0)
        prompts = [self.prompts.ids[r] for r in rows for _ in range(self.group_size)]
        width = max(len(p) + max(len(a), 1) for p, a in zip(prompts, answers))
        device = next(policy.parameters()).device
        ids = torch.full((len(answers), width), self.tokenizer.pad_id or 0, dtype=torch.long)
        mask = torch.zeros((len(answers), width - 1), dtype=torch.bool)  # over token_logprobs' positions
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, len(p) - 1:len(p) + len(a) - 1] = True
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():  # the reference's log-probs: once per batch, never trained
            ref = token_logprobs(self.reference, ids, mask)
        logps = token_logprobs(policy, ids, mask)
        advantages = group_advantages(rewards, self.group_size, self.scale_rewards).to(device)
        loss, kl = grpo_loss(logps, ref, advantages, mask, self.kl_coef)
        metrics = {"reward": rewards.mean(), "kl": kl.mean(), "length": float(sum(map(len, answers)) / len(answers)),
                   "refusal_rate": sum(map(looks_like_refusal, texts)) / len(texts)}
        for i, (fn, part) in enumerate(zip(self.rewards, parts)):
            metrics[getattr(fn, "metric", f"reward_{i}")] = part.mean()
        return loss, metrics


def build(policy: nn.Module, tokenizer: Tokenizer, prompts: Prompts, rewards: list[RewardFn], cfg) -> GRPO:
    """The loss for `policy` (copied, before any adapter, as the frozen reference)."""
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return GRPO(prompts, tokenizer, rewards, reference, cfg.kl_coef, cfg.group_size, cfg.max_new_tokens,
                cfg.temperature, cfg.train.seed, cfg.scale_rewards)


@dataclass
class RLConfig:
    prompts: str = setting(help="JSONL of {\"prompt\": [messages]} a line (a pairs file qualifies): what the policy answers")
    run: str = setting(help="run folder: config, metrics, plot, checkpoints (must be new unless resume)")
    base: str = setting("smollm2", "registered model to start from; also the frozen reference of the KL penalty")
    reward_model: str = setting("", "registered reward model (parley train reward) ('' = the rails alone)")
    rails_penalty: float = setting(1.0, "subtracted from the reward of an answer the rails refuse, or an empty one")
    refusal_reward: float = setting(0.0, "+this when an answer declines exactly when its prompt's label says "
                                         "(\"refuse\", or the pair's chosen answer), -this otherwise (0 = off)")
    over_refusal_cost: float = setting(0.0, "with refusal_reward: -this instead for declining a prompt that should be "
                                            "answered (0 = -refusal_reward)")
    scale_rewards: Literal["group", "batch", "none"] = setting(
        "group", "advantages divided by the std of each group (GRPO), of the whole batch, or nothing (Dr. GRPO)")
    kl_coef: float = setting(0.05, "weight of the KL penalty to the reference (0 = unconstrained)")
    group_size: int = setting(4, "answers sampled per prompt (GRPO's group)")
    max_new_tokens: int = setting(32, "longest sampled answer")
    temperature: float = setting(1.0, "sampling temperature of the answers")
    name: str = setting("", "register the policy under this name ('' = the run folder's name)")
    register: bool = setting(True, "register the trained policy as a chat model (off for sweeps)")
    resume: bool = setting(False, "continue the run in `run` from its newest checkpoint")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be at least 2 (advantages compare answers within a group), "
                             f"got {self.group_size}")
        if not (self.kl_coef >= 0 and self.rails_penalty >= 0 and self.refusal_reward >= 0 and self.temperature > 0
                and self.max_new_tokens >= 1 and self.over_refusal_cost >= 0):
            raise ValueError("kl_coef, rails_penalty, over_refusal_cost and refusal_reward must be >= 0, temperature > 0 "
                             "and max_new_tokens >= 1")
        if self.over_refusal_cost and not self.refusal_reward:
            raise ValueError("over_refusal_cost applies to refusal_reward: set refusal_reward too")


def run_rl(cfg: RLConfig, policy: nn.Module, tokenizer: Tokenizer, rewards: list[RewardFn]) -> tuple[dict, Path]:
    """Train `policy` in place (LoRA per cfg.lora) with GRPO; the library entry the tests use with a toy reward."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("parley train rl runs in one process: start it without torchrun")
    t = cfg.train
    device = resolve_device(t.device)
    prompts = Prompts(cfg.prompts, tokenizer, t.seq_len - cfg.max_new_tokens)
    loss_fn = build(policy, tokenizer, prompts, rewards, cfg)
    params = add_adapters(policy, cfg.lora, t.seed)
    policy.to(device)
    loss_fn.reference.to(device)
    with processes(device):
        run = claim_run(cfg)
        print(f"{cfg.base}: {len(prompts)} prompts ({prompts.dropped} too long), {cfg.group_size} answers each, "
              f"kl_coef {cfg.kl_coef}")
        final = train(policy, t, run, lambda step, micro, rank, world: (step, prompts.batch(step, t.batch_size, t.seed)),
                      loss_fn, params=params, resume=cfg.resume)
    if cfg.lora.rank:
        merge_lora(policy)
    return final, run


def main(cfg: RLConfig) -> dict:
    resolve_device(cfg.train.device)
    if cfg.register:
        model_name(cfg)
    read_prompts(cfg.prompts)  # a missing or malformed file fails before the (slow) model loads
    rewards = [rails_reward(cfg.rails_penalty)]
    rewards[0].metric = "rails"
    if cfg.reward_model:
        rewards.insert(0, reward_model_reward(cfg.reward_model))
        rewards[0].metric = "reward_model"
    if cfg.refusal_reward:
        rewards.append(refusal_reward(cfg.prompts, cfg.refusal_reward, cfg.over_refusal_cost or None))
        rewards[-1].metric = "refusal"
    policy, tokenizer, _ = Registry().load(cfg.base, dtype=torch.float32)
    final, run = run_rl(cfg, policy, tokenizer, rewards)
    return finish(cfg, run, policy, tokenizer, final, stage="rl") if cfg.register else final


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(RLConfig, sys.argv[1:], prog="parley train rl"))
