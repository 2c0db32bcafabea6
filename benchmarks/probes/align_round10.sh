#!/usr/bin/env bash
# Alignment round 10 (benchmarks/RESULTS.md, "Alignment, issue 12 (tenth round)"), the rule's runs in order,
# unattended: round 9's chain if this machine lacks its step 10 (smollm2-rl9-10), then the third GRPO stage
# (recipes/align-rl-cost.toml) with a checkpoint every 5 steps, each scored once on dev.
#   bash benchmarks/probes/align_round10.sh train             # GRPO, dev scores, the report
#   bash benchmarks/probes/align_round10.sh keep STEP          # the rule's choice registered as smollm2-aligned
#   bash benchmarks/probes/align_round10.sh v6|v7 MODEL...     # after the rule's decision: once each (count the round)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
case "${1:-}" in
train)
    $BIN/parley models list 2>/dev/null | grep '^smollm2-rl9-10\b' >/dev/null || bash benchmarks/probes/align_round9.sh train
    test -f runs/rl9-prompts.jsonl ||
        $BIN/python benchmarks/probes/align_prompts.py --harmful-share 0.25 --seed 0 --out runs/rl9-prompts.jsonl
    OMP_NUM_THREADS=2 $BIN/parley train rl recipes/align-rl-cost.toml > runs/rl10.log 2>&1
    bash benchmarks/probes/align_dev.sh runs/rl10 smollm2-rl10 runs/dev-smollm2-rl9-10.json 5 10 15 20 ;;
keep)
    $BIN/python benchmarks/probes/register_checkpoint.py runs/rl10 "$2" smollm2-aligned ;;
v6|v7)
    bash benchmarks/probes/align_round9.sh "$@" ;;
*)
    echo "usage: $0 train | keep STEP | v6 MODEL... | v7 MODEL..." >&2
    exit 2 ;;
esac
