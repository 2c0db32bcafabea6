"""`parley train pretrain`: a model from scratch, next-token prediction on token shards.

    parley data prepare --tokenizer runs/tokenizer-8k         # cleaned corpus + token shards
    parley train pretrain recipes/pretrain-tiny.toml          # dense
    parley train pretrain recipes/pretrain-tiny-moe.toml      # same active parameters, 8 experts
    parley train pretrain recipes/pretrain-tiny.toml train.steps=50 run=runs/try name=try
    torchrun --standalone --nproc-per-node 2 -m parley train pretrain recipes/pretrain-tiny.toml

The run folder gets config.toml, metrics.jsonl, loss.png and checkpoints; the final model is
registered in PARLEY_HOME under `name`, ready for `parley chat --model NAME`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parley.config import save_config, setting
from parley.model.tokenizer import Tokenizer
from parley.model.transformer import ModelConfig, Transformer
from parley.train.data import TokenShards
from parley.train.losses import lm_loss
from parley.train.loop import TrainConfig, resolve_device, train
from parley.train.stage import finish, start_run


@dataclass
class ShapeConfig:
    depth: int = setting(4, "layers; width = 64 * depth (the one size dial)")
    experts: int = setting(0, "0: dense feed-forward; >= 2: mixture of experts with this many experts")
    experts_per_token: int = setting(2, "experts each token is routed to (MoE)")
    context: int = setting(512, "longest sequence the model can take")
    init_std: float = setting(0.02, "standard deviation of the initial weights")


@dataclass
class PretrainConfig:
    data: str = setting(help="folder of token shards (written by `parley data prepare --tokenizer ...`)")
    tokenizer: str = setting(help="tokenizer folder the shards were made with (e.g. from `parley train tokenizer`)")
    run: str = setting(help="run folder: config, metrics, plot, checkpoints (must be new unless resume)")
    name: str = setting("", "register the final model under this name ('' = the run folder's name)")
    resume: bool = setting(False, "continue the run in `run` from its newest checkpoint")
    model: ShapeConfig = field(default_factory=ShapeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def main(cfg: PretrainConfig) -> dict:
    resolve_device(cfg.train.device)  # refuse a missing GPU before reading data or claiming the run folder
    tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    shards, val = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "val")
    if shards.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{cfg.data} was tokenized with a {shards.vocab_size}-token vocabulary but {cfg.tokenizer} "
                         f"has {tokenizer.vocab_size}: re-tokenize the data with this tokenizer")
    if cfg.train.seq_len > cfg.model.context:
        raise ValueError(f"train.seq_len {cfg.train.seq_len} is longer than model.context {cfg.model.context}")
    run = start_run(cfg.run, cfg.resume)
    save_config(cfg, run / "config.toml")
    shape = ModelConfig.from_depth(cfg.model.depth, tokenizer.vocab_size, cfg.model.context,
                                   experts=cfg.model.experts, experts_per_token=cfg.model.experts_per_token)
    model = Transformer(shape)
    model.init_weights(cfg.model.init_std)
    t = cfg.train
    print(f"model: {shape.num_params() / 1e6:.1f}M parameters ({shape.num_params(active=True) / 1e6:.1f}M active), "
          f"data: {shards.num_tokens / 1e6:.1f}M training tokens")

    def get_batch(step, micro, rank, world):
        return shards.batch(step, micro, rank, world, t.batch_size, t.seq_len, t.seed)

    final = train(model, t, run, get_batch, lm_loss,
                  eval_batches=lambda: val.eval_batches(t.batch_size, t.seq_len, t.eval_batches), resume=cfg.resume)
    return finish(cfg, run, model, tokenizer, final, stage="pretrain")


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(PretrainConfig, sys.argv[1:], prog="parley train pretrain"))
