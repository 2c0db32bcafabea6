"""One benchmark script, run on an earlier commit and on this tree, alternating, in one run.

    .venv/bin/python benchmarks/before_after.py --before c5e8043 -- decode.py --repeats 3 --no-write
    .venv/bin/python benchmarks/before_after.py --before c5e8043 --rounds 2 --write -- prefill.py

The earlier commit is checked out into a temporary git worktree (removed afterwards); the
script runs there with that tree's code (PYTHONPATH) and then here with this tree's, `--rounds`
times, so a drift in the machine's speed hits both. Each run's output is printed as it comes;
with --write, both outputs go to RESULTS.md verbatim, under the date, the machine and the
command. The script's own arguments follow `--`; keep its own writing off (decode.py
--no-write; prefill.py and serve.py write only with --write), so each figure is written once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from record import append_section, commit, cpu_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(tree: Path, script: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "benchmarks" / script), *args]
    print(f"$ (in {tree}) {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed in {tree} (status {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--rounds", type=int, default=1, help="before/after pairs to run")
    ap.add_argument("--write", action="store_true", help="append both outputs to benchmarks/RESULTS.md")
    ap.add_argument("script", help="a script in benchmarks/, e.g. decode.py")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1 (got {args.rounds})")
    if not (HERE / args.script).is_file():
        ap.error(f"no script benchmarks/{args.script}")
    before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True)
    if before.returncode != 0:
        ap.error(f"--before {args.before!r} is not a commit of this repository")
    rev = before.stdout.strip()
    outputs: dict[str, list[str]] = {rev: [], "this tree": []}
    with tempfile.TemporaryDirectory(prefix="parley-before-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for _ in range(args.rounds):
                outputs[rev].append(run(old, args.script, args.args))
                outputs["this tree"].append(run(ROOT, args.script, args.args))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    if args.write:
        lines = [f"\n## Before and after: {args.script} at {rev} and at {commit()} ({datetime.date.today()})\n",
                 f"Machine: {cpu_name(flags=True)}, {os.cpu_count()} cores. Command: `.venv/bin/python "
                 f"benchmarks/before_after.py --before {rev} --rounds {args.rounds} --write -- {args.script} "
                 f"{' '.join(args.args)}`. The two trees ran alternately in one run, {rev} first in each round; "
                 "their outputs, verbatim:\n"]
        for name, runs in outputs.items():
            for i, out in enumerate(runs, 1):
                lines += [f"{name}, round {i}:", "```", out.strip(), "```"]
        append_section("\n".join(lines))


if __name__ == "__main__":
    main()
