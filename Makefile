# The two commands of the README's Quick start. Each runs scripts/setup.sh first, which
# installs what is missing (system packages, the pinned .venv) and is quick otherwise.
SHELL := /bin/bash
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)
# No network here; and DVC's telemetry must never block a run.
export DVC_NO_ANALYTICS := 1
# libopencv-dev's TBB warns when a DataLoader forks after FFCV ran (ffcv-notes).
export NUMBA_THREADING_LAYER := workqueue

.PHONY: setup repro test
setup:
	@scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest
