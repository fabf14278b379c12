#!/usr/bin/env bash
# Queue the paper's ablation studies as DVC experiments on the current data, then run
# the queue one experiment at a time (2 shared CPU cores: more workers only thrash).
#
#   bash scripts/ablations.sh                 # queue everything, then dvc queue start -j 1
#   DRY_RUN=1 bash scripts/ablations.sh       # print the commands only
#   BUDGET_EPOCHS=2 bash scripts/ablations.sh # every run with -S pretrain.epochs=2
#   STUDIES="lambda loss" SEEDS="0 1" bash scripts/ablations.sh
#   VALUES_lambda="0.002 0.02" bash scripts/ablations.sh   # fewer values of one study
#   EXTRA_SET="pretrain.knn_every_epochs=0" bash ...     # more -S for every run
#   NO_START=1 bash scripts/ablations.sh         # queue only; `dvc queue start -j 1` later
#
# Studies (each value × each seed in SEEDS, default 0 1 2 → pretrain.seed):
#   lambda     loss.lambd        0.002 0.005 0.0051 0.01 0.02
#   batch      pretrain.batch_size 32 64 128 256 512
#   projector  model.projector   128-128-128 512-512-512 2048-2048-2048
#   loss       loss.variant      invariance redundancy full
# A value equal to the committed params.yaml's is the shared baseline: it is queued once
# per seed (not once per study), and the report counts it in every study.
#
# Each experiment reproduces TARGETS (default: linear, i.e. pretrain then the linear
# probe, which the ablation tables read) with linear.baselines=[] (the random-init and
# raw-pixel probes do not depend on the ablated settings; the main run has them);
# semisup and transfer are left out to save hours. Queued runs execute a copy of the last commit plus tracked changes: commit
# (or at least `git add`) the code first; the script refuses a dirty params.yaml,
# because `-S` edits apply on top of the workspace's params and would silently mix.
# Afterwards:  PYTHONPATH=src python -m stages.report ablations --out reports/ablations.json
#              dvc repro report
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SEEDS=${SEEDS:-"0 1 2"}
STUDIES=${STUDIES:-"lambda batch projector loss"}
TARGETS=${TARGETS:-linear}
DRY_RUN=${DRY_RUN:-0}
JOBS=${JOBS:-1}
export DVC_NO_ANALYTICS=1

declare -A KEY=([lambda]=loss.lambd [batch]=pretrain.batch_size
                [projector]=model.projector [loss]=loss.variant)
declare -A VALUES=([lambda]="${VALUES_lambda:-0.002 0.005 0.0051 0.01 0.02}"
                   [batch]="${VALUES_batch:-32 64 128 256 512}"
                   [projector]="${VALUES_projector:-128-128-128 512-512-512 2048-2048-2048}"
                   [loss]="${VALUES_loss:-invariance redundancy full}")

# The committed value of a dotted key (the baseline of every study).
current() {
    "$PY" - "$1" <<'EOF'
import sys, yaml
value = yaml.safe_load(open("params.yaml"))
for part in sys.argv[1].split("."):
    value = value[part]
print(f"{value:g}" if isinstance(value, float) else value)
EOF
}

same_value() {  # numeric-aware equality: 0.0051 == 5.1e-3, 256 == 256
    "$PY" -c 'import sys
a, b = sys.argv[1:]
try: print(int(float(a) == float(b)))
except ValueError: print(int(a == b))' "$1" "$2"
}

if [ "$DRY_RUN" != 1 ]; then
    if ! git diff --quiet HEAD -- params.yaml; then
        echo "ablations: params.yaml differs from HEAD; commit or restore it first" >&2
        exit 2
    fi
    if [ -n "$(git status --porcelain --untracked-files=normal -- src stages dvc.yaml)" ]; then
        echo "ablations: warning: uncommitted or untracked code in src/, stages/ or dvc.yaml;" \
             "queued runs only see tracked files (git add them)" >&2
    fi
fi

fixed=(-S "linear.baselines=[]")
for setting in ${EXTRA_SET:-}; do
    fixed+=(-S "$setting")
done
budget=()
if [ -n "${BUDGET_EPOCHS:-}" ]; then
    if ! [[ "$BUDGET_EPOCHS" =~ ^[1-9][0-9]*$ ]]; then
        echo "ablations: BUDGET_EPOCHS must be a whole number >= 1 (pretrain.epochs)" >&2
        exit 2
    fi
    budget=(-S "pretrain.epochs=${BUDGET_EPOCHS}")
    # warmup_epochs must not exceed epochs (barlow.config.PretrainConfig.check).
    warm=$(current pretrain.warmup_epochs)
    if [ "$("$PY" -c "print(int(float('$warm') > float('$BUDGET_EPOCHS')))")" = 1 ]; then
        budget+=(-S "pretrain.warmup_epochs=${BUDGET_EPOCHS}")
    fi
fi

run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

queued=0
baseline_done=0
for study in $STUDIES; do
    key=${KEY[$study]:?unknown study $study (lambda batch projector loss)}
    base=$(current "$key")
    for value in ${VALUES[$study]}; do
        is_base=$(same_value "$value" "$base")
        if [ "$is_base" = 1 ]; then
            # One baseline per seed for all studies.
            [ "$baseline_done" = 1 ] && continue
            baseline_done=1
        fi
        for seed in $SEEDS; do
            overrides=(-S "pretrain.seed=${seed}" "${budget[@]}" "${fixed[@]}")
            [ "$is_base" = 1 ] || overrides+=(-S "${key}=${value}")
            run dvc exp run --queue "${overrides[@]}" $TARGETS
            queued=$((queued + 1))
        done
    done
done
# The baseline value may not be among a study's values (e.g. projector 1024-1024-1024);
# the studies still need it.
if [ "$baseline_done" = 0 ]; then
    for seed in $SEEDS; do
        run dvc exp run --queue -S "pretrain.seed=${seed}" "${budget[@]}" "${fixed[@]}" $TARGETS
        queued=$((queued + 1))
    done
fi
echo "ablations: ${queued} experiments queued${BUDGET_EPOCHS:+ (pretrain.epochs=${BUDGET_EPOCHS})}" >&2
[ "${NO_START:-0}" = 1 ] || run dvc queue start -j "$JOBS"
