#!/usr/bin/env bash
# Alignment round 12 (benchmarks/RESULTS.md, "Alignment, issue 12 (twelfth round)"): round 11's runs with the answers
# outweighing the refusals: round 11's decisions and targets reused (runs/sft11/dataset.jsonl, so round 11 first), a
# refusal only for the requests to be declined that smollm2-rl9-10 answered, SFT at twice the learning rate for longer
# (recipes/align-sft-answers-missed.toml), a checkpoint every 40 steps, each scored once on dev.
#   bash benchmarks/probes/align_round12.sh train | keep STEP | v6|v7 MODEL...
set -euo pipefail
cd "$(dirname "$0")/../.."
test -f runs/sft11/dataset.jsonl || bash benchmarks/probes/align_round11.sh train
R=12 STEPS="40 80 120 160 200" RECIPE=recipes/align-sft-answers-missed.toml \
    DATA="--reuse runs/sft11/dataset.jsonl --harmful missed" exec bash benchmarks/probes/align_round11.sh "$@"
