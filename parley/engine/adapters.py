"""LoRA adapters the engine serves side by side: each request names one (or none), and every
row of a batch gets its own request's adapter, as S-LoRA and Punica do: one product of the
base weights for the whole batch, then each row's low-rank term x A^T B^T added to it.

    adapters = Adapters(model, folder=home / "adapters" / "smollm2", base="smollm2", budget_bytes=64 << 20)
    engine = Engine(model, adapters=adapters)
    engine.submit(ids, SamplingParams(adapter="alice"))      # folder/alice/adapter.json (model/lora.py)

Adapters are read from their folders when first named and stay loaded within the memory
budget; past it, the least recently used adapter that no request holds is let go. A request
holds its adapter from `submit` until it ends, so an adapter in use is never evicted (when
every loaded adapter is in use and a new one does not fit, `submit` says so: AdapterBusy).
Each adapter's name and weights' hash key the prefix cache (engine.py puts them into the
request's page names): its keys and values are not the base model's.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

from parley.engine.fast import MAX_RANK
from parley.engine.request import EngineError, QueueFull
from parley.model.lora import read_adapter
from parley.model.transformer import Transformer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # kernels.c's T_* order
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_KEY = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])")


class AdapterError(EngineError, ValueError):
    """An adapter that cannot be served: unknown name, bad file, another base model or shapes."""


class AdapterBusy(QueueFull):
    """Every loaded adapter is in use and the one asked for does not fit the memory budget."""


def _mismatch(meta: dict, base: str, version: str) -> str | None:
    """What makes an adapter unfit for the model `base` at `version` ('' = any), or None."""
    if base and meta.get("base") != base:
        return f"was trained on {meta.get('base')!r}, not on {base!r}"
    if version and meta.get("base_version") and meta["base_version"] != version:
        return f"was trained on {base} {meta['base_version']}, but {version} serves now"
    return None


class Adapter:
    """One loaded adapter: per layer and target, A [r, in] and B transposed [r, out] on the model's
    device, in bf16 for a bf16 model (half the bytes a step reads), else fp32; a bf16 model's also
    keeps B [out, r] with 32 zeros after it, which the AMX tiles read (kernels.c's LORA_UP reads
    up to 32 values past a row: the zeros keep the last row's reads inside). `key` (name and
    weights' hash) keys the prefix cache."""

    def __init__(self, name: str, meta: dict, state: dict[str, torch.Tensor], model: Transformer, base: str,
                 version: str = ""):
        cfg, where = model.config, f"adapter {name!r}"
        problem = _mismatch(meta, base, version)
        if problem:
            raise AdapterError(f"{where} {problem}: train one for this model (parley learn user=NAME)")
        self.name, self.meta = name, meta
        self.rank, alpha = int(meta.get("rank", 0)), float(meta.get("alpha", 0))
        if not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"{where} has rank {self.rank}; the engine serves ranks 1..{MAX_RANK}")
        self.scale = alpha / self.rank
        self.key = f"{name}:{meta.get('sha256', '')}"
        device = model.model.embed_tokens.weight.device
        dtype = torch.bfloat16 if model.model.embed_tokens.weight.dtype == torch.bfloat16 else torch.float32
        self.layers: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(cfg.num_hidden_layers)]
        self.tiles: dict[tuple[int, int], torch.Tensor] = {}  # (layer, target): B [out, r] and 32 zeros
        pairs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            m = _KEY.fullmatch(key)
            if not m or m[2] not in TARGETS or int(m[1]) >= cfg.num_hidden_layers:
                raise AdapterError(f"{where} has a tensor {key!r} that this model has no place for "
                                   f"(another base model?); it has {cfg.num_hidden_layers} layers and targets "
                                   f"{', '.join(TARGETS)}")
            pairs.setdefault((int(m[1]), TARGETS.index(m[2])), {})[m[3]] = t
        modules = dict(model.named_modules())
        for (layer, target), ab in sorted(pairs.items()):
            linear = modules[f"model.layers.{layer}.{'self_attn' if target < 4 else 'mlp'}.{TARGETS[target]}"]
            A, B = ab.get("A"), ab.get("B")
            want_a, want_b = (self.rank, linear.in_features), (linear.out_features, self.rank)
            if A is None or B is None or tuple(A.shape) != want_a or tuple(B.shape) != want_b:
                raise AdapterError(f"{where}: layer {layer} {TARGETS[target]} needs A {want_a} and B {want_b}, "
                                   f"the file has A {None if A is None else tuple(A.shape)} and B "
                                   f"{None if B is None else tuple(B.shape)} (another base model or rank?)")
            A, B = A.to(device, dtype).contiguous(), B.to(device, dtype).contiguous()
            if not (A.isfinite().all() and B.isfinite().all()):
                raise AdapterError(f"{where}: layer {layer} {TARGETS[target]} holds infinite or NaN weights "
                                   "(a diverged training run?): train it again")
            self.layers[layer][target] = (A, B.t().contiguous())
            if dtype == torch.bfloat16 and device.type == "cpu":
                self.tiles[(layer, target)] = torch.cat([B.flatten(), B.new_zeros(32)])
        if not pairs:
            raise AdapterError(f"{where} holds no LoRA tensors")
        self.dtype = dtype
        self.nbytes = sum(a.nbytes + b.nbytes for layer in self.layers for a, b in layer.values()) + \
            sum(b.nbytes for b in self.tiles.values())
        self.users = 0  # requests holding it
        self._lora = None

    def lora_array(self):
        """The C kernels' view (fast.Lora per layer), built once."""
        if self._lora is None:
            from parley.engine.fast import Lora

            self._lora = (Lora * len(self.layers))()
            for layer, (lora, targets) in enumerate(zip(self._lora, self.layers)):
                lora.r, lora.scale, lora.bf16 = self.rank, self.scale, int(self.dtype == torch.bfloat16)
                for t, (A, Bt) in targets.items():
                    lora.A[t], lora.Bt[t] = A.data_ptr(), Bt.data_ptr()
                    if (layer, t) in self.tiles:
                        lora.B[t] = self.tiles[(layer, t)].data_ptr()
        return self._lora


