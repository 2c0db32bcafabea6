"""ONE training loop for every stage. A stage brings a model, a batch function and a loss; the
loop owns the optimizer, learning-rate schedule, gradient accumulation, bf16 autocast,
distributed data parallelism, evaluation, logging, plots and checkpoints.

    from parley.train.loop import TrainConfig, train
    from parley.train.losses import lm_loss
    cfg = TrainConfig(steps=200, batch_size=8, seq_len=128, lr=3e-3)
    final = train(model, cfg, "runs/tiny", get_batch, lm_loss, eval_batches=val_batches, resume=True)

    torchrun --standalone --nproc-per-node 2 stage.py ...    # the same code, one process per device

cfg.device picks where a process trains (auto: the GPU when torch sees one); under torchrun
each process takes cuda:LOCAL_RANK and nccl, or the CPU and gloo. cfg.optimizer picks AdamW,
or Muon for the matrices inside the layers (parley/train/muon.py) with AdamW for the rest.

`get_batch(step, micro, rank, world)` returns the batch for one micro-step of one process and
must be a pure function of its arguments. That is what makes a resumed run repeat an
uninterrupted one exactly, and N processes equal one process that accumulates N micro-batches.
`loss_fn(model, batch) -> (loss, metrics)` runs the forward pass; metrics are logged.

The run folder holds `metrics.jsonl` (one JSON object per log step and per evaluation),
`loss.png`, and `checkpoints/step-XXXXXX/`: config.json + model.safetensors (what
`weights.load_checkpoint` reads, for a plain Transformer) and trainer.pt (optimizer state and
step), each folder built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from parley.config import ConfigError, setting, to_dict
from parley.model.transformer import SparseMoE, Transformer
from parley.files import atomic_open, fsync
from parley.model.weights import save_checkpoint
from parley.train.muon import Muon


@dataclass
class TrainConfig:
    """Optimization settings shared by every stage; the defaults suit a tiny CPU run."""

    steps: int = setting(200, "optimizer steps in the whole run")
    batch_size: int = setting(8, "sequences per micro-batch per process")
    grad_accum: int = setting(1, "micro-batches per optimizer step (global batch: batch_size * grad_accum * processes)")
    seq_len: int = setting(128, "tokens per sequence (for token counts and FLOPs; the data decides the real shape)")
    lr: float = setting(3e-3, "peak learning rate (AdamW); with optimizer=muon, of what Muon does not take")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = setting(20, "steps of linear warm-up from lr/warmup_steps to lr")
    schedule: Literal["cosine", "linear", "constant"] = setting("cosine", "decay after warm-up")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices (never on norms, biases, embeddings)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw", "adamw: AdamW everywhere; muon: Muon for the matrices inside the layers, AdamW for the rest")
    muon_lr: float = setting(0.02, "peak learning rate of the Muon matrices (optimizer=muon; lr drives the AdamW rest)")
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", "where to train: auto = cuda when torch sees a GPU, else cpu (torchrun: cuda:LOCAL_RANK per process)")
    dtype: Literal["bfloat16", "float32"] = setting("bfloat16", "autocast compute dtype; weights stay fp32")
    compile: bool = setting(False, "torch.compile the model (C++ on CPU): slow start, faster steps")
    eval_every: int = setting(50, "evaluate every N steps and at the end (0 = only at the end)")
    eval_batches: int = setting(8, "batches per evaluation")
    save_every: int = setting(100, "checkpoint every N steps; the final step is always saved (0 = only then)")
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep")
    log_every: int = setting(10, "log train metrics every N steps")
    seed: int = setting(0, "fixes the initial weights (pretrain) or adapters (sft), the batches, and torch's RNG "
                           "at each step (dropout) from (seed, step, rank)")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio within [0, 1]")
        if not (self.lr > 0 and self.muon_lr > 0):  # NaN fails too
            raise ValueError(f"lr and muon_lr must be positive, got lr={self.lr}, muon_lr={self.muon_lr}")
        for name in ("weight_decay", "grad_clip", "eval_every", "save_every", "seed"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be within [0, 1), got {self.beta1}, {self.beta2}")


# ---------------------------------------------------------------- schedule and optimizer

def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on the peak learning rate for the optimizer step `step` (0-based): linear warm-up,
    then cosine or linear decay that reaches min_lr_ratio exactly at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def fit_warmup(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """cfg with a warm-up that ends before the run does, and what was changed ('' = nothing). A
    recipe's warmup_steps under a shorter train.steps would keep the learning rate climbing to
    the last step: the warm-up is clamped to a tenth of the run instead, and the run says so."""
    if cfg.warmup_steps < cfg.steps:
        return cfg, ""
    fitted = dataclasses.replace(cfg, warmup_steps=cfg.steps // 10)
    return fitted, (f"warning: train.warmup_steps={cfg.warmup_steps} is not shorter than train.steps={cfg.steps}: "
                    f"warming up over {fitted.warmup_steps} steps instead (set train.warmup_steps to choose)")


def muon_matrices(model: nn.Module) -> set[int]:
    """ids of the parameters Muon takes: the weights of the nn.Linear maps inside the model's
    layers (attention, feed-forward, experts). Not the embeddings, the output head (tied to the
    embeddings or not), the MoE routers (a softmax's logits, not a hidden map), norms, biases,
    or LoRA adapters (LoRALinear is not an nn.Linear)."""
    routers = {id(m.gate.weight) for m in model.modules() if isinstance(m, SparseMoE)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    outside = routers | embeddings | ({id(head.weight)} if isinstance(head, nn.Linear) else set())
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in outside}


def build_optimizer(model: nn.Module, params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `params`, with weight decay on matrices only: norms, biases and embeddings
    are not pulled towards zero. With cfg.optimizer == "muon", the hidden matrices
    (`muon_matrices`) go to Muon at cfg.muon_lr, with the same weight decay, and the rest stays
    on AdamW at cfg.lr. Each group remembers its peak learning rate for the schedule."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = muon_matrices(model) if cfg.optimizer == "muon" else set()
    muon, decay, no_decay, seen = [], [], [], set()
    for p in params:
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            if id(p) in hidden:
                muon.append(p)
            else:
                (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "muon":
        groups = [{"params": muon, "muon": True, "lr": cfg.muon_lr, "weight_decay": cfg.weight_decay},
                  *({**g, "muon": False} for g in groups)]
        ns_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        optimizer = Muon([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         ns_dtype=ns_dtype)
    else:  # fused: one kernel for the whole update instead of several passes over every tensor
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      fused=all(p.device.type in ("cpu", "cuda") for p in decay + no_decay))
    for g in optimizer.param_groups:
        g["peak_lr"] = g["lr"]
    return optimizer


# ---------------------------------------------------------------- throughput

def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Matmul FLOPs per token that one training step performs, as PaLM's MFU counts them: a weight
    that multiplies a token costs 2 forward, 2 backward for its input's gradient and 2 more for its
    own gradient, which only a trained weight gets (6 trained, 4 frozen: a LoRA step pays no
    weight gradient for the base model). Attention adds 12 * layers * heads * head_dim * seq_len.
    Embedding lookups cost nothing; an MoE token uses only its top-k experts. With frozen embeddings
    and first norm (LoRA), what reads the embedded tokens (the first layer's q, k, v and their
    adapters' A) computes no input gradient."""
    cfg = getattr(model, "config", None)
    no_input_grad = set()
    layers = getattr(getattr(model, "model", None), "layers", None)
    frozen = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    if layers is not None and frozen and not any(p.requires_grad for p in frozen):
        first = layers[0]
        if not any(p.requires_grad for p in first.input_layernorm.parameters()):
            attention = first.self_attn
            no_input_grad = {id(p) for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
                             for name, p in proj.named_parameters() if name != "lora_B"}
    share = cfg.num_experts_per_tok / cfg.num_local_experts if getattr(cfg, "num_local_experts", 0) else 1
    experts = {id(p) for name, p in model.named_parameters() if ".experts." in name}
    total, seen = 0.0, set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if p.dim() < 2 or id(p) in seen:  # a tied output head is counted once
                continue
            seen.add(id(p))
            per_weight = 2 + (0 if id(p) in no_input_grad else 2) + (2 if p.requires_grad else 0)
            total += per_weight * p.numel() * (share if id(p) in experts else 1)
    attention = 0
    if cfg is not None and hasattr(cfg, "head_dim"):
        attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return total + attention


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> float:
    """Matmul FLOP/s this device reaches in `dtype` right now: the best of a few square
    products, the denominator of MFU. Takes well under a second."""
    device = torch.device(device)
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    for i in range(6):  # the first rounds let the kernel library pick and pack its kernel
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        if i >= 2:
            best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


# ---------------------------------------------------------------- checkpoints

RUN_FILES = {"config.toml", "metrics.jsonl", "loss.png", "checkpoints"}  # what a run folder holds


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    ckpts = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in ckpts.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return sorted((s, p) for s, p in found if (p / "trainer.pt").exists())


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    dirs = _step_dirs(Path(run_dir))
    return dirs[-1][1] if dirs else None


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of a tied tensor (safetensors refuses shared storage)."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            state[name] = t.detach().cpu().contiguous()
    return state


def save_train_checkpoint(run_dir, step: int, model: nn.Module, optimizer, cfg: TrainConfig, keep: int) -> Path:
    """Write checkpoints/step-XXXXXX atomically (built as a hidden sibling, then renamed) and
    delete all but the newest `keep`."""
    ckpts = Path(run_dir) / "checkpoints"
    final, tmp = ckpts / f"step-{step:06d}", ckpts / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"step": step, "train": to_dict(cfg)}
    if isinstance(model, Transformer):
        save_checkpoint(tmp, model, meta)  # the format load_checkpoint, export and the CLI read
    else:
        tmp.mkdir(parents=True)
        save_file(_unique_state(model), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"meta": meta}, indent=2) + "\n")
        fsync(tmp / "model.safetensors")
    torch.save({"step": step, "train": to_dict(cfg), "optimizer": optimizer.state_dict()}, tmp / "trainer.pt")
    fsync(tmp / "trainer.pt")
    if final.exists():  # left by a run that crashed after this step and before its next save
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(ckpts)
    for _, old in _step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def _load_train_checkpoint(folder: Path, model: nn.Module, optimizer) -> dict:
    """Load weights and optimizer state in place; refuse a checkpoint of another model."""
    config = json.loads((folder / "config.json").read_text())
    mine = model.config.to_dict() if isinstance(model, Transformer) else None
    if mine is not None and config.get("model") != mine:
        theirs = config.get("model") or {}
        diff = [f"{k} {theirs.get(k)!r} != {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        raise ValueError(f"checkpoint {folder} is of a different model ({', '.join(diff) or 'not a Transformer'}): "
                         "start a new run folder, or resume with the model it was trained with")
    state = load_file(folder / "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint {folder} does not fit this model: {str(e).splitlines()[-1].strip()}") from e
    current = model.state_dict()
    loaded = {current[n].data_ptr() for n in state if n in current}
    missing = sorted(n for n in missing if current[n].data_ptr() not in loaded)  # a tied name is not missing
    if unexpected or missing:
        raise ValueError(f"checkpoint {folder} does not fit this model: missing {missing[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    device = next(model.parameters()).device  # a run saved on a GPU resumes on a CPU, and the other way
    trainer = torch.load(folder / "trainer.pt", map_location=device, weights_only=True)
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(trainer["optimizer"])
    except ValueError as e:
        raise ValueError(f"checkpoint {folder} optimized other parameters: {e}") from e
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)  # hyperparameters come from this run's config, moments from the checkpoint
    return trainer


