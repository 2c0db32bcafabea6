#!/usr/bin/env bash
# Alignment round 7 (benchmarks/RESULTS.md, "Alignment, issue 12 (seventh round)"), the rule's runs in order,
# unattended. runs/ is not in git: the chain starts from the corpus, rebuilds round 5's run B (the recipe as
# committed) and registers its step 200 as smollm2-aligned, then DPO on balanced pairs with a checkpoint every
# 10 steps, each scored once on dev beside the rebuilt B 200.
#   bash benchmarks/probes/align_round7.sh train        # corpus, run B, smollm2-aligned, balanced DPO, dev scores
#   bash benchmarks/probes/align_round7.sh v6 MODEL...  # after the rule's decision: v6 once (count the round)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
case "${1:-}" in
train)
    test -f runs/corpus/dialogs-train.jsonl || $BIN/parley data prepare runs/corpus sources=chitchat sources=chatterbot
    test -f runs/cai-b/checkpoints/step-000200/model.safetensors ||
        OMP_NUM_THREADS=2 $BIN/parley train constitutional recipes/align-constitutional.toml run=runs/cai-b \
            name=smollm2-cai-b > runs/cai-b.log 2>&1
    $BIN/python benchmarks/probes/register_checkpoint.py runs/cai-b 200 smollm2-aligned
    $BIN/python benchmarks/probes/balance_pairs.py runs/cai-b/pairs.jsonl runs/dpo7-pairs.jsonl
    OMP_NUM_THREADS=2 $BIN/parley train dpo recipes/align-dpo.toml pairs=runs/dpo7-pairs.jsonl base=smollm2-aligned \
        name=smollm2-dpo7 run=runs/dpo7 train.steps=50 train.warmup_steps=5 train.save_every=10 \
        train.keep_checkpoints=5 > runs/dpo7.log 2>&1
    for model in smollm2-aligned smollm2-dpo7-10 smollm2-dpo7-20 smollm2-dpo7-30 smollm2-dpo7-40 smollm2-dpo7-50; do
        step=${model#smollm2-dpo7-}
        [ "$step" = "$model" ] || $BIN/python benchmarks/probes/register_checkpoint.py runs/dpo7 "$step" "$model"
        OMP_NUM_THREADS=2 $BIN/python benchmarks/alignment.py --heldout dev --models "$model" \
            --dialogs runs/corpus/dialogs-val.jsonl --out "runs/dev-$model.json" > "runs/dev-$model.log" 2>&1
    done
    $BIN/python benchmarks/alignment.py --report runs/dev-smollm2-aligned.json runs/dev-smollm2-dpo7-{10,20,30,40,50}.json ;;
v6)  # as round 6 ran it
    shift
    bash benchmarks/probes/align_round6.sh v6 "$@" ;;
*)
    echo "usage: $0 train | v6 MODEL..." >&2
    exit 2 ;;
esac
