#!/usr/bin/env bash
# Run the benchmarks in order, from the repository root:  bash benchmarks/run_all.sh
# BENCHES="bench_loss bench_colour_ops" runs a subset. Each prints its machine line.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=src NUMBA_THREADING_LAYER=workqueue
status=0
for bench in ${BENCHES:-bench_loss bench_colour_ops bench_view_ops bench_gpu}; do
    echo; echo "=== $bench ==="
    # DatasetWriter's progress bars go to stderr; keep only its last lines.
    "$PY" "benchmarks/$bench.py" 2> >(tr '\r' '\n' | grep -v 'it/s' >&2)
    rc=$?
    if [ "$bench" = bench_gpu ] && [ "$rc" = 2 ]; then
        echo "(bench_gpu skipped: no CUDA device)"
    elif [ "$rc" != 0 ]; then
        echo "$bench failed with status $rc"; status=1
    fi
done
exit $status
