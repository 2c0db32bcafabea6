"""Muon vs AdamW on the tiny recipe's model and data, side by side at equal steps and tokens.

    PYTHONPATH=. .venv/bin/python benchmarks/muon.py --jobs 4        # 4 runs of 250 steps: ~30 min of one core
    PYTHONPATH=. .venv/bin/python benchmarks/muon.py --steps 20 --adamw-lrs 3e-3 --muon-lrs 0.02 --no-record

Every run is `parley train pretrain recipes/pretrain-tiny.toml` (the stage itself, in a fresh
process, registering into a throw-away PARLEY_HOME under --out) with the steps cut from the
recipe's 1,200 to --steps and the warm-up cut in proportion (100/1200 of the run), cosine to
10%, one thread. The model (depth 4, 5.05M parameters), batches (16 x 256 tokens), seeds, data
order and held-out batches are the recipe's and the same for every run. AdamW runs once per
--adamw-lrs; Muon once per --muon-lrs, on the matrices inside the layers, with AdamW at the
recipe's lr (3e-3) for embeddings and norms. Needs .data/corpus tokenized with
runs/tokenizer-8k (README, "Training"). Prints a Markdown table and appends it to RESULTS.md
(unless --no-record). On a shared machine compare CPU times: a one-thread run's CPU time is
its compute, its wall time adds the waiting for a core.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from record import append_section, commit, cpu_name

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/pretrain-tiny.toml"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_run(name: str, out: Path, steps: int, eval_every: int, overrides: list[str]) -> dict:
    """Train one configuration with the pretrain stage; return its held-out losses and times."""
    from parley.config import parse_cli
    from parley.train import pretrain

    torch.set_num_threads(1)
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    warmup = max(1, round(steps * 100 / 1200))
    argv = [str(RECIPE), f"run={run}", f"name=bench-{name}", f"train.steps={steps}", f"train.warmup_steps={warmup}",
            f"train.eval_every={eval_every}", f"train.save_every={steps}", "train.keep_checkpoints=1", *overrides]
    cfg = parse_cli(pretrain.PretrainConfig, argv, prog="benchmarks/muon.py")
    start, cpu = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):  # the progress lines; metrics.jsonl keeps them
        final = pretrain.main(cfg)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    print(f"{name}: val loss {final['val_loss']:.4f} after {steps} steps, {cpu / 60:.1f} CPU min", flush=True)
    return {"name": name, "evals": evals, "tokens": final["tokens"], "wall": wall, "cpu": cpu,
            "tok_per_s": final.get("run_tok_per_s", 0.0)}


def table(results: list[dict]) -> str:
    steps = sorted(set.intersection(*(set(r["evals"]) for r in results)))
    lines = ["| run | " + " | ".join(f"val loss @ {s}" for s in steps) + " | tokens | CPU time | wall | tok/s (wall) |",
             "|---|" + "---|" * (len(steps) + 4)]
    for r in results:
        losses = " | ".join(f"{r['evals'][s]:.3f}" for s in steps)
        lines.append(f"| {r['name']} | {losses} | {r['tokens'] / 1e6:.2f}M | {r['cpu'] / 60:.1f} min | "
                     f"{r['wall'] / 60:.1f} min | {r['tok_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps per run (the recipe has 1200)")
    ap.add_argument("--eval-every", type=int, default=50, help="held-out evaluation every N steps and at the end")
    ap.add_argument("--adamw-lrs", default="3e-3,6e-3", help="AdamW peak learning rates, comma-separated")
    ap.add_argument("--muon-lrs", default="0.02,0.04", help="Muon peak learning rates (train.muon_lr)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one process (and one thread) each")
    ap.add_argument("--out", type=Path, default=REPO / "runs/muon-bench", help="run folders and throw-away home")
    ap.add_argument("--no-record", action="store_true", help="print the table without appending to RESULTS.md")
    args = ap.parse_args()
    if args.steps < 2 or args.eval_every < 1 or args.jobs < 1:
        ap.error("--steps must be at least 2, --eval-every and --jobs at least 1")
    try:
        adamw = [float(x) for x in args.adamw_lrs.split(",") if x]
        muon = [float(x) for x in args.muon_lrs.split(",") if x]
    except ValueError:
        ap.error("--adamw-lrs and --muon-lrs take comma-separated numbers, e.g. 3e-3,6e-3")
    if not adamw + muon or min(adamw + muon) <= 0:
        ap.error("give at least one positive learning rate")
    for need in (".data/corpus/manifest.json", "runs/tokenizer-8k"):
        if not (REPO / need).exists():
            raise SystemExit(f"{need} is missing: build the data as README.md 'Training' shows")
    os.chdir(REPO)  # the recipe's paths are relative to the repository
    args.out = args.out.resolve()
    os.environ["PARLEY_HOME"] = str(args.out / "home")  # the stage registers its model: not in the real home
    os.environ["OMP_NUM_THREADS"] = "1"

    runs = [(f"adamw-lr{lr:g}", [f"train.lr={lr}"]) for lr in adamw]
    runs += [(f"muon-lr{lr:g}", ["train.optimizer=muon", f"train.muon_lr={lr}"]) for lr in muon]
    # spawned processes: each run starts fresh, as `parley train pretrain` would
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(one_run, name, args.out, args.steps, args.eval_every, overrides)
                   for name, overrides in runs]
        results = [f.result() for f in futures]
    text = table(results)
    print("\n" + text)
    if args.no_record:
        return
    append_section(
        f"\n## Muon vs AdamW, the tiny recipe cut to {args.steps} steps ({time.strftime('%Y-%m-%d')}, "
        f"commit {commit()})\n\n"
        f"`PYTHONPATH=. .venv/bin/python benchmarks/muon.py --steps {args.steps} --adamw-lrs {args.adamw_lrs} "
        f"--muon-lrs {args.muon_lrs} --jobs {args.jobs}` on {cpu_name()}: one thread per run, {args.jobs} at once, "
        f"on a machine shared with other work, so compare CPU times (wall time adds the waiting for a core; "
        f"tok/s is per wall second). recipes/pretrain-tiny.toml's model, data and batches, {args.steps} of its "
        f"1,200 steps with the warm-up cut in proportion; held-out loss over the same 16 validation batches at "
        f"equal steps and tokens. Muon runs keep AdamW at the recipe's 3e-3 for embeddings and norms.\n\n{text}\n")


if __name__ == "__main__":
    main()
