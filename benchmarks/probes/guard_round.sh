#!/usr/bin/env bash
# Guard rounds 7 to 10 (benchmarks/RESULTS.md, "Guard, round 7" .. "Guard, round 10"): the runs as they were made
# (runs/ is not in git). ROUND is 7, 8, 9 or 10; each round trains from the data of its commit.
#   bash benchmarks/probes/guard_round.sh ROUND train          # A (English head), then B + C (gated) in one run
#   bash benchmarks/probes/guard_round.sh ROUND own HEAD       # a head's own-split figures, fp32 (S: the shipped one)
#   bash benchmarks/probes/guard_round.sh ROUND flips HEAD...  # mE5 head decisions, fp32 against the shipped 'auto'
#   bash benchmarks/probes/guard_round.sh ROUND latency HEAD...  # English then Russian messages, one thread each;
#                                                                # REPEAT=5 goes through the heads five times, alternating
#   bash benchmarks/probes/guard_round.sh ROUND v6 HEAD...     # v6 once per head (a held-out round: count it)
#   bash benchmarks/probes/guard_round.sh ROUND v7 HEAD...     # v7 the same way (round 9 on)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
round=${1:?usage: $0 ROUND train | own HEAD | flips HEAD... | latency HEAD... | v6 HEAD... | v7 HEAD...}
what=${2:-}
shift 2 || true
runs=runs/g$round
case "$what" in
train)
    mkdir -p $runs
    OMP_NUM_THREADS=2 $PY -m parley train guard --design encoder --out $runs/A.safetensors > $runs/A.log 2>&1
    # writes $runs/C.safetensors (gated) and $runs/C.me5.safetensors (B, the mE5 head alone); its log
    # reports both on the own splits
    OMP_NUM_THREADS=2 $PY -m parley train guard --trunk me5 --dropout 0.2 --gate-with $runs/A.safetensors \
        --out $runs/C.safetensors > $runs/C.log 2>&1 ;;
own)
    OMP_NUM_THREADS=1 $PY benchmarks/guard.py --threads 1 --precision fp32 --head "${1:?own wants a head file}" ;;
flips)
    for head in "$@"; do echo "== $head"; OMP_NUM_THREADS=2 $PY benchmarks/probes/guard_precision.py --head "$head"; done ;;
latency)
    # repeated passes time the messages alone; one pass reads --quick's own split first, as rounds 7 and 8 did
    only=$([ "${REPEAT:-1}" -gt 1 ] && echo --latency-only || true)
    for pass in $(seq "${REPEAT:-1}"); do
        for head in "$@"; do
            for messages in english other; do
                echo "== pass $pass, $head, $messages"
                OMP_NUM_THREADS=1 $PY benchmarks/guard.py --quick --head "$head" --messages $messages $only 2>&1 |
                    grep -v '^own split'
            done
        done
    done ;;
v6|v7)
    for head in "$@"; do
        echo "== $head"
        OMP_NUM_THREADS=2 $PY benchmarks/guard.py --threads 2 --heldout benchmarks/data/guard_heldout_$what --head "$head"
    done ;;
*)
    echo "usage: $0 ROUND train | own HEAD | flips HEAD... | latency HEAD... | v6 HEAD... | v7 HEAD..." >&2
    exit 2 ;;
esac
