"""`parley train pretrain`: a model from scratch, next-token prediction on token shards.

    parley data prepare .data/corpus --tokenizer runs/tokenizer-8k   # cleaned corpus + token shards
    parley train pretrain recipes/pretrain-tiny.toml          # dense
    parley train pretrain recipes/pretrain-tiny-moe.toml      # same active parameters, 4 experts
    parley train pretrain recipes/pretrain-tiny.toml train.steps=50 run=runs/try name=try
    torchrun --standalone --nproc-per-node 2 -m parley train pretrain recipes/pretrain-tiny.toml run=runs/ddp

Every value is checked before the run folder is made. The run folder gets config.toml,
metrics.jsonl, loss.png and checkpoints; the final model is registered in PARLEY_HOME under
`name`, ready for `parley chat model=NAME`. train.seed fixes the initial weights as well as
the batches: two runs of one command train the same model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parley.config import setting
from parley.model.tokenizer import Tokenizer
from parley.model.transformer import ModelConfig, Transformer
from parley.train.data import TokenShards
from parley.train.losses import lm_loss
from parley.train.loop import TrainConfig, resolve_device, train
from parley.train.stage import claim_run, finish, model_name, processes


@dataclass
class ShapeConfig:
    depth: int = setting(4, "layers; width = 64 * depth (the one size dial)")
    experts: int = setting(0, "0: dense feed-forward; >= 2: mixture of experts with this many experts")
    experts_per_token: int = setting(2, "experts each token is routed to (MoE)")
    context: int = setting(512, "longest sequence the model can take")
    init_std: float = setting(0.02, "standard deviation of the initial weights")

    def __post_init__(self):
        if self.depth < 1 or self.context < 1:
            raise ValueError(f"depth and context must be at least 1, got depth={self.depth}, context={self.context}")
        if self.experts == 1 or self.experts < 0:
            raise ValueError(f"experts must be 0 (dense) or at least 2, got {self.experts}")
        if self.experts and not 1 <= self.experts_per_token <= self.experts:
            raise ValueError(f"experts_per_token must be within [1, experts={self.experts}], "
                             f"got {self.experts_per_token}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")


@dataclass
class PretrainConfig:
    data: str = setting(help="folder of token shards (written by `parley data prepare --tokenizer ...`)")
    tokenizer: str = setting(help="tokenizer folder the shards were made with (e.g. from `parley train tokenizer`)")
    run: str = setting(help="run folder: config, metrics, plot, checkpoints (must be new unless resume)")
    name: str = setting("", "register the final model under this name ('' = the run folder's name)")
    resume: bool = setting(False, "continue the run in `run` from its newest checkpoint")
    model: ShapeConfig = field(default_factory=ShapeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build_model(shape: ModelConfig, init_std: float, seed: int) -> Transformer:
    """A fresh model whose weights are a function of `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(shape)
        model.init_weights(init_std)
    return model


def main(cfg: PretrainConfig) -> dict:
    device = resolve_device(cfg.train.device)  # refuse a missing GPU before reading data or claiming the run folder
    if not (Path(cfg.tokenizer) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {cfg.tokenizer}: train one with "
                                f"`parley train tokenizer data={cfg.data} out={cfg.tokenizer}`")
    tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    shards, val = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "val")
    if shards.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{cfg.data} was tokenized with a {shards.vocab_size}-token vocabulary but {cfg.tokenizer} "
                         f"has {tokenizer.vocab_size}: tokenize it with this one "
                         f"(`parley data prepare {cfg.data} --tokenizer {cfg.tokenizer}`)")
    if cfg.train.seq_len > cfg.model.context:
        raise ValueError(f"train.seq_len {cfg.train.seq_len} is longer than model.context {cfg.model.context}")
    for split in (shards, val):
        split.check_seq_len(cfg.train.seq_len)
    model_name(cfg)
    shape = ModelConfig.from_depth(cfg.model.depth, tokenizer.vocab_size, cfg.model.context,
                                   experts=cfg.model.experts, experts_per_token=cfg.model.experts_per_token)
    t = cfg.train
    with processes(device):
        run = claim_run(cfg)
        model = build_model(shape, cfg.model.init_std, t.seed)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"model: {shape.num_params() / 1e6:.1f}M parameters ({shape.num_params(active=True) / 1e6:.1f}M "
                  f"active), data: {shards.num_tokens / 1e6:.1f}M training tokens")

        def get_batch(step, micro, rank, world):
            return shards.batch(step, micro, rank, world, t.batch_size, t.seq_len, t.seed)

        final = train(model, t, run, get_batch, lm_loss, resume=cfg.resume,
                      eval_batches=lambda: val.eval_batches(t.batch_size, t.seq_len, t.eval_batches))
        return finish(cfg, run, model, tokenizer, final, stage="pretrain")


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(PretrainConfig, sys.argv[1:], prog="parley train pretrain"))
