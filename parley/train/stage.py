"""What every training stage does around the loop: claim a run folder, and at the end
register the trained model (with its tokenizer) so `parley chat --model NAME` can use it."""

from __future__ import annotations

import os
from pathlib import Path

from parley.config import to_dict
from parley.model.tokenizer import Tokenizer
from parley.model.transformer import Transformer
from parley.registry import NAME_PATTERN, Registry


def start_run(run: str, resume: bool) -> Path:
    """The run folder; a folder that already holds something is an error unless resuming."""
    path = Path(run)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run folder {path} is a file: choose another run=")
    if resume and not path.is_dir():
        raise FileNotFoundError(f"nothing to resume: run folder {path} does not exist")
    if not resume and path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"run folder {path} already exists: pass resume=true to continue that run, "
                              f"or choose a new run=")
    return path


def model_name(cfg) -> str:
    name = cfg.name or Path(cfg.run).name.lower()
    if not NAME_PATTERN.match(name):
        raise ValueError(f"invalid model name {name!r}: set name= to lowercase letters, digits, '.', '_' or '-'")
    return name


def finish(cfg, run: Path, model: Transformer, tokenizer: Tokenizer, final: dict, stage: str) -> dict:
    """Register the trained model (on the first process only) and report where it went."""
    if int(os.environ.get("RANK", "0")) != 0:
        return final
    name = model_name(cfg)
    meta = {"name": name, "source": str(run), "format": "parley", "stage": stage,
            "architecture": "MixtralForCausalLM" if model.config.is_moe else "LlamaForCausalLM",
            "params": model.config.num_params(), "active_params": model.config.num_params(active=True),
            "final": {k: v for k, v in final.items() if isinstance(v, (int, float, str))},
            "config": to_dict(cfg)}
    registry = Registry()
    replaced = registry.path(name).exists()
    registry.save(name, model.float().eval(), tokenizer, meta, replace=True)
    print(f"registered {name}{' (replacing the model of that name)' if replaced else ''}: "
          f"parley chat --model {name}")
    return {**final, "model": name}
