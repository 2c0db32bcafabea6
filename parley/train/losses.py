"""Training objectives: small pure functions of logits and targets. The loop picks one through
a `loss_fn(model, batch) -> (loss, metrics)`; `lm_loss` is that function for next-token
training (pretraining and SFT).

    loss = next_token_loss(logits, targets)              # every position
    loss = sft_loss(logits, targets, loss_mask)          # assistant tokens only
    train(model, cfg, run_dir, get_batch, lm_loss)       # batch = (inputs, targets[, mask])

`targets[b, t]` is the token that should follow `inputs[b, t]`: the data module shifts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parley.model.transformer import ModelConfig, load_balancing_loss


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the positions where `mask` is True (all when None).
    Softmax in fp32: bf16 logits lose too much in the log-sum-exp."""
    logits, targets = logits.flatten(0, -2), targets.flatten()
    if mask is None:
        return F.cross_entropy(logits.float(), targets)
    mask = mask.flatten()
    # a sum over no positions is 0 with a gradient: a batch without targets still runs backward,
    # which DDP needs from every rank
    total = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
    return total / mask.sum().clamp(min=1)


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Dialog fine-tuning: next-token loss on the tokens the model should learn to say."""
    return next_token_loss(logits, targets, loss_mask)


def router_loss(router_logits: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Load-balancing loss of a mixture-of-experts model, weighted by its coefficient."""
    aux = load_balancing_loss(router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
    return aux * cfg.router_aux_loss_coef


def _config(model) -> ModelConfig:
    while not hasattr(model, "config"):  # through DDP (.module) and torch.compile (._orig_mod)
        model = getattr(model, "module", None) or model._orig_mod
    return model.config


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """loss_fn for the loop: batch = (inputs, targets) or (inputs, targets, loss_mask).
    A mixture-of-experts model adds its router loss; metrics report both parts."""
    inputs, targets, *mask = batch
    cfg = _config(model)
    if not cfg.is_moe:
        loss = next_token_loss(model(inputs), targets, *mask)
        return loss, {}
    logits, router_logits = model(inputs, return_router_logits=True)
    ce, aux = next_token_loss(logits, targets, *mask), router_loss(router_logits, cfg)
    return ce + aux, {"ce": ce.detach(), "router": aux.detach()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7; TRL's sigmoid loss): the answers'
    summed log-probs (batch,) under the policy and the frozen reference. The implicit reward of an answer
    is beta * (policy - reference); the loss is -log sigmoid(reward chosen - reward rejected). Metrics: the
    mean rewards, their margin and how often the chosen answer's reward is the higher (accuracy)."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, {"reward_chosen": chosen.detach().mean(), "reward_rejected": rejected.detach().mean(),
                  "margin": (chosen - rejected).detach().mean(), "accuracy": (chosen > rejected).float().mean()}


def kl_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, per position where `mask` is True, averaged
    over those positions (distillation at temperature 1; the anchor of parley/train/anchor.py). Softmax
    in fp32; 0 with a gradient when no position is masked in."""
    mask = mask.flatten()
    logp = logits.flatten(0, -2)[mask].float().log_softmax(-1)
    teacher = teacher_logits.flatten(0, -2)[mask].float().log_softmax(-1)
    total = (teacher.exp() * (teacher - logp)).sum()
    return total / mask.sum().clamp(min=1)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Reward model (Bradley-Terry): the negative log-probability that chosen beats rejected,
    -log sigmoid(score chosen - score rejected), over scores (batch,)."""
    return -F.logsigmoid(chosen - rejected).mean()


def grpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO with a KL penalty: (loss, KL per answer) from per-token log-probs (answers, T) under the
    policy and the frozen reference, one advantage per answer, and the mask of answer tokens.
    Per token -(ratio * A - kl_coef * kl), ratio = exp(logp - logp.detach()) (one update per batch of
    samples), kl = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator, as TRL's GRPO); the mean over
    each answer's tokens, then over answers (GRPO's original normalisation)."""
    if not (logps.shape == ref_logps.shape == mask.shape) or advantages.shape != logps.shape[:1]:
        raise ValueError(f"shapes do not fit: logps {tuple(logps.shape)}, ref {tuple(ref_logps.shape)}, "
                         f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}")
    delta = ref_logps - logps
    kl = (torch.exp(delta) - delta - 1) * mask
    per_token = -(torch.exp(logps - logps.detach()) * advantages[:, None]) + kl_coef * kl
    tokens = mask.sum(1).clamp(min=1)
    return ((per_token * mask).sum(1) / tokens).mean(), kl.sum(1).detach()


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, frames: torch.Tensor, target_lengths: torch.Tensor,
             blank: int = 0) -> torch.Tensor:
    """Connectionist temporal classification (speech recognition): logits (batch, frames, vocab),
    the targets of all rows concatenated, each row's valid frames and target length. Per character
    and averaged over rows, as HF's ctc_loss_reduction="mean"; an alignment that cannot exist (a
    target longer than its frames) counts 0 instead of infinity. Softmax in fp32."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (frames, batch, vocab), as torch wants
    return F.ctc_loss(log_probs, targets, frames, target_lengths, blank=blank, reduction="mean", zero_infinity=True)