class Adapters:
    """The adapters one engine serves: `folder`/NAME/ holds each (model/lora.py's save_adapter),
    `base` is the model's name they must have been trained on (and `version` its version, where
    given), and at most `budget_bytes` of them stay loaded (least recently used first out, never
    one in use)."""

    def __init__(self, model: Transformer, folder, base: str = "", budget_bytes: int = 256 << 20, version: str = ""):
        if budget_bytes <= 0:
            raise AdapterError(f"the adapters' memory budget must be > 0 bytes (got {budget_bytes})")
        self.model, self.folder, self.base, self.budget = model, Path(folder), base, budget_bytes
        self.version = version
        self._loaded: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.loads = self.evictions = 0

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} is not valid: letters, digits, '_', '.', '-' (at most 128)")
        return self.folder / name

    def exists(self, name: str) -> bool:
        return (self.path(name) / "adapter.json").is_file()

    def servable(self, name: str) -> bool:
        """Whether `name` has an adapter made for this model and version (a server then names it)."""
        try:
            return _mismatch(json.loads((self.path(name) / "adapter.json").read_text()), self.base,
                             self.version) is None
        except (OSError, ValueError):
            return False

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    @property
    def bytes_loaded(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._loaded.values())

    def acquire(self, name: str) -> Adapter:
        """The adapter `name`, loaded if need be and held until `release`. AdapterError if there
        is none or it does not fit the model; AdapterBusy when the budget is full of adapters in use."""
        folder = self.path(name)
        with self._lock:
            adapter = self._loaded.get(name)
            if adapter is not None:
                self._loaded.move_to_end(name)
                adapter.users += 1
                return adapter
        if not (folder / "adapter.json").is_file():
            raise AdapterError(f"there is no adapter {name!r} (looked for {folder / 'adapter.json'})")
        try:
            meta, state = read_adapter(folder)
        except ValueError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None
        adapter = Adapter(name, meta, state, self.model, self.base, self.version)
        if adapter.nbytes > self.budget:
            raise AdapterError(f"adapter {name!r} needs {adapter.nbytes} bytes, more than the whole adapter budget "
                               f"({self.budget} bytes): raise engine.adapter_budget_mb")
        with self._lock:
            if name in self._loaded:  # another thread loaded it meanwhile
                adapter = self._loaded[name]
                self._loaded.move_to_end(name)
            else:
                used = sum(a.nbytes for a in self._loaded.values())
                for old in [a for a in self._loaded.values() if a.users == 0]:
                    if used + adapter.nbytes <= self.budget:
                        break
                    del self._loaded[old.name]
                    used -= old.nbytes
                    self.evictions += 1
                if used + adapter.nbytes > self.budget:
                    raise AdapterBusy(len([a for a in self._loaded.values() if a.users]), 1.0)
                self._loaded[name] = adapter
                self.loads += 1
            adapter.users += 1
            return adapter

    def release(self, adapter: Adapter) -> None:
        with self._lock:
            adapter.users -= 1

    def forget(self, name: str) -> None:
        """Unload `name` (its files were replaced or deleted); requests holding it finish with it."""
        with self._lock:
            self._loaded.pop(name, None)