# ---------------------------------------------------------------- logging

class _RunLog:
    """metrics.jsonl, loss.png and the console line. Lives on rank 0 only."""

    def __init__(self, run_dir: Path, keep_until: int):
        self.path = run_dir / "metrics.jsonl"
        self.records = []
        if keep_until and self.path.exists():  # a resumed run forgets what came after its checkpoint
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the half-written last line of a killed run
                if record.get("step", 0) <= keep_until:
                    self.records.append(record)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.tty, self.pending = sys.stdout.isatty(), False
        self.warned_plot = False

    def write(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def show(self, text: str, transient: bool = False) -> None:
        """Print a line; on a terminal the progress line is rewritten in place."""
        if self.tty:  # a progress line is replaced by the next one, and kept above anything else
            start = ("\r\033[K" if transient else "\n") if self.pending else ""
            sys.stdout.write(start + text + ("" if transient else "\n"))
            self.pending = transient
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self.pending:  # end the progress line
            sys.stdout.write("\n")
            self.pending = False

    def plot(self) -> None:
        try:
            import matplotlib
        except ImportError:
            if not self.warned_plot:
                self.show("(matplotlib is not installed: no loss.png; pip install 'parley[train]')")
                self.warned_plot = True
            return
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in self.records if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
        ax.set(xlabel="step", ylabel="loss", title=self.path.parent.name)
        ax.grid(alpha=0.3)
        ax.legend()
        with atomic_open(self.path.with_name("loss.png"), "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---------------------------------------------------------------- the loop

def resolve_device(choice: str, name: str = "train.device") -> torch.device:
    """train.device (or the setting `name`) as a torch device: cuda:LOCAL_RANK (0 outside torchrun) or cpu; auto
    takes cuda when torch sees a GPU. Asking for cuda without one is a ConfigError that says what to do."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{name}: expected auto, cpu or cuda, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        build = f"a CPU-only build ({torch.__version__})" if torch.version.cuda is None else "a CUDA build"
        raise ConfigError(f"{name}=cuda, but torch sees no CUDA GPU (torch is {build}): set {name}=cpu "
                          "or auto, or run on a machine with an NVIDIA GPU and a CUDA build of torch")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, whether we started the process group) from torchrun's env: nccl between
    GPUs, gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or "RANK" not in os.environ:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def leave(failed: bool) -> None:
    """Leave the process group in order: collect garbage that may still hold its work (a DDP wrapper
    freed late), wait for the others after a stage that went well (rank 0 registers the model while the
    rest would already be exiting), then destroy it. Without this, one CI run in many saw a process
    aborted at exit by gloo ('terminate called without an active exception', SIGABRT)."""
    gc.collect()
    if not failed:
        dist.barrier()
    dist.destroy_process_group()


def _to(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _mean_across(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def evaluate(model: nn.Module, cfg: TrainConfig, eval_batches: Callable[[], Iterable[Any]],
             loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]], rank: int = 0, world: int = 1) -> float:
    """Mean loss over the first cfg.eval_batches batches, in eval mode and cfg.dtype, without
    gradients. With world > 1 the processes share the batches out and agree on the mean."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), _autocast(cfg, device):
        for i, batch in enumerate(itertools.islice(eval_batches(), cfg.eval_batches)):
            if i % world == rank:
                total += torch.tensor([float(loss_fn(model, _to(batch, device))[0]), 1.0], dtype=torch.float64)
    if world > 1:
        total = total.to(device)  # nccl reduces GPU tensors only
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def train(model: nn.Module, cfg: TrainConfig, run_dir, get_batch: Callable[[int, int, int, int], Any],
          loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
          eval_batches: Callable[[], Iterable[Any]] | None = None, params: Iterable[nn.Parameter] | None = None,
          resume: bool = False, peak_flops: float | None = None) -> dict:
    """Train `model` in place for cfg.steps optimizer steps on cfg.device (it is moved there);
    return the final metrics.

    params: what to optimize (default: every parameter that requires grad), e.g. LoRA adapters.
    resume: continue from the newest complete checkpoint in run_dir (fresh start if none).
    peak_flops: the device's peak FLOP/s for MFU; measured once when not given.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world, started_group = init_distributed(device)
    main = rank == 0
    cfg, warning = fit_warmup(cfg)
    if main and warning:
        print(warning)
    model.to(device)  # before the optimizer is built: its state lives beside the parameters
    if not resume and _step_dirs(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: resume=True continues that run, "
                         "or choose a new run folder")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    optimizer = build_optimizer(model, params, cfg)
    step, ckpt = 0, latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        saved = _load_train_checkpoint(ckpt, model, optimizer)
        step = saved["step"]
        changed = [k for k, v in to_dict(cfg).items() if saved["train"].get(k) != v]
        if main:
            print(f"resuming {ckpt} at step {step}" + (f" (changed: {', '.join(changed)})" if changed else ""))
    log = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".step-*"):  # half-written by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        log = _RunLog(run_dir, keep_until=step)
    compute_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    if main and peak_flops is None:
        peak_flops = measure_peak_flops(compute_dtype, device)
    fpt = flops_per_token(model, cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world

    ddp = None
    net = model
    if world > 1:
        experts = getattr(getattr(model, "config", None), "num_local_experts", 0)
        # an expert that gets no token in a micro-batch has no gradient: DDP must be told to expect that
        ddp = net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=bool(experts))
    if cfg.compile:
        net = torch.compile(net)

    def evaluation() -> dict:
        loss = evaluate(model, cfg, eval_batches, loss_fn, rank, world)
        return {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    final: dict[str, Any] = {"step": step}
    if log is not None:
        final.update({k: v for r in log.records for k, v in r.items()})
    sums: dict[str, float] = {}
    logged_steps, interval_time, run_time, run_steps = 0, 0.0, 0.0, 0
    model.train()
    while step < cfg.steps:
        start = time.perf_counter()
        # the RNG is a function of (seed, step, rank) as the batches are: dropout and sampling
        # repeat exactly after a resume, without checkpointing generator states
        torch.manual_seed(hash((cfg.seed, step, rank)) % 2**63)
        mult = lr_multiplier(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * mult
        for micro in range(cfg.grad_accum):
            batch = _to(get_batch(step, micro, rank, world), device)
            last = micro == cfg.grad_accum - 1
            # gradients are averaged across processes once per step, on the last micro-batch
            with nullcontext() if ddp is None or last else ddp.no_sync():
                with _autocast(cfg, device):
                    loss, metrics = loss_fn(net, batch)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / cfg.grad_accum
        if cfg.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - start
        logged_steps, interval_time = logged_steps + 1, interval_time + elapsed
        if run_steps:  # the first step pays for warm-up and compilation: leave it out of speed and ETA
            run_time += elapsed
        run_steps += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            values = _mean_across({k: v / logged_steps for k, v in sums.items()}, world, device)
            tok_s = tokens_per_step * logged_steps / interval_time
            record = {"step": step, **values, "lr": cfg.lr * mult, "tokens": step * tokens_per_step,
                      "tok_per_s": tok_s}
            if peak_flops:
                # the peak is the best this device was seen to do: a step that beats the short
                # measurement at the start (a busy machine, a larger matmul) raises it
                peak_flops = max(peak_flops, fpt * tok_s / world)
                record["mfu"] = fpt * tok_s / world / peak_flops
            final.update(record)
            sums, logged_steps, interval_time = {}, 0, 0.0
            if log is not None:
                log.write(record)
                eta = (cfg.steps - step) * run_time / max(1, run_steps - 1)
                mfu = f"  MFU {record['mfu']:.1%}" if "mfu" in record else ""
                parts = [f"{k} {v:.4f}" for k, v in values.items() if k not in ("loss", "grad_norm")]
                loss = f"loss {record['loss']:.4f}" + (f" ({', '.join(parts)})" if parts else "")
                log.show(f"step {step}/{cfg.steps}  {loss}  lr {record['lr']:.2e}  "
                         f"{tok_s:,.0f} tok/s{mfu}  ETA {_duration(eta)}", transient=True)
        if eval_batches is not None and (step == cfg.steps or cfg.eval_every and step % cfg.eval_every == 0):
            record = evaluation()
            final.update(record)
            if log is not None:
                log.write(record)
                log.show(f"eval step {step}  val loss {record['val_loss']:.4f}  ppl {record['val_ppl']:.2f}")
                log.plot()
        if step == cfg.steps or cfg.save_every and step % cfg.save_every == 0:
            if main:
                final["checkpoint"] = str(save_train_checkpoint(run_dir, step, model, optimizer, cfg,
                                                                cfg.keep_checkpoints))
            if world > 1:
                dist.barrier()  # nobody runs ahead of (or exits before) a checkpoint being written
    if log is not None:
        log.plot()
        log.close()
        if run_steps > 1:
            final["run_tok_per_s"] = tokens_per_step * (run_steps - 1) / run_time
    del ddp, net
    if started_group:
        leave(failed=False)
    return final
