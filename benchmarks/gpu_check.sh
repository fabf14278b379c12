#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) with its log: bash benchmarks/gpu_check.sh [OUT]
# [gpu_check.py options]. Run from anywhere; results land in OUT (default /tmp/gpu_check)
# as gpu_check.json and gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
shift || true
mkdir -p "$out"
# A GPU machine with torch but without ffcv or the data: benchmarks/gpu_bundle.sh packs
# into .gpu/ a build of ffcv for that machine's Python, the libraries it links, and
# Fashion-MNIST's IDX files.
if [[ -d .gpu ]] && ! python3 -c "import ffcv" 2>/dev/null; then
  export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
  export LD_LIBRARY_PATH=$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export FASHION_MNIST_DIR=$PWD/.gpu/fashion-mnist
fi
export NUMBA_THREADING_LAYER=workqueue PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
