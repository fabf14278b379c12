#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: system packages, the pinned .venv, DVC settings.
# Fast when everything is present (a few dpkg/stat checks), so `make repro` and
# `make test` call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

# What FFCV 1.0.2 needs to compile (opencv4 and turbojpeg through pkg-config), plus the
# embedded data set. build-essential/python3-dev/libgl1 are absent from bare images.
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev build-essential python3-dev libgl1
              dataset-fashion-mnist)
PYTHON=${PYTHON:-python3}
VENV=.venv

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ -f /etc/debian_version && $(id -u) == 0 ]]; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    cat >&2 <<MSG
setup: missing system packages: ${missing[*]}
  This step installs them itself only on Debian/Ubuntu as root. Install by hand:
    Debian/Ubuntu:  sudo apt-get install ${missing[*]}
    elsewhere:      a C++ compiler, pkg-config, OpenCV 4 and libjpeg-turbo development
                    files (FFCV builds against them), and the Fashion-MNIST IDX files in
                    /usr/share/datasets/fashion-mnist (or set data.fashion_mnist_dir
                    in params.yaml to where they are).
  then run the command again.
MSG
    exit 1
  fi
fi

# The .venv is rebuilt only when requirements.txt changes (its hash is stamped inside).
want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp="$VENV/.requirements.sha256"
if [[ ! -x $VENV/bin/python || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
    echo "setup: Python 3.11 is needed (the pinned torch 2.14.1 wheels); set PYTHON=/path/to/python3.11" >&2
    exit 1; }
  echo "setup: installing the pinned Python packages into $VENV (a few minutes the first time)"
  [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip wheel setuptools
  "$VENV/bin/pip" install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
