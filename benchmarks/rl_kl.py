"""Reward against KL spent for GRPO runs that differ only in the KL coefficient (issue 12): one PNG.

    PARLEY_HOME=... python benchmarks/rl_kl.py                       # kl_coef 0, 0.05, 0.2 (recipes/rl-grpo.toml)
    python benchmarks/rl_kl.py --quick                               # 4 steps each: a check that it runs
    python benchmarks/rl_kl.py --coefs 0 0.1 --steps 20 --out benchmarks/out/rl_kl
    python benchmarks/rl_kl.py --plot-only                           # plot runs that are already there

Needs the reward model the recipe names (`parley train reward recipes/reward-rails.toml`). Each run
goes to OUT/kl-COEF (LoRA, not registered); the figures are the means over the last third of the
steps (at least 2) of the logged reward (reward model + rails) and KL (nats per answer, k3 summed
over its tokens). Writes OUT/rl_kl.json and benchmarks/rl_kl.png. Runs one after the other, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tail_mean(records: list[dict], key: str) -> float:
    part = records[-max(2, len(records) // 3):]
    return sum(r[key] for r in part) / len(part)


def run_one(coef: float, steps: int, out: Path, recipe: Path, train: bool = True) -> dict:
    from parley.config import load_config
    from parley.train.rl import RLConfig, main

    run = out / f"kl-{coef:g}"
    if train:
        resume = (run / "checkpoints").is_dir()  # a sweep that was stopped goes on where it was
        main(load_config(RLConfig, recipe, [f"kl_coef={coef}", f"run={run}", f"train.steps={steps}",
                                            "register=false", f"resume={str(resume).lower()}"]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "reward" in r]
    return {"kl_coef": coef, "steps": steps, "reward": tail_mean(records, "reward"), "kl": tail_mean(records, "kl"),
            "reward_first": records[0]["reward"], "refusal_rate": tail_mean(records, "refusal_rate"),
            "length": tail_mean(records, "length"),
            "curve": [{k: r[k] for k in ("step", "reward", "kl", "refusal_rate", "length")} for r in records]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        ax.scatter(r["kl"], r["reward"], s=60)
        ax.annotate(f"kl_coef={r['kl_coef']:g}", (r["kl"], r["reward"]), textcoords="offset points", xytext=(6, 4))
        bx.plot([c["step"] for c in r["curve"]], [c["reward"] for c in r["curve"]], label=f"kl_coef={r['kl_coef']:g}")
    ax.set(xlabel="KL to the base (nats per answer, mean of the last third of steps)",
           ylabel="reward (the recipe's parts, summed)", title="GRPO on SmolLM2-135M: reward vs KL spent")
    bx.set(xlabel="step", ylabel="reward (batch mean)", title="reward per step")
    for a in (ax, bx):
        a.grid(alpha=0.3)
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="4 steps per run")
    parser.add_argument("--plot-only", action="store_true",
                        help="train nothing: plot the runs already in OUT/kl-COEF (e.g. run one process per coef first)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "rl-grpo.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "rl_kl")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "rl_kl.png")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps = 4 if args.quick else args.steps
    rows = [run_one(c, steps, args.out, args.recipe, train=not args.plot_only) for c in args.coefs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rl_kl.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.png)
    for r in rows:
        print(f"kl_coef {r['kl_coef']:<5g} reward {r['reward_first']:+.3f} -> {r['reward']:+.3f}  KL {r['kl']:.3f} nats"
              f"  refusal rate {r['refusal_rate']:.2f}  length {r['length']:.1f}")
    print(f"wrote {args.png} and {args.out / 'rl_kl.json'}")


if __name__ == "__main__":
    main()
