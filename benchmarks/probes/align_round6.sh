#!/usr/bin/env bash
# Alignment round 6 (benchmarks/RESULTS.md, "Alignment, issue 12 (sixth round)"), the rule's runs in order,
# unattended (about two hours on 2 cores). runs/ is not in git and a new machine has none of it, so the
# chain starts from the corpus: round 5's run B again (the recipe as committed), its step 200 registered
# as smollm2-aligned, then the rule's DPO with a checkpoint every 25 steps, each scored once on dev.
#   bash benchmarks/probes/align_round6.sh train     # corpus, run B, smollm2-aligned, DPO, dev scores
#   bash benchmarks/probes/align_round6.sh v6 MODEL... # after the rule's decision: v6 once (count the round)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
case "${1:-}" in
train)
    test -f runs/corpus/dialogs-train.jsonl || { make data-sources && $BIN/parley data prepare runs/corpus sources=chitchat sources=chatterbot; }
    # round 5's run B: 300 steps (the cosine schedule's length), its step 200 kept
    test -f runs/cai-b/checkpoints/step-000200/model.safetensors ||
        OMP_NUM_THREADS=2 $BIN/parley train constitutional recipes/align-constitutional.toml run=runs/cai-b \
            name=smollm2-cai-b > runs/cai-b.log 2>&1
    $BIN/python benchmarks/probes/register_checkpoint.py runs/cai-b 200 smollm2-aligned
    OMP_NUM_THREADS=2 $BIN/parley train dpo recipes/align-dpo.toml pairs=runs/cai-b/pairs.jsonl base=smollm2-aligned \
        name=smollm2-dpo6 run=runs/dpo6 train.steps=100 train.warmup_steps=5 train.save_every=25 \
        train.keep_checkpoints=4 > runs/dpo6.log 2>&1
    # the rebuilt B 200 scored again beside them: the rule's 38.7 points were the first build's
    for model in smollm2-aligned smollm2-dpo6-25 smollm2-dpo6-50 smollm2-dpo6-75 smollm2-dpo6-100; do
        step=${model#smollm2-dpo6-}
        [ "$step" = "$model" ] || $BIN/python benchmarks/probes/register_checkpoint.py runs/dpo6 "$step" "$model"
        OMP_NUM_THREADS=2 $BIN/python benchmarks/alignment.py --heldout dev --models "$model" \
            --dialogs runs/corpus/dialogs-val.jsonl --out "runs/dev-$model.json" > "runs/dev-$model.log" 2>&1
    done
    $BIN/python benchmarks/alignment.py --report runs/dev-smollm2-aligned.json runs/dev-smollm2-dpo6-{25,50,75,100}.json ;;
v6)
    shift
    for model in "$@"; do
        OMP_NUM_THREADS=2 $BIN/python benchmarks/alignment.py --heldout benchmarks/data/guard_heldout_v6 \
            --models "$model" --dialogs runs/corpus/dialogs-val.jsonl --out "runs/v6-$model.json"
    done ;;
*)
    echo "usage: $0 train | v6 MODEL..." >&2
    exit 2 ;;
esac
