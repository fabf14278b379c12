# The two commands of the README's Quick start, and the fast tests for editing. Each
# runs scripts/setup.sh first, which installs what is missing (system packages, the
# pinned .venv) and is quick otherwise.
SHELL := /bin/bash
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)
# No network here; and DVC's telemetry must never block a run.
export DVC_NO_ANALYTICS := 1
# libopencv-dev's TBB warns, and can hang, when a DataLoader forks after FFCV ran,
# unless numba uses its workqueue threading layer.
export NUMBA_THREADING_LAYER := workqueue

.PHONY: setup repro test test-fast
setup:
	@scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest

# The tests not marked slow (pyproject.toml): no torchrun, gloo, DVC or stage process,
# no stage or training run, no numba compile; about a minute on 2 cores.
test-fast: setup
	python -m pytest -m "not slow and not paper_e2e"

# The paper's ablation studies as DVC experiments (docs/experiments.md): the committed
# params (every study's baseline) and each study's other values, each with the seeds
# SEEDS, reproducing pretrain + linear (the backbone's probe; the baselines are
# linear_baselines', which no ablated setting reruns); then the queue runs JOBS
# experiments at a time. linear.baselines=[] changes no stage that runs: it keeps these
# runs' params those of the runs in reports/ablations.json, whose studies group by them.
# The loss-term study is the paper's six rows: the baseline, loss.variant (two rows),
# loss.normalization=feature, and a grid of one point per line's -S lists: the last
# line gives no BN in the projector (with batch normalisation) and no BN with none.
# ABLATION_SET adds settings to every run, e.g. a budget:
#   make ablations ABLATION_SET="-S pretrain.epochs=1 -S pretrain.knn_every_epochs=0"
# `make -n ablations` prints the commands. Commit first: queued runs see tracked files.
# JOBS experiments run at once: on an N-GPU node, JOBS=N with BARLOW_DEVICE_POOL naming
# the GPUs, one each (docs/experiments.md); on 2 shared cores 1, as more only thrash.
SEEDS ?= 0,1,2
JOBS ?= 1
ABLATION_SET ?=
ablate = dvc exp run --queue -S 'pretrain.seed=$(SEEDS)' -S 'linear.baselines=[]' $(ABLATION_SET)

.PHONY: ablations
ablations: setup
	$(ablate) linear
	$(ablate) -S 'loss.lambd=0.002,0.0051,0.01,0.02' linear
	$(ablate) -S 'pretrain.batch_size=32,64,128,512' linear
	$(ablate) -S 'model.projector=128-128-128,2048-2048-2048' linear
	$(ablate) -S 'loss.variant=invariance,redundancy' linear
	$(ablate) -S 'loss.normalization=feature' linear
	$(ablate) -S 'model.projector_bn=false' -S 'loss.normalization=batch,none' linear
	dvc queue start -j $(JOBS)
