"""Training speed: Parley's loop vs a plain `transformers` LlamaForCausalLM training step, side by side.

    .venv/bin/python benchmarks/train_step.py                  # hidden 512, 8 layers, seq 256, batch 8, 12 steps
    .venv/bin/python benchmarks/train_step.py --short          # a quick look: hidden 256, 4 layers, 6 steps
    .venv/bin/python benchmarks/train_step.py --steps 6 --dtypes bfloat16

Both train the same random weights (our parameter names are HF's) on the same random tokens
with the same AdamW (fused, weight decay 0.1, clip 1.0) in fp32 or under bf16 autocast, with
the same threads. Ours is the whole `train()` loop (schedule, logging, metrics.jsonl); the
peer is forward(labels=...), backward, clip, step. The steps alternate: our batch function
runs one transformers step before handing over each batch, so machine noise hits both alike.
Our step time is the time between handing over one batch and being asked for the next; the
loop runs one step more than asked so that its last timed step has a next request, and both
sides report the same steps (the first two, warm-up, left out). Reported: the median step and
its spread (fastest to slowest), and the median of the per-step ratios.

MFU = loop.flops_per_token (the FLOPs a step performs) * tokens/s / peak, where the peak is
the matmul FLOP/s measured in that dtype right before, raised to the fastest step either side
ran if one beat it (a busy machine measures a low peak): MFU never exceeds 100%. The CPU's
model and the features that decide its matmul speed (AVX-512, AMX, bf16) are printed first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import platform
import statistics
import tempfile
import time

import torch

from parley.model.transformer import ModelConfig, Transformer
from parley.train.loop import TrainConfig, flops_per_token, measure_peak_flops, train
from parley.train.losses import lm_loss


def cpu_description() -> str:
    """The CPU's model name and its matmul-relevant features, from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    found = [f for f in wanted if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model}; {os.cpu_count()} CPUs; features: {' '.join(found) or 'none of ' + ', '.join(wanted)}; " \
           f"torch kernels: {capability}"


def side_by_side(ours: Transformer, theirs, cfg: TrainConfig, peak: float) -> tuple[list[float], list[float]]:
    """Seconds per step of (ours, theirs) for the same steps, alternating step by step; the first
    two steps of each are warm-up and left out."""
    opt = torch.optim.AdamW(theirs.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=True)
    handed, asked, their_times = [], [], []

    def get_batch(step, micro, rank, world):
        asked.append(time.perf_counter())
        x = torch.randint(0, ours.config.vocab_size, (cfg.batch_size, cfg.seq_len + 1),
                          generator=torch.Generator().manual_seed(step))
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss = theirs(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        their_times.append(time.perf_counter() - start)
        handed.append(time.perf_counter())
        return x[:, :-1], x[:, 1:]

    theirs.train()
    steps = cfg.steps
    with tempfile.TemporaryDirectory() as run, contextlib.redirect_stdout(io.StringIO()):
        # one step more: our step k ends when step k+1 asks for its batch
        train(ours, dataclasses.replace(cfg, steps=steps + 1), run, get_batch, lm_loss, peak_flops=peak)
    our_times = [a - h for h, a in zip(handed, asked[1:])][:steps]
    return our_times[2:], their_times[2:steps]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="steps of each (the first two are warm-up; at least 3)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (train.compile=true)")
    p.add_argument("--short", action="store_true", help="hidden 256, 4 layers, heads 4/2, seq 128, batch 4, 6 steps")
    args = p.parse_args()
    if args.short:
        args.hidden, args.layers, args.heads, args.kv_heads, args.seq, args.batch, args.steps = 256, 4, 4, 2, 128, 4, 6
    if args.steps < 3:
        p.error("--steps must be at least 3: the first two are warm-up")
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=args.seq)
    shape = ModelConfig(**dims)
    hf_config = LlamaConfig(**dims, tie_word_embeddings=True, rms_norm_eps=shape.rms_norm_eps,
                            attn_implementation="sdpa")
    torch.manual_seed(0)
    base = Transformer(shape)
    base.init_weights()
    fpt = flops_per_token(base, args.seq)
    tokens = args.batch * args.seq
    print(f"cpu: {cpu_description()}")
    print(f"model: {shape.num_params() / 1e6:.1f}M params, seq {args.seq}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {fpt / 1e6:.0f} MFLOP per token")
    for dtype in args.dtypes.split(","):
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=1e-3, warmup_steps=1,
                          dtype=dtype, log_every=1, save_every=0, eval_every=0, compile=args.compile)
        measured = measure_peak_flops(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        ours, theirs = Transformer(shape), LlamaForCausalLM(hf_config)
        ours.load_state_dict(base.state_dict())
        theirs.load_state_dict(base.state_dict(), strict=False)  # HF keeps rotary tables as buffers
        times = dict(zip(("parley", "transformers"), side_by_side(ours, theirs, cfg, measured)))
        fastest = fpt * tokens / min(min(t) for t in times.values())
        peak = max(measured, fastest)
        raised = f" (raised to {peak / 1e9:,.0f}: a step beat it)" if peak > measured else ""
        print(f"\n{dtype}: matmul peak measured {measured / 1e9:,.0f} GFLOP/s{raised}")
        for name, t in times.items():
            median, slow, fast = (tokens / statistics.median(t), tokens / max(t), tokens / min(t))
            print(f"  {name:13s} median {median:8,.0f} tok/s (MFU {fpt * median / peak:6.1%})   "
                  f"spread {slow:,.0f}-{fast:,.0f} tok/s   {len(t)} steps")
        ratios = sorted(b / a for a, b in zip(times["parley"], times["transformers"]))
        print(f"  parley / transformers speed: {statistics.median(ratios):.2f}x median of "
              f"{len(ratios)} paired steps (spread {ratios[0]:.2f}-{ratios[-1]:.2f}x)")


if __name__ == "__main__":
    main()
