"""What every training stage does around the loop: join the other processes (under torchrun),
claim a run folder on the first process only, and at the end register the trained model
(with its tokenizer) so `parley chat model=NAME` can use it.

    with processes(device):                 # the process group, when torchrun started us
        run = claim_run(cfg)                # rank 0 checks, creates and writes config.toml
        ...                                 # the others wait for its verdict, then train
        finish(cfg, run, model, tokenizer, final, stage="pretrain")
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from parley.config import to_dict, to_toml
from parley.files import atomic_open
from parley.model.tokenizer import Tokenizer
from parley.model.transformer import Transformer
from parley.registry import NAME_PATTERN, Registry
from parley.train.loop import RUN_FILES, init_distributed, latest_checkpoint, leave


@contextmanager
def processes(device: torch.device):
    """The process group for the whole stage (torchrun), so that the run folder is claimed once;
    `train` joins it instead of starting its own. Outside torchrun: nothing."""
    rank, world, started = init_distributed(device)
    failed = True
    try:
        yield rank, world
        failed = False
    finally:
        if started:
            leave(failed)


def check_run(run: str, resume: bool) -> Path:
    """The run folder, if this start may use it. A folder blocks a fresh start only when it holds a
    checkpoint (pass resume=true) or files that are not a run's; what a start that failed before
    its first checkpoint left (config.toml, metrics.jsonl, loss.png) is started over."""
    path = Path(run)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run folder {path} is a file: choose another run=")
    if resume and not path.is_dir():
        raise FileNotFoundError(f"nothing to resume: run folder {path} does not exist (drop resume=true to start it)")
    if resume or not path.is_dir():
        return path
    if latest_checkpoint(path) is not None:
        raise FileExistsError(f"run folder {path} already holds a trained run: pass resume=true to continue it, "
                              f"or choose a new run=")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise FileExistsError(f"run folder {path} holds other files ({', '.join(foreign[:3])}): choose a new run=")
    return path


def claim_run(cfg) -> Path:
    """Check cfg.run, create it and write its config.toml, on the first process only. Under torchrun
    the others wait for its verdict and fail with the same error when it fails, so one process
    never finds the folder another has just made."""
    error, path = None, Path(cfg.run)
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            path = check_run(cfg.run, cfg.resume)
            path.mkdir(parents=True, exist_ok=True)
            with atomic_open(path / "config.toml") as f:
                f.write(to_toml(cfg))
        except (OSError, ValueError) as e:
            error = e
    if dist.is_initialized():
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        raise error
    return path


def model_name(cfg) -> str:
    name = cfg.name or Path(cfg.run).name.lower()
    if not NAME_PATTERN.match(name):
        raise ValueError(f"invalid model name {name!r}: set name= to lowercase letters, digits, '.', '_' or '-'")
    return name


def trained_meta(name: str, source, model: Transformer, stage: str) -> dict:
    """The registry entry's description of a model a stage trained: where from, which stage, its size."""
    return {"name": name, "source": str(source), "format": "parley", "stage": stage,
            "architecture": "MixtralForCausalLM" if model.config.is_moe else "LlamaForCausalLM",
            "params": model.config.num_params(), "active_params": model.config.num_params(active=True)}


def finish(cfg, run: Path, model: Transformer, tokenizer: Tokenizer, final: dict, stage: str) -> dict:
    """Register the trained model (on the first process only) and say how to talk to it."""
    if int(os.environ.get("RANK", "0")) != 0:
        return final
    name = model_name(cfg)
    meta = {**trained_meta(name, run, model, stage),
            "final": {k: v for k, v in final.items() if isinstance(v, (int, float, str))},
            "config": to_dict(cfg)}
    registry = Registry()
    replaced = registry.path(name).exists()
    registry.save(name, model.float().eval(), tokenizer, meta, replace=True)
    print(f"registered {name}{' (replacing the model of that name)' if replaced else ''}: "
          f"parley chat model={name}")
    return {**final, "model": name}
