"""`parley train dpo`: direct preference optimisation on a pairs file (parley/train/preferences.py), with
LoRA adapters or every weight, against a frozen reference model.

    parley train dpo recipes/align-dpo.toml
    parley train dpo recipes/align-dpo.toml pairs=runs/cai/pairs.jsonl beta=0.2 lora.rank=0 run=runs/dpo-full

The loss is DPO's (parley.train.losses.dpo_loss). The reference log-probs are computed once per batch,
without gradients, by the model with its adapters switched off (LoRA: the base model is the reference,
no second copy in memory) or by a frozen copy made before training (full fine-tuning), as TRL's
DPOTrainer does. Each log step records the loss, the mean implicit rewards of chosen and rejected answers,
their margin and the accuracy (chosen reward above rejected); the held-out pairs (val_pairs, or every
tenth pair of the file) are measured before and after: DPO loss, reward accuracy, and how often the
policy itself gives the chosen answer the higher log-probability. Chosen and rejected answers go through
the model in one forward pass (TRL's concatenated forward).

Two regularisers keep DPO from drifting off what the model already does well: sft_coef adds the chosen
answers' mean per-token negative log-likelihood (RPO, Pang et al. 2024; TRL's rpo_alpha), so the policy
raises the chosen answer rather than only pushing the rejected one down; anchor.dialogs adds the KL to
the base on ordinary dialogs (parley/train/anchor.py).
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from parley.config import setting
from parley.model.lora import lora_state_dict, merge_lora
from parley.registry import Registry
from parley.train.anchor import AnchorConfig, adapters_off, anchored
from parley.train.loop import TrainConfig, resolve_device, train
from parley.train.losses import dpo_loss
from parley.train.preferences import PairDataset, load_pairs, sequence_logprobs
from parley.train.sft import LoRAConfig, add_adapters
from parley.train.stage import claim_run, finish, model_name, processes


@dataclass
class DPOConfig:
    pairs: str = setting(help="pairs JSONL file (parley/train/preferences.py), e.g. a constitutional run's pairs.jsonl")
    run: str = setting(help="run folder: config, metrics, plot, checkpoints (must be new unless resume)")
    val_pairs: str = setting("", "held-out pairs file ('' = every tenth pair of `pairs`, left out of training)")
    base: str = setting("smollm2", "registered model to start from (the reference is this model, frozen)")
    name: str = setting("", "register the result under this name ('' = the run folder's name)")
    resume: bool = setting(False, "continue the run in `run` from its newest checkpoint")
    beta: float = setting(0.1, "strength of the pull to the reference (DPO's beta): larger stays closer")
    sft_coef: float = setting(0.0, "weight of the chosen answers' per-token NLL added to the DPO loss (RPO; 0 = off)")
    reference: Literal["auto", "frozen", "adapters-off"] = setting(
        "auto", "auto: adapters-off with LoRA, a frozen copy without; frozen: always a copy")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if not self.beta > 0 or not self.sft_coef >= 0:
            raise ValueError(f"beta must be positive and sft_coef >= 0, got beta={self.beta}, sft_coef={self.sft_coef}")
        if self.reference == "adapters-off" and not self.lora.rank:
            raise ValueError("reference=adapters-off needs LoRA adapters (lora.rank > 0); use frozen or auto")


def make_loss(model, reference, beta: float, sft_coef: float = 0.0):
    """loss_fn(net, batch) for the loop: DPO on (chosen, rejected, chosen mask, rejected mask), plus sft_coef
    times the chosen answers' per-token NLL. `reference` is a frozen model, or None: `model` with its
    adapters off."""
    def loss_fn(net, batch):
        chosen, rejected, chosen_mask, rejected_mask = batch
        ids, mask, n = torch.cat([chosen, rejected]), torch.cat([chosen_mask, rejected_mask]), len(chosen)
        with torch.no_grad(), (adapters_off(model) if reference is None else nullcontext()):
            ref = sequence_logprobs(model if reference is None else reference, ids, mask)
        policy = sequence_logprobs(net, ids, mask)
        loss, metrics = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)
        gap = (policy[:n] - policy[n:]).detach()  # the model alone: chosen over rejected, log-probability
        metrics = {**metrics, "prefers_chosen": (gap > 0).float().mean(), "logp_margin": gap.mean()}
        if sft_coef:
            nll = -(policy[:n] / chosen_mask[:, 1:].sum(-1).clamp(min=1)).mean()
            loss, metrics = loss + sft_coef * nll, {**metrics, "chosen_nll": nll.detach()}
        return loss, metrics
    return loss_fn


@torch.no_grad()
def preference_metrics(model, loss_fn, data: PairDataset, batch_size: int, dtype: str = "float32") -> dict:
    """On every pair of `data`: DPO loss, reward accuracy, and how often the model alone gives the chosen
    answer more log-probability than the rejected one, and by how much on average (logp_margin); in
    bf16 autocast when `dtype` is bfloat16, as the loop's own evaluation."""
    was_training, device = model.training, next(model.parameters()).device
    sums = {"loss": 0.0, "accuracy": 0.0, "prefers_chosen": 0.0, "logp_margin": 0.0}
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        for batch in data.eval_batches(batch_size):
            batch = tuple(b.to(device) for b in batch)
            loss, metrics = loss_fn(model, batch)  # its metrics hold the model's own preference too
            n = len(batch[0])
            sums["loss"] += float(loss) * n
            for k in ("accuracy", "prefers_chosen", "logp_margin"):
                sums[k] += float(metrics[k]) * n
    model.train(was_training)
    return {k: v / len(data) for k, v in sums.items()}


