#!/usr/bin/env bash
# The alignment rounds' checkpoint sweep (issue 12; align_round8.sh to align_round12.sh): each checkpoint STEP of a
# LoRA run registered as NAME-STEP, scored once on the dev split (runs/dev-NAME-STEP.json and .log), then one report
# of the round's starting model (its dev json) beside them.
#   bash benchmarks/probes/align_dev.sh RUN NAME START_JSON STEP...
#   bash benchmarks/probes/align_dev.sh runs/rl10 smollm2-rl10 runs/dev-smollm2-rl9-10.json 5 10 15 20
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
if [ $# -lt 4 ]; then
    echo "usage: $0 RUN NAME START_JSON STEP..." >&2
    exit 2
fi
run=$1 name=$2 start=$3
shift 3
reports=()
for step in "$@"; do
    $BIN/python benchmarks/probes/register_checkpoint.py "$run" "$step" "$name-$step"
    OMP_NUM_THREADS=2 $BIN/python benchmarks/alignment.py --heldout dev --models "$name-$step" \
        --dialogs runs/corpus/dialogs-val.jsonl --out "runs/dev-$name-$step.json" > "runs/dev-$name-$step.log" 2>&1
    reports+=("runs/dev-$name-$step.json")
done
$BIN/python benchmarks/alignment.py --report "$start" "${reports[@]}"
