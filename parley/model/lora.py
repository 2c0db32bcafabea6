"""Low-rank adapters: train a few small matrices beside frozen weights (per-user
personalization, cheap fine-tuning), then keep them apart or fold them in.

    params = apply_lora(model, r=8, alpha=16)        # model unchanged until training moves B
    train(model, cfg, run_dir, get_batch, lm_loss, params=params)
    save_file(lora_state_dict(model), "adapter.safetensors")
    load_lora(other_model_with_lora, load_file("adapter.safetensors"))
    merge_lora(model)                                # plain nn.Linear again, base layout

A wrapped layer keeps its frozen `weight` (and `bias`) under the same name and adds `lora_A`
(r x in) and `lora_B` (out x r): y = x W^T + b + (alpha / r) * x A^T B^T.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from parley.files import atomic_open, fsync

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and storage kept
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # zero: no change at start
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + low_rank * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (the low-rank product folded in)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype),
                                         requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scale={self.scale:g}"


def _replace(model: nn.Module, convert) -> int:
    """Swap every child for `convert(name, child)` when that returns a module; count swaps."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert(name, child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Wrap the nn.Linear children named in `targets` (e.g. add "w1", "w2", "w3" for MoE
    experts), freeze every other parameter, and return the adapter parameters to train."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters (merge_lora first to add new ones)")
    if r < 1:
        raise ValueError("LoRA rank r must be at least 1")
    for p in model.parameters():
        p.requires_grad_(False)
    found = _replace(model, lambda name, m: LoRALinear(m, r, alpha, dropout)
                     if name in targets and type(m) is nn.Linear else None)
    if not found:
        raise ValueError(f"no nn.Linear named any of {', '.join(targets)} in the model")
    return [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under their full names (what an adapter file holds)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def load_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model that apply_lora prepared the same way."""
    mine = dict(lora_state_dict(model))
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or unexpected:
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         "(apply_lora with the same targets first)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            if t.shape != params[name].shape:
                raise ValueError(f"adapter tensor {name} has shape {tuple(t.shape)}, the model "
                                 f"{tuple(params[name].shape)} (another rank r?)")
            params[name].copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear layers back: the state dict
    then has the base model's names and shapes (for export, serving, or new adapters)."""
    _replace(model, lambda name, m: m.merged() if isinstance(m, LoRALinear) else None)
    return model


# -- adapter files: a folder holding adapter.json (rank, alpha, targets, base model and version,
# the weights' file and its sha256) and that weights file. adapter.json is written last, atomically,
# and names its weights by their hash: a reader sees the old adapter or the new one, never a mix.

ADAPTER_JSON = "adapter.json"


def save_adapter(folder, model: nn.Module, base: str, base_version: str = "", **extra) -> Path:
    """Write the model's adapter (apply_lora'd, trained) into `folder`; older weights files go."""
    state = lora_state_dict(model)
    if not state:
        raise ValueError("the model has no LoRA adapter to save (apply_lora first)")
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    targets = sorted({n.rsplit(".", 2)[-2] for n in state})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save({n: t.contiguous().cpu() for n, t in state.items()})
    digest = hashlib.sha256(blob).hexdigest()
    weights = f"adapter-{digest[:16]}.safetensors"
    with atomic_open(folder / weights, "wb") as f:
        f.write(blob)
    meta = dict(rank=layer.lora_A.shape[0], alpha=layer.scale * layer.lora_A.shape[0], targets=targets,
                base=base, base_version=base_version, weights=weights, sha256=digest, **extra)
    with atomic_open(folder / ADAPTER_JSON) as f:
        json.dump(meta, f, indent=1)
    fsync(folder)
    for old in folder.glob("adapter-*.safetensors"):
        if old.name != weights:
            old.unlink(missing_ok=True)
    return folder


def read_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter.json's fields, the tensors) of an adapter folder; ValueError saying what is wrong."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / ADAPTER_JSON).read_text())
        blob = (folder / meta["weights"]).read_bytes()
    except FileNotFoundError as e:
        raise ValueError(f"no adapter in {folder}: {e.filename} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / ADAPTER_JSON} is not an adapter description ({e})") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{folder / meta['weights']} does not match the sha256 in {ADAPTER_JSON}: a damaged file")
    try:
        state = safetensors.torch.load(blob)
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{folder / meta['weights']} is not a safetensors file ({e})") from None
    return meta, state