def main(cfg: DPOConfig) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    model_name(cfg)
    pairs = load_pairs(cfg.pairs)  # a missing or malformed file fails before the (slow) model load
    cfg.anchor.check(cfg.lora.rank)
    if cfg.val_pairs:
        val_pairs = load_pairs(cfg.val_pairs)
    else:
        val_pairs = pairs[::10]
        pairs = [p for i, p in enumerate(pairs) if i % 10] or pairs
    model, tokenizer, _ = Registry().load(cfg.base, dtype=torch.float32)
    model.to(device)
    if t.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"train.seq_len {t.seq_len} is longer than {cfg.base}'s context "
                         f"({model.config.max_position_embeddings})")
    data, val = PairDataset(pairs, tokenizer, t.seq_len), PairDataset(val_pairs, tokenizer, t.seq_len)
    reference = None
    if cfg.reference == "frozen" or not cfg.lora.rank:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    params = add_adapters(model, cfg.lora, t.seed)
    loss_fn = make_loss(model, reference, cfg.beta, cfg.sft_coef)
    with processes(device):
        run = claim_run(cfg)
        main_process = int(os.environ.get("RANK", "0")) == 0
        if main_process:
            trainable = sum(p.numel() for p in (params or model.parameters()))
            print(f"{cfg.base}: {trainable / 1e6:.2f}M trainable parameters; {len(data)} training pairs "
                  f"({data.dropped} dropped: an answer cut off by seq_len), {len(val)} held out; "
                  f"reference: {'frozen copy' if reference is not None else 'the model with adapters off'}")

        def get_batch(step, micro, rank, world):
            return data.batch(step, micro, rank, world, t.batch_size, t.seed)

        def val_batches():
            return val.eval_batches(t.batch_size, t.eval_batches)

        before = preference_metrics(model, loss_fn, val, t.batch_size, t.dtype)
        get_batch, train_loss = anchored(get_batch, loss_fn, model, cfg.anchor, tokenizer, t.seed)
        final = train(model, t, run, get_batch, train_loss, eval_batches=val_batches, params=params,
                      resume=cfg.resume)
        after = preference_metrics(model, loss_fn, val, t.batch_size, t.dtype)
        final.update({f"val_{k}_before": v for k, v in before.items()})
        final.update({f"val_{k}_after": v for k, v in after.items()})
        if main_process:
            print("held-out pairs before -> after: " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}"
                                                                 for k in before))
        if cfg.lora.rank:
            if main_process:
                save_file(lora_state_dict(model), Path(run) / "adapter.safetensors")
            merge_lora(model)
        return finish(cfg, run, model, tokenizer, final, stage="dpo")


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(DPOConfig, sys.argv[1:], prog="parley train dpo"))
