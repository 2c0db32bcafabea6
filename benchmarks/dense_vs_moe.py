"""Dense vs mixture-of-experts at (nearly) equal compute: read two pretraining runs, plot
their validation loss against training tokens in one PNG, print a Markdown table.

    .venv/bin/python benchmarks/dense_vs_moe.py runs/pretrain-tiny runs/pretrain-tiny-moe \\
        --out benchmarks/dense_vs_moe.png

Each run folder is what `parley train pretrain` writes (config.toml, metrics.jsonl); the
parameter counts come from the registered models' metadata when they exist.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path

from parley.model.transformer import ModelConfig


def read_run(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = tomllib.loads((folder / "config.toml").read_text())
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"]
    manifest = json.loads((Path(config["data"]) / "manifest.json").read_text())
    shape = ModelConfig.from_depth(config["model"]["depth"], manifest["tokenizer"]["vocab_size"],
                                   config["model"]["context"], experts=config["model"]["experts"],
                                   experts_per_token=config["model"]["experts_per_token"])
    speeds = sorted(r["tok_per_s"] for r in train)
    return {"name": folder.name, "evals": [(e["step"] * tokens_per_step, e["val_loss"]) for e in evals],
            "final_val": evals[-1]["val_loss"], "tokens": train[-1]["tokens"],
            "tok_per_s": speeds[len(speeds) // 2], "params": shape.num_params(),
            "active": shape.num_params(active=True), "experts": shape.num_local_experts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/dense_vs_moe.png"))
    args = ap.parse_args()
    runs = [read_run(r) for r in args.runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        label = f"{r['name']} ({r['active'] / 1e6:.1f}M active / {r['params'] / 1e6:.1f}M total)"
        ax.plot([t / 1e6 for t, _ in r["evals"]], [v for _, v in r["evals"]], marker="o", ms=3, label=label)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss")
    ax.set_title("Dense vs mixture of experts, same data and steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}\n")
    print("| run | experts | total params | active params | tokens | final val loss | val ppl | median tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['name']} | {r['experts'] or '-'} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | "
              f"{r['tokens'] / 1e6:.2f}M | {r['final_val']:.3f} | {math.exp(r['final_val']):.1f} | "
              f"{r['tok_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
