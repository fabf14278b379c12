#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on a GPU machine that has Python 3.12 with
# torch, numba, numpy, opencv and Pillow but no ffcv, no system libraries for it and no
# network: .gpu/site (ffcv 1.0.2 built here for Python 3.12), .gpu/lib (the shared
# libraries its extension links: OpenCV core/imgproc, libjpeg-turbo and their
# dependencies, from this Debian machine) and .gpu/fashion-mnist (Debian's IDX files).
# About 55 MB. Needs a python3.12 (PY312=...), pkg-config, libopencv-dev,
# libturbojpeg0-dev and dataset-fashion-mnist (scripts/setup.sh installs the last three).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PY312:-} ]]; then
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$candidate; break
    fi
  done
fi
[[ -n ${PY312:-} ]] || { echo "gpu_bundle: no Python 3.12 found; set PY312=/path/to/python3.12" >&2; exit 1; }
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
"$PY312" -m venv "$build/venv"
"$build/venv/bin/pip" -q install setuptools wheel
"$build/venv/bin/pip" -q download --no-deps --no-binary ffcv ffcv==1.0.2 -d "$build"
tar -xzf "$build"/ffcv-1.0.2.tar.gz -C "$build"
(cd "$build/ffcv-1.0.2" && "$build/venv/bin/python" setup.py -q build_ext --inplace >/dev/null)
rm -rf .gpu && mkdir -p .gpu/site .gpu/lib .gpu/fashion-mnist
cp -r "$build/ffcv-1.0.2/ffcv" .gpu/site/
# Every library the extension pulls in except the C/C++ runtime, which the GPU
# machine's (newer) system provides.
ldd .gpu/site/ffcv/_libffcv*.so | awk '/=> \//{print $3}' \
  | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libz|ld-linux[^/]*)\.so' \
  | while read -r lib; do cp -L "$lib" .gpu/lib/; done
cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
du -sh .gpu
