#!/usr/bin/env bash
# Alignment round 9 (benchmarks/RESULTS.md, "Alignment, issue 12 (ninth round)"), the rule's runs in order,
# unattended: round 8's chain (smollm2-cai, GRPO, smollm2-rl8-30) if this machine lacks it, the prompts file with a
# quarter of its requests to decline, the second GRPO stage (recipes/align-rl-benign.toml) with a checkpoint every
# 10 steps, each scored once on dev.
#   bash benchmarks/probes/align_round9.sh train             # prompts, GRPO, dev scores, the report
#   bash benchmarks/probes/align_round9.sh keep STEP          # the rule's choice registered as smollm2-aligned
#   bash benchmarks/probes/align_round9.sh v6 MODEL...        # after the rule's decision: v6 once (count the round)
#   bash benchmarks/probes/align_round9.sh v7 MODEL...        # the same on v7 (its first alignment round)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
case "${1:-}" in
train)
    $BIN/parley models list 2>/dev/null | grep '^smollm2-rl8-30\b' >/dev/null || bash benchmarks/probes/align_round8.sh train
    $BIN/python benchmarks/probes/align_prompts.py --harmful-share 0.25 --seed 0 --out runs/rl9-prompts.jsonl
    OMP_NUM_THREADS=2 $BIN/parley train rl recipes/align-rl-benign.toml > runs/rl9.log 2>&1
    bash benchmarks/probes/align_dev.sh runs/rl9 smollm2-rl9 runs/dev-smollm2-rl8-30.json 10 20 30 40 ;;
keep)  # the rule's choice
    $BIN/python benchmarks/probes/register_checkpoint.py runs/rl9 "$2" smollm2-aligned ;;
v6|v7)
    set="benchmarks/data/guard_heldout_$1"
    shift
    for model in "$@"; do
        OMP_NUM_THREADS=2 $BIN/python benchmarks/alignment.py --heldout "$set" \
            --models "$model" --dialogs runs/corpus/dialogs-val.jsonl --out "runs/$(basename "$set")-$model.json"
    done ;;
*)
    echo "usage: $0 train | keep STEP | v6 MODEL... | v7 MODEL..." >&2
    exit 2 ;;
esac
