"""Register a LoRA run's intermediate checkpoint as a model, to score it on the dev split (issue 12's
checkpoint sweeps): the run's base with adapters of the run's config, the checkpoint's weights, merged.

    python benchmarks/probes/register_checkpoint.py runs/cai-a 50 smollm2-cai-a50
    python benchmarks/alignment.py --heldout dev --models smollm2-cai-a50 --out runs/dev-a50.json
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import torch
from safetensors.torch import load_file

from parley.model.lora import merge_lora
from parley.registry import Registry
from parley.train.sft import LoRAConfig, add_adapters
from parley.train.stage import trained_meta


def main(run: str, step: int, name: str) -> None:
    run_dir = Path(run)
    if not (run_dir / "config.toml").is_file():
        raise SystemExit(f"{run_dir} holds no config.toml: pass the folder of a `parley train` run")
    config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{folder} holds no model.safetensors: the run saved no checkpoint at step {step}")
    model, tokenizer, _ = Registry().load(config["base"], dtype=torch.float32)
    lora = config.get("lora", {})
    add_adapters(model, LoRAConfig(**lora), 0)
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    if unexpected or any("lora" in m for m in missing):
        raise SystemExit(f"{folder} does not fit {config['base']} with {lora}: unexpected {unexpected[:3]}")
    merge_lora(model)
    Registry().save(name, model.float().eval(), tokenizer, trained_meta(name, folder, model, "checkpoint"),
                    replace=True)
    print(f"registered {name} from {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
