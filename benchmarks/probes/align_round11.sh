#!/usr/bin/env bash
# Alignment round 11 (benchmarks/RESULTS.md, "Alignment, issue 12 (eleventh round)"), the rule's runs in order,
# unattended: round 9's chain if this machine lacks its step 10 (smollm2-rl9-10), the SFT data (targets that answer
# for the look-alikes smollm2-rl9-10 declines, principle refusals for every request to decline), SFT with the anchor
# (recipes/align-sft-answers.toml) with a checkpoint every 25 steps, each scored once on dev.
#   bash benchmarks/probes/align_round11.sh train             # data, SFT, dev scores, the report
#   bash benchmarks/probes/align_round11.sh keep STEP          # the rule's choice registered as smollm2-aligned
#   bash benchmarks/probes/align_round11.sh v6|v7 MODEL...     # after the rule's decision: once each (count the round)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
# round 12 (align_round12.sh) runs this script with its own data, recipe and checkpoints
R=${R:-11}
STEPS=${STEPS:-"25 50 75 100 125 150"}
RECIPE=${RECIPE:-recipes/align-sft-answers.toml}
DATA=${DATA:-"--model smollm2-rl9-10 --teacher smollm2"}
case "${1:-}" in
train)
    $BIN/parley models list 2>/dev/null | grep '^smollm2-rl9-10\b' >/dev/null || bash benchmarks/probes/align_round9.sh train
    # shellcheck disable=SC2086  # DATA is a list of arguments
    test -f runs/sft$R/dialogs-train.jsonl ||
        OMP_NUM_THREADS=2 $BIN/python benchmarks/probes/align_answer_targets.py $DATA --out runs/sft$R > runs/sft$R-data.log 2>&1
    OMP_NUM_THREADS=2 $BIN/parley train sft "$RECIPE" > runs/sft$R.log 2>&1
    # shellcheck disable=SC2086  # STEPS is a list of steps
    bash benchmarks/probes/align_dev.sh runs/align-sft$R smollm2-sft$R runs/dev-smollm2-rl9-10.json $STEPS ;;
keep)
    $BIN/python benchmarks/probes/register_checkpoint.py runs/align-sft$R "$2" smollm2-aligned ;;
v6|v7)
    bash benchmarks/probes/align_round9.sh "$@" ;;
*)
    echo "usage: $0 train | keep STEP | v6 MODEL... | v7 MODEL..." >&2
    exit 2 ;;
esac