def row_pointers(adapters: list[Adapter | None]) -> torch.Tensor:
    """Each row's adapter as the C kernels take it (Buffers.lora): the address of its per-layer
    Lora array, 0 for none."""
    import ctypes

    return torch.tensor([ctypes.addressof(a.lora_array()) if a else 0 for a in adapters], dtype=torch.int64)


def low_rank_term(adapter: Adapter, layer: int, target: int, x: torch.Tensor) -> torch.Tensor | None:
    """scale * (x A^T) B^T of each row of x (n, in), fp32, as the PyTorch path adds it (None where
    the adapter leaves this projection alone). Elementwise products and sums of each row on its
    own, no matrix product (whose blocking PyTorch picks by the batch): a row's term has the same
    bits whatever rows come with it (tests/test_adapters.py)."""
    ab = adapter.layers[layer].get(target)
    if ab is None:
        return None
    A, Bt = ab
    u = (x.float()[:, None, :] * A).sum(-1) * adapter.scale  # (n, r)
    return (u[:, :, None] * Bt).sum(1)  # (n, out)


@contextmanager
def applied(model: Transformer, rows: list[Adapter | None]):
    """Within the block, the model's forward adds each packed row's adapter term to the target
    projections (the PyTorch path, on CPU or GPU). `rows`: one entry per token of the packed batch.
    Each row's term is its own (low_rank_term); in bf16 the base products it is added to are not
    (docs/ARCHITECTURE.md: batch invariance holds on the C paths and in fp32)."""
    groups: dict[int, tuple[Adapter, torch.Tensor]] = {}
    for i, a in enumerate(rows):
        if a is not None:
            groups.setdefault(id(a), (a, []))[1].append(i)
    if not groups:
        yield
        return
    device = model.model.embed_tokens.weight.device
    groups = {k: (a, torch.tensor(idx, device=device)) for k, (a, idx) in groups.items()}
    handles = []

    def hook(layer: int, target: int):
        def add(module, inputs, out):
            x = inputs[0][0]  # (N, in) of the packed row
            out = out.clone()
            for adapter, idx in groups.values():
                delta = low_rank_term(adapter, layer, target, x[idx])
                if delta is not None:
                    out[0, idx] = (out[0, idx].float() + delta).to(out.dtype)
            return out
        return add

    try:
        for name, module in model.named_modules():
            m = _KEY.fullmatch(name + ".lora_A")
            if m and m[2] in TARGETS:
                handles.append(module.register_forward_hook(hook(int(m[1]), TARGETS.index(m[2]))))
        yield
    finally:
        for h in handles:
            h.remove()
