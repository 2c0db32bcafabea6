"""`parley train sft`: dialog fine-tuning, loss on the assistant's tokens only; the whole
model or LoRA adapters, starting from any registered model (ours or imported).

    parley train sft recipes/sft-chitchat.toml                       # SmolLM2 on chitchat, LoRA
    parley train sft recipes/sft-chitchat.toml lora.rank=0 run=runs/sft-full name=smollm2-chat-full
    parley train sft recipes/align-sft-answers.toml          # narrow SFT held to its base (anchor.dialogs)

The validation loss is measured before the first step and after the last, so the run
shows what fine-tuning changed. With LoRA the adapters are saved in the run folder
(adapter.safetensors) and merged into the registered model. With LoRA, `anchor.dialogs` holds the
model to its base on ordinary conversations while it learns narrow data (parley/train/anchor.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from parley.config import setting
from parley.model.lora import DEFAULT_TARGETS, apply_lora, lora_state_dict, merge_lora
from parley.registry import Registry
from parley.train.anchor import AnchorConfig, anchored
from parley.train.data import ChatDataset
from parley.train.loop import TrainConfig, evaluate, resolve_device, train
from parley.train.losses import lm_loss
from parley.train.stage import claim_run, finish, model_name, processes


@dataclass
class LoRAConfig:
    rank: int = setting(8, "adapter rank; 0 fine-tunes every weight instead")
    alpha: float = setting(16.0, "adapter scale numerator (scale = alpha / rank)")
    dropout: float = setting(0.0, "dropout on the adapter input")
    targets: list[str] = setting(factory=lambda: list(DEFAULT_TARGETS), help="linear layers that get adapters")

    def __post_init__(self):
        if self.rank < 0 or not self.alpha > 0 or not 0 <= self.dropout < 1 or (self.rank and not self.targets):
            raise ValueError(f"rank must be >= 0, alpha > 0, dropout within [0, 1) and targets not empty; got "
                             f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, targets={self.targets}")


@dataclass
class SFTConfig:
    data: str = setting(help="folder with dialogs-train.jsonl and dialogs-val.jsonl (from `parley data prepare`)")
    run: str = setting(help="run folder: config, metrics, plot, checkpoints (must be new unless resume)")
    base: str = setting("smollm2", "registered model to start from")
    name: str = setting("", "register the result under this name ('' = the run folder's name)")
    resume: bool = setting(False, "continue the run in `run` from its newest checkpoint")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def main(cfg: SFTConfig) -> dict:
    t = cfg.train
    device = resolve_device(t.device)  # refuse a missing GPU before loading anything
    model_name(cfg)
    data = Path(cfg.data)
    for split in ("train", "val"):  # before the (slow) model load
        if not (data / f"dialogs-{split}.jsonl").is_file():
            raise FileNotFoundError(f"{data / f'dialogs-{split}.jsonl'} not found: run `parley data prepare {data}`")
    cfg.anchor.check(cfg.lora.rank)
    model, tokenizer, _ = Registry().load(cfg.base, dtype=torch.float32)
    model.to(device)  # the evaluation before training runs where the training will
    if t.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"train.seq_len {t.seq_len} is longer than {cfg.base}'s context "
                         f"({model.config.max_position_embeddings})")
    chats = ChatDataset(data / "dialogs-train.jsonl", tokenizer, t.seq_len)
    val = ChatDataset(data / "dialogs-val.jsonl", tokenizer, t.seq_len)
    params = add_adapters(model, cfg.lora, t.seed)  # before the run folder: targets the model lacks are refused
    with processes(device):
        run = claim_run(cfg)
        return fine_tune(cfg, model, tokenizer, chats, val, run, params, stage="sft", anchor=cfg.anchor)


def add_adapters(model, lora: LoRAConfig, seed: int) -> list | None:
    """LoRA adapters on the model (their parameters), or None when lora.rank is 0 (train every weight)."""
    if not lora.rank:
        return None
    with torch.random.fork_rng(devices=[]):  # the adapters' initial weights follow train.seed
        torch.manual_seed(seed)
        return apply_lora(model, r=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets))


def fine_tune(cfg, model, tokenizer, chats: ChatDataset, val: ChatDataset, run: Path, params: list | None,
              stage: str, anchor: AnchorConfig | None = None) -> dict:
    """SFT on `chats` inside a claimed run folder: validation loss before and after, adapters saved and
    merged, the model registered. Shared by `parley train sft` and `parley train constitutional` (which
    may hold the model to its base on ordinary dialogs: `anchor`, parley/train/anchor.py)."""
    t = cfg.train
    trainable = sum(p.numel() for p in (params or model.parameters()))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        print(f"{cfg.base}: {trainable / 1e6:.2f}M trainable parameters; {len(chats)} training conversations "
              f"({chats.dropped} dropped: no answer left within seq_len), {len(val)} held out")

    def get_batch(step, micro, rank, world):
        return chats.batch(step, micro, rank, world, t.batch_size, t.seed)

    def val_batches():
        return val.eval_batches(t.batch_size, t.eval_batches)

    before = evaluate(model, t, val_batches, lm_loss)
    if main_process:
        print(f"validation loss before fine-tuning: {before:.4f}")
    get_batch, loss_fn = anchored(get_batch, lm_loss, model, anchor or AnchorConfig(), tokenizer, t.seed)
    final = train(model, t, run, get_batch, loss_fn, eval_batches=val_batches, params=params, resume=cfg.resume)
    final["val_loss_before"] = before
    if cfg.lora.rank:
        if main_process:
            save_file(lora_state_dict(model), run / "adapter.safetensors")
        merge_lora(model)
    return finish(cfg, run, model, tokenizer, final, stage=stage)

if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(SFTConfig, sys.argv[1:], prog="parley train sft"))
