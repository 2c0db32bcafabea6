"""Hold a LoRA-trained model to its base on ordinary dialog while it learns something narrow (refusals,
preferences): each step adds coef * KL(base || model), per assistant token of a batch of ordinary
conversations, to the stage's own loss. The base is the same model with its adapters switched off, so
no second copy is kept. This is self-distillation on teacher-forced text (the base's whole next-token
distribution is the target, not its sampled answers), the constraint TRL's and OpenRLHF's PPO put on the
sampled answers, moved onto the dialogs whose loss must not rise.

    anchor = AnchorConfig(dialogs="runs/corpus/dialogs-train.jsonl", coef=1.0)
    get_batch, loss_fn = anchored(get_batch, loss_fn, model, anchor, tokenizer, seed)

A batch is then {"task": the stage's batch, "anchor": (inputs, targets, mask)}; a plain batch (the
validation batches) gets the stage's loss alone, so validation losses stay comparable across runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from parley.config import setting
from parley.model.lora import LoRALinear
from parley.train.data import ChatDataset
from parley.train.losses import kl_loss


@dataclass
class AnchorConfig:
    dialogs: str = setting("", "ordinary conversations (JSONL with messages, e.g. the train split of `parley data "
                               "prepare`) on which the model is held to its base ('' = no anchor)")
    coef: float = setting(1.0, "weight of KL(base || model) on those dialogs' assistant tokens")
    batch_size: int = setting(4, "dialogs per micro-step")
    seq_len: int = setting(128, "tokens of each dialog (from its start; most are long, multi-turn)")

    def __post_init__(self):
        if not self.coef >= 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"anchor.coef must be >= 0, anchor.batch_size >= 1 and anchor.seq_len >= 2; got "
                             f"coef={self.coef}, batch_size={self.batch_size}, seq_len={self.seq_len}")

    def check(self, lora_rank: int) -> None:
        """Before the model loads: the file exists, and the base can be had (adapters to switch off)."""
        if not self.dialogs:
            return
        if not Path(self.dialogs).is_file():
            raise FileNotFoundError(f"anchor.dialogs {self.dialogs} not found (e.g. run `parley data prepare "
                                    f"runs/corpus sources=chitchat` and pass runs/corpus/dialogs-train.jsonl)")
        if not lora_rank:
            raise ValueError("anchor.dialogs needs LoRA adapters (lora.rank > 0): the base is the model with its "
                             "adapters off")


@contextmanager
def adapters_off(model):
    """The model without its LoRA adapters' contribution, for the duration of the block."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def anchored(get_batch, loss_fn, model, anchor: AnchorConfig, tokenizer, seed: int):
    """(get_batch, loss_fn) for the loop with the anchor added; the arguments unchanged when it is off."""
    if not anchor.dialogs or not anchor.coef:
        return get_batch, loss_fn
    dialogs = ChatDataset(anchor.dialogs, tokenizer, anchor.seq_len)

    def batch(step, micro, rank, world):
        return {"task": get_batch(step, micro, rank, world),
                "anchor": dialogs.batch(step, micro, rank, world, anchor.batch_size, seed + 1)}

    def loss(net, batch):
        if not isinstance(batch, dict):
            return loss_fn(net, batch)
        task, metrics = loss_fn(net, batch["task"])
        inputs, _, mask = batch["anchor"]
        with torch.no_grad(), adapters_off(model):
            base = model(inputs)
        kl = kl_loss(net(inputs), base, mask)
        return task + anchor.coef * kl, {**metrics, "task": task.detach(), "anchor_kl": kl.detach()}
    return batch, loss
