#!/usr/bin/env bash
# Alignment round 8 (benchmarks/RESULTS.md, "Alignment, issue 12 (eighth round)"), the rule's runs in order,
# unattended: round 5's run B (the constitutional recipe) with its step 200 registered as smollm2-cai, then GRPO
# (recipes/align-rl.toml) from it with a checkpoint every 10 steps, each scored once on dev; the rule kept step 30,
# which `aligned` registers as smollm2-aligned. The whole chain from a bare machine, about 90 minutes on 2 cores:
#   bash benchmarks/probes/align_round8.sh train        # corpus, run B, smollm2-cai, GRPO, dev scores
#   bash benchmarks/probes/align_round8.sh aligned      # step 30 of the GRPO run registered as smollm2-aligned
#   bash benchmarks/probes/align_round8.sh v6 MODEL...  # after the rule's decision: v6 once (count the round)
# (The round itself ran with run B's step 200 registered as smollm2-aligned, the same weights as smollm2-cai.)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
case "${1:-}" in
train)
    test -f runs/corpus/dialogs-train.jsonl || $BIN/parley data prepare runs/corpus sources=chitchat sources=chatterbot
    test -f runs/cai-b/checkpoints/step-000200/model.safetensors ||
        OMP_NUM_THREADS=2 $BIN/parley train constitutional recipes/align-constitutional.toml run=runs/cai-b \
            name=smollm2-cai-b > runs/cai-b.log 2>&1
    $BIN/parley models list 2>/dev/null | grep '^smollm2-cai\b' >/dev/null ||
        $BIN/python benchmarks/probes/register_checkpoint.py runs/cai-b 200 smollm2-cai
    test -f runs/dev-smollm2-cai.json ||
        OMP_NUM_THREADS=2 $BIN/python benchmarks/alignment.py --heldout dev --models smollm2-cai \
            --dialogs runs/corpus/dialogs-val.jsonl --out runs/dev-smollm2-cai.json > runs/dev-smollm2-cai.log 2>&1
    OMP_NUM_THREADS=2 $BIN/parley train rl recipes/align-rl.toml > runs/rl8.log 2>&1
    bash benchmarks/probes/align_dev.sh runs/rl8 smollm2-rl8 runs/dev-smollm2-cai.json 10 20 30 40 ;;
aligned)  # the rule's choice
    $BIN/python benchmarks/probes/register_checkpoint.py runs/rl8 30 smollm2-aligned ;;
v6)  # as round 6 ran it
    shift
    bash benchmarks/probes/align_round6.sh v6 "$@" ;;
*)
    echo "usage: $0 train | aligned | v6 MODEL..." >&2
    exit 2 ;;
esac
