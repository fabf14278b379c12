#!/usr/bin/env bash
# Run every benchmark in order, from the repository root:  bash benchmarks/run_all.sh
# Prints the machine, the date and the load first: the timed benchmarks compare two
# variants side by side in one run (ratios), but a loaded machine still adds noise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=src NUMBA_THREADING_LAYER=workqueue
echo "date: $(date -u)"
echo "machine: $(nproc) cores, $(lscpu | grep 'Model name' | sed 's/ \+/ /g')"
echo "load: $(uptime | sed 's/.*load average: //')"
status=0
# BENCHES="bench_loss bench_comm" runs a subset.
for bench in ${BENCHES:-bench_comm bench_loss bench_step bench_loader bench_augment bench_gpu}; do
    echo; echo "=== $bench ==="
    # DatasetWriter's progress bars go to stderr; keep only its last lines.
    "$PY" "benchmarks/$bench.py" 2> >(tr '\r' '\n' | grep -v 'it/s' >&2)
    rc=$?
    if [ "$bench" = bench_gpu ] && [ "$rc" = 2 ]; then
        echo "(bench_gpu skipped: no CUDA device)"
    elif [ "$rc" != 0 ]; then
        echo "$bench failed with status $rc"; status=1
    fi
    echo "load after: $(uptime | sed 's/.*load average: //')"
done
exit $status
