"""Training speed: Parley's loop vs a plain `transformers` LlamaForCausalLM training step, side by side.

    .venv/bin/python benchmarks/train_step.py                  # hidden 512, 8 layers, seq 256, batch 8
    .venv/bin/python benchmarks/train_step.py --steps 6 --dtypes bfloat16

Both train the same random weights (our parameter names are HF's) on the same random tokens
with the same AdamW (fused, weight decay 0.1, clip 1.0) in fp32 or under bf16 autocast, with
the same threads. Ours is the whole `train()` loop (schedule, logging, metrics.jsonl); the
peer is forward(labels=...), backward, clip, step. The steps alternate: our batch function
runs one transformers step before handing over each batch, so machine noise hits both alike.
Our step time is the time between handing over one batch and being asked for the next.
Reported: the median and the best step after two warm-up steps; on a shared machine the best
is the steadier figure. MFU = flops_per_token * tokens/s / the matmul peak measured in that
dtype right before.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

import torch

from parley.model.transformer import ModelConfig, Transformer
from parley.train.loop import TrainConfig, flops_per_token, measure_peak_flops, train
from parley.train.losses import lm_loss


def side_by_side(ours: Transformer, theirs, cfg: TrainConfig, peak: float) -> tuple[list[float], list[float]]:
    """Seconds per step of (ours, theirs), alternating step by step."""
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
    with tempfile.TemporaryDirectory() as run, contextlib.redirect_stdout(io.StringIO()):
        train(ours, cfg, run, get_batch, lm_loss, peak_flops=peak)
    our_times = [a - h for h, a in zip(handed, asked[1:])]  # the last step has no next request
    return our_times[2:], their_times[2:]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="steps of each (the first two are warm-up)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (train.compile=true)")
    args = p.parse_args()
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
    print(f"model: {shape.num_params() / 1e6:.1f}M params, seq {args.seq}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {fpt / 1e6:.0f} MFLOP per token")
    for dtype in args.dtypes.split(","):
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=1e-3, warmup_steps=1,
                          dtype=dtype, log_every=1, save_every=0, eval_every=0, compile=args.compile)
        peak = measure_peak_flops(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        ours, theirs = Transformer(shape), LlamaForCausalLM(hf_config)
        ours.load_state_dict(base.state_dict())
        theirs.load_state_dict(base.state_dict(), strict=False)  # HF keeps rotary tables as buffers
        times = dict(zip(("parley", "transformers"), side_by_side(ours, theirs, cfg, peak)))
        print(f"\n{dtype}: matmul peak {peak / 1e9:,.0f} GFLOP/s")
        speed = {}
        for name, t in times.items():
            speed[name] = median, best = tokens / statistics.median(t), tokens / min(t)
            print(f"  {name:13s} median {median:7,.0f} tok/s (MFU {fpt * median / peak:6.1%})   "
                  f"best {best:7,.0f} tok/s (MFU {fpt * best / peak:6.1%})   {len(t)} steps")
        ratios = [a / b for a, b in zip(speed["parley"], speed["transformers"])]
        print(f"  parley / transformers: {ratios[0]:.2f}x median, {ratios[1]:.2f}x best")


if __name__ == "__main__":
    main()
