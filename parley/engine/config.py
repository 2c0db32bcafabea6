"""How the engine runs: one typed section (`engine.KEY=value`) that every front end shares.

    parley chat engine.kernels=torch engine.max_batch=4
    parley serve engine.device=cuda engine.kv_budget_mb=2048

`kernels` picks the CPU path: `auto` takes the best this CPU offers (AMX tiles, then the
C kernels' register-blocked products), `avx512` keeps the C kernels but off the tile unit, `torch`
runs PyTorch only. Off the tiles, float weights run on the best of AVX512-BF16 dot products
(CPUs without AMX), AVX-512 FMAs, AVX2 FMAs (a laptop) and portable C, and quantized weights
(model/quant.py) on int8 dot products: AVX512-VNNI, AVX2 (vpmaddubsw) or portable C; `avx2` and
`scalar` cap both lower, so that each path this CPU runs can be tested on it (engine/fast.py's
`path` names the one chosen, as the startup line and /health show it). The environment variable PARLEY_KERNELS overrides the setting, for every engine
the process builds (a quick comparison without editing a command line; the test suite on a
lower path: `PARLEY_KERNELS=avx512 make test`); PARLEY_AMX=0 is the older spelling of `avx512`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from parley.config import ConfigError, setting

KERNELS = ("auto", "amx", "avx512", "avx2", "scalar", "torch")
KV_DTYPES = ("auto", "bfloat16")


@dataclass
class EngineConfig:
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where the model runs: auto = cuda when PyTorch sees "
                                                             "a GPU, else cpu")
    dtype: Literal["bfloat16", "float32"] = setting("bfloat16", "weights and compute precision")
    kernels: Literal["auto", "amx", "avx512", "avx2", "scalar", "torch"] = setting(
        "auto", "CPU path: auto = the best this CPU has (AMX tiles, then the C kernels: AVX512-BF16, AVX-512, AVX2 "
                "or portable C); avx512 = off the tiles; avx2 / scalar cap the C kernels' instruction set; torch = "
                "PyTorch only (the environment variable PARLEY_KERNELS overrides this)")
    kv_dtype: Literal["auto", "bfloat16"] = setting(
        "auto", "keys and values in the paged cache: auto = bf16 on AMX tiles and the packed AVX-512 paths of bf16 "
                "weights, else fp32 on the C kernels (the weights' dtype on PyTorch); bfloat16 = bf16 on every path "
                "(half the cache's memory, and the bytes attention reads: faster at long contexts, a little further "
                "from the fp32 reference)")
    max_batch: int = setting(64, "most requests generating at once")
    max_waiting: int = setting(256, "most requests waiting to start; more are refused (HTTP 429)")
    kv_budget_mb: int = setting(0, "memory for the paged KV cache in MiB (0 = room for max_batch full contexts, "
                                   "at most 1024)")
    page_size: int = setting(16, "tokens per KV page")
    prefill_chunk: int = setting(256, "most tokens of one prompt a step prefills (on the PyTorch path; "
                                             "the C kernels cut prompts anywhere)")
    prefill_budget: int = setting(512, "most prompt tokens of all prompts in one step (>= prefill_chunk)")
    threads: int = setting(0, "torch threads of the thread that runs the steps (0 = PyTorch's default)")
    adapter_budget_mb: int = setting(256, "memory for loaded LoRA adapters in MiB (the least recently used one "
                                          "not in use goes first)")

    def __post_init__(self):
        for name, choices in (("device", ("auto", "cpu", "cuda")), ("dtype", ("bfloat16", "float32")),
                              ("kernels", KERNELS), ("kv_dtype", KV_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)} (got {getattr(self, name)!r})")
        for name in ("max_batch", "max_waiting", "page_size", "prefill_chunk", "prefill_budget", "adapter_budget_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("kv_budget_mb", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.prefill_budget < self.prefill_chunk:  # else a whole chunk would never fit in a step
            raise ValueError(f"prefill_budget must be >= prefill_chunk ({self.prefill_chunk}), "
                             f"got {self.prefill_budget}")

    def resolved_kernels(self) -> str:
        """The CPU path asked for, after the environment's override."""
        env = os.environ.get("PARLEY_KERNELS")
        if env is not None:
            if env not in KERNELS:
                raise ConfigError(f"PARLEY_KERNELS={env!r}: choose one of {', '.join(KERNELS)}")
            return env
        if self.kernels == "auto" and os.environ.get("PARLEY_AMX") == "0":
            return "avx512"
        return self.kernels

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("engine.device=cuda but PyTorch sees no GPU (this torch build is "
                              f"{torch.__version__}); use engine.device=cpu or auto")
        return self.device
