#!/usr/bin/env bash
# Guard round 6 (benchmarks/RESULTS.md, "Guard, round 6"): the latency runs and v5's second round, as they were run.
#   bash benchmarks/probes/guard_round6.sh latency OLD NEW     # English messages: OLD, NEW; Russian: NEW, OLD
#   bash benchmarks/probes/guard_round6.sh v5 HEAD...          # v5 once per head (a held-out round: count it)
# The round ran `latency` with OLD the round-4 head (`git show e1ffbed:parley/data/guard/guard_head.safetensors >
# old.safetensors`) and NEW the gated head (now parley/data/guard/guard_head.safetensors), and `v5` with the gated
# head, the round-4 head, A and B (A and B are rebuilt by the commands RESULTS.md names; they are not in the repo).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
case "${1:-}" in
latency)
    old=${2:?latency wants the OLD and the NEW head files}
    new=${3:?latency wants the OLD and the NEW head files}
    for args in "--head $old" "--head $new" "--head $new --messages other" "--head $old --messages other"; do
        echo "== $args"
        OMP_NUM_THREADS=1 $PY benchmarks/guard.py --quick $args 2>&1 | grep -v '^own split'
    done ;;
v5)
    shift
    for head in "$@"; do
        echo "== $head"
        OMP_NUM_THREADS=2 $PY benchmarks/guard.py --threads 2 --heldout benchmarks/data/guard_heldout_v5 --head "$head"
    done ;;
*)
    echo "usage: $0 latency OLD NEW | v5 HEAD..." >&2
    exit 2 ;;
esac
