#!/usr/bin/env bash
# Guard round 7 (benchmarks/RESULTS.md, "Guard, round 7"): the runs as they were made (runs/ is not in git).
#   bash benchmarks/probes/guard_round7.sh train              # A7 (English head), then B7 + C7 in one run
#   bash benchmarks/probes/guard_round7.sh own HEAD           # a head's own-split figures (S: the shipped one)
#   bash benchmarks/probes/guard_round7.sh flips HEAD...      # mE5 head decisions, fp32 against the shipped 'auto'
#   bash benchmarks/probes/guard_round7.sh latency HEAD...    # English then Russian messages, one thread each
#   bash benchmarks/probes/guard_round7.sh v6 HEAD...         # v6 once per head (a held-out round: count it)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
what=${1:-}
shift || true
case "$what" in
train)
    mkdir -p runs/g7
    OMP_NUM_THREADS=2 $PY -m parley train guard --design encoder --out runs/g7/A.safetensors > runs/g7/A.log 2>&1
    # writes runs/g7/C.safetensors (gated) and runs/g7/C.me5.safetensors (B7, the mE5 head alone); its log
    # reports both on the own splits
    OMP_NUM_THREADS=2 $PY -m parley train guard --trunk me5 --dropout 0.2 --gate-with runs/g7/A.safetensors \
        --out runs/g7/C.safetensors > runs/g7/C.log 2>&1 ;;
own)
    OMP_NUM_THREADS=1 $PY benchmarks/guard.py --threads 1 --precision fp32 --head "${1:?own wants a head file}" ;;
flips)
    for head in "$@"; do echo "== $head"; OMP_NUM_THREADS=2 $PY benchmarks/probes/guard_precision.py --head "$head"; done ;;
latency)
    for head in "$@"; do
        for messages in english other; do
            echo "== $head, $messages"
            OMP_NUM_THREADS=1 $PY benchmarks/guard.py --quick --head "$head" --messages $messages 2>&1 | grep -v '^own split'
        done
    done ;;
v6)
    for head in "$@"; do
        echo "== $head"
        OMP_NUM_THREADS=2 $PY benchmarks/guard.py --threads 2 --heldout benchmarks/data/guard_heldout_v6 --head "$head"
    done ;;
*)
    echo "usage: $0 train | own HEAD | flips HEAD... | latency HEAD... | v6 HEAD..." >&2
    exit 2 ;;
esac
