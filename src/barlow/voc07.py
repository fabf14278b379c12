"""VOC07 classification by per-class linear SVMs on frozen features (paper Table 3).

The protocol of Goyal et al. (2019), "Scaling and Benchmarking Self-Supervised Visual
Representation Learning" (fair_self_supervision_benchmark), that PIRL and Barlow Twins
report, as VISSL implements it: L2-normalised features, one LinearSVC per class, its
cost C chosen by k-fold cross-validated AP, the test AP over non-difficult images.
``voc07_svm_map`` runs it; ``envelope_ap`` and ``voc07_11point_ap`` are the two AP
definitions it reports; ``voc_devkit_targets`` reads the devkit's label convention.
"""

from __future__ import annotations

import os
import signal
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC
from torch import Tensor

from barlow import distributed as dist
from barlow.distributed import DistEnv
from barlow.interrupt import STOP_SIGNALS
from barlow.progress import Progress

# The cost grid of the Goyal et al. (2019) benchmark's VOC07 SVM instructions
# (fair_self_supervision_benchmark GETTING_STARTED.md), whose protocol PIRL and Barlow
# Twins follow; VISSL's own default is only (0.1, 0.01).
VOC07_SVM_COSTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


def _precision_recall(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each rank of ``scores`` sorted high to low; ``targets``
    is 1 for a positive, anything else a negative. Ties keep input order."""
    positive = np.asarray(targets)[np.argsort(-np.asarray(scores), kind="stable")] == 1
    if not positive.any():
        raise ValueError("average precision is undefined without a positive sample")
    tp = np.cumsum(positive)
    return tp / np.arange(1, len(tp) + 1), tp / tp[-1]


def voc07_11point_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """VOC2007 devkit AP (VOCevalcls): AP = (1/11) Σ_{t ∈ {0, 0.1, …, 1}} max_{r ≥ t} p(r),
    the max being 0 where no rank reaches recall t. The thresholds are k/10 exactly, so a
    recall of 3/10 counts at t = 0.3 (the devkit's 0:0.1:1 gives 0.30000000000000004)."""
    precision, recall = _precision_recall(scores, targets)
    return float(np.mean([precision[recall >= k / 10].max(initial=0.0) for k in range(11)]))


def envelope_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP as the area under the monotone precision envelope (VOC2010+ devkit; the AP of
    the SSL VOC07 SVM benchmark of Goyal et al. 2019 / PIRL / VISSL):
        AP = Σ_n (r_n − r_{n−1}) · max_{m ≥ n} p_m,   r_0 = 0."""
    precision, recall = _precision_recall(scores, targets)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * envelope))


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def voc_devkit_targets(devkit) -> np.ndarray:
    """VOC devkit class-file values (1 present, −1 absent, 0 difficult) → the benchmark's
    target layout that ``voc07_svm_map`` reads (1 present, 0 absent, −1 difficult), the
    mapping of the benchmark's create_voc_data_files.py: 1 ↦ 1, −1 ↦ 0, 0 ↦ −1."""
    devkit = _numpy(devkit)
    if not np.isin(devkit, (-1, 0, 1)).all():
        raise ValueError(f"VOC devkit labels must be 1, -1 or 0, got {np.unique(devkit)}")
    return np.select([devkit == 1, devkit == -1], [1, 0], -1).astype(np.int64)


def _label_matrix(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) targets in the benchmark's layout: 1 present, 0 absent, -1 difficult.
    Integer class labels (N,) become one-vs-rest columns."""
    if labels.ndim == 1:
        return (labels[:, None] == np.arange(num_classes)[None, :]).astype(np.int64)
    return labels.astype(np.int64)


def _l2_normalise(feats: np.ndarray) -> np.ndarray:
    # x / (‖x‖ + 1e-5) as the benchmark code does; the epsilon keeps zero rows finite.
    feats = feats.astype(np.float64)
    return feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-5)


def _svm(cost: float, seed: int, max_iter: int) -> LinearSVC:
    # The benchmark's settings: squared hinge, L2, dual, intercept_scaling 1, positives
    # weighted twice (labels are ±1), tol 1e-4, max_iter 2000.
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0,
                     penalty="l2", loss="squared_hinge", dual=True, tol=1e-4,
                     max_iter=max_iter, random_state=seed)


def _fit_svm(cost: float, seed: int, max_iter: int, feats: np.ndarray,
             target: np.ndarray) -> tuple[LinearSVC, bool]:
    """The fitted SVM and whether liblinear converged within ``max_iter`` iterations
    (its own test: n_iter_ < max_iter). The warning it would print for every
    unconverged fit is counted by the caller and reported once instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm = _svm(cost, seed, max_iter).fit(feats, target)
    return svm, bool(svm.n_iter_ < max_iter)


def _in_worker(parent: int, task: Callable[..., Any], *args: Any) -> Any:
    """``task(*args)``, in a joblib worker process deaf to the stop signals from then on.

    A scheduler may send its SIGTERM to every process of a job, and a worker it ended
    would fail the whole search (joblib's TerminatedWorkerError): the stage stops on its
    own flag instead (barlow.interrupt.stop_requests), after the fits under way. Run by
    the ``parent`` process itself (one job), it changes nothing."""
    if os.getpid() != parent:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    return task(*args)


def _fold_ap(cost: float, seed: int, max_iter: int, feats: np.ndarray, target: np.ndarray,
             fit_rows: np.ndarray, held_rows: np.ndarray) -> tuple[float, bool]:
    """One cross-validation fold: AP of the SVM fitted on ``fit_rows`` over
    ``held_rows`` (what cross_val_score(scoring="average_precision") computes), and
    whether it converged."""
    svm, converged = _fit_svm(cost, seed, max_iter, feats[fit_rows], target[fit_rows])
    scores = svm.decision_function(feats[held_rows])
    return float(average_precision_score(target[held_rows] == 1, scores)), converged


def _test_aps(cost: float, seed: int, max_iter: int, feats: np.ndarray, target: np.ndarray,
              test_feats: np.ndarray, truth: np.ndarray) -> tuple[list[float], bool]:
    """One class's SVM at its chosen cost, fitted on every training row: its test APs
    (envelope, 11-point, sklearn's; percent) over ``truth``'s rows, and whether it
    converged."""
    svm, converged = _fit_svm(cost, seed, max_iter, feats, target)
    scores = svm.decision_function(test_feats)
    return [100.0 * envelope_ap(scores, truth), 100.0 * voc07_11point_ap(scores, truth),
            100.0 * float(average_precision_score(truth == 1, scores))], converged


def svm_share(count: int, rank: int, world_size: int) -> np.ndarray:
    """The fits, of ``count`` numbered 0..count−1, that rank ``rank`` of ``world_size``
    runs: one fixed permutation of them cut into ``world_size`` parts whose sizes differ
    by at most one (some empty when count < world_size), in increasing order. The shares
    are disjoint, cover every fit once, and every rank computes the same ones. Permuted
    because a fit's time varies with its cost C and its class, and a (class, cost, fold)
    order cut into runs would hand some ranks the slow ones."""
    order = np.random.default_rng(0).permutation(count)
    return np.sort(np.array_split(order, world_size)[rank])


def _pooled(share: np.ndarray, results: list, env: DistEnv | None) -> list:
    """Every rank's ``results`` of its ``share`` (`svm_share`) in fit order, on every
    rank: one all-gather of the pairs."""
    if env is None or env.world_size == 1:
        return results
    pooled = {}
    for indices, values in dist.all_objects((share.tolist(), results)):
        pooled.update(zip(indices, values))
    return [pooled[i] for i in range(len(pooled))]


def voc07_svm_map(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    costs: Sequence[float] = VOC07_SVM_COSTS,
    folds: int = 3,
    seed: int = 0,
    max_iter: int = 2000,
    n_jobs: int | None = None,
    label: str | None = None,
    env: DistEnv | None = None,
) -> dict:
    """VOC07 linear-SVM classification, the protocol of Goyal et al. (2019) that PIRL and
    Barlow Twins (Table 3, 86.2 mAP) report, as VISSL implements it.

    Features are L2-normalised, x / (‖x‖₂ + 1e-5). Labels are either integer classes
    (N,), made one-vs-rest, or an (N, C) matrix in the benchmark's layout: 1 present,
    0 absent, -1 difficult (``voc_devkit_targets`` maps the devkit's files to it). For
    each class c and each C in ``costs``, a LinearSVC (see ``_svm``) is scored by the
    mean average precision over ``folds`` stratified folds of the training set (shuffled
    with ``seed``; the benchmark's folds are unshuffled); the best C is refit on the
    whole training set and its decision values rank the test set.

    Difficult images: an image marked difficult for class c is a negative of c's SVM in
    training and in the cross-validation that chooses C, and is left out of c's test AP,
    as the benchmark's code does: its train_svm_kfold.py maps every target but 1 to −1 before
    ``cross_val_score`` and ``fit``, and its test_svm.py drops the −1 rows before the AP
    (VISSL's SVMTrainer does the same; only the low-shot variants also drop them in
    training).

    Returns, in percent:
        "map"          mean over classes of ``envelope_ap`` — the benchmark's AP, so the
                       number comparable with the paper's
        "map_11point"  mean of ``voc07_11point_ap`` (VOC2007 devkit)
        "map_sklearn"  mean of sklearn's average_precision_score (no interpolation)
        "ap", "ap_11point", "ap_sklearn"  the per-class lists
    and "cost" (chosen C per class), "cv_ap" (classes × costs cross-validation AP,
    percent) and "not_converged" ({C: number of fits, folds and refits, that stopped at
    ``max_iter``}).

    Shared over the ranks of ``env`` (one process without it): each rank runs its
    `svm_share` of the len(costs) · folds fits of every class, the ranks pool the
    cross-validation APs (one all-gather), every rank chooses the same C per class from
    them, and each then refits its share of the classes and pools their test APs. Each
    fit is the one a single process would make (same rows, same seed), so every figure
    equals the one-process result exactly. A rank runs its fits in ``n_jobs``
    processes, which ignore the stop signals (`_in_worker`); with a ``label``, rank 0's
    progress lines over its fits name it."""
    train_feats, test_feats = _l2_normalise(_numpy(train_feats)), _l2_normalise(_numpy(test_feats))
    train_labels, test_labels = _numpy(train_labels), _numpy(test_labels)
    num_classes = (train_labels.shape[1] if train_labels.ndim == 2
                   else int(max(train_labels.max(), test_labels.max())) + 1)
    train_targets = _label_matrix(train_labels, num_classes)
    test_targets = _label_matrix(test_labels, num_classes)
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    parallel, parent = Parallel(n_jobs=n_jobs, return_as="generator"), os.getpid()

    def target(c: int) -> np.ndarray:
        return np.where(train_targets[:, c] == 1, 1, -1)  # difficult trains as negative

    # The search: fit t = (c·len(costs) + k)·folds + f is class c's cost k on fold f.
    per_class = len(costs) * folds
    search = svm_share(num_classes * per_class, rank, world)

    def search_fits():
        for c in np.unique(search // per_class):  # a class's target and folds made once
            y = target(c)
            split = list(cv.split(train_feats, y))
            for t in search[search // per_class == c]:
                k, f = divmod(int(t) % per_class, folds)
                yield delayed(_in_worker)(parent, _fold_ap, costs[k], seed, max_iter,
                                          train_feats, y, *split[f])

    progress = Progress(label, len(search), "fit") if label else None
    fits = []
    for fit in parallel(search_fits()):
        fits.append(fit)
        if progress is not None:
            progress.update(len(fits))
    fits = _pooled(search, fits, env)
    not_converged: dict[float, int] = {}
    cv_ap, chosen = [], []
    for c in range(num_classes):
        runs = fits[c * per_class:(c + 1) * per_class]
        cv_ap.append([float(np.mean([ap for ap, _ in runs[k * folds:(k + 1) * folds]]))
                      for k in range(len(costs))])
        chosen.append(costs[int(np.argmax(cv_ap[-1]))])
        for k, cost in enumerate(costs):
            missed = sum(not converged for _, converged in runs[k * folds:(k + 1) * folds])
            if missed:
                not_converged[cost] = not_converged.get(cost, 0) + missed

    # The refits: each class's chosen C on every training row, scored on the test rows
    # not difficult for it.
    refit = svm_share(num_classes, rank, world)
    keep = test_targets != -1
    tested = _pooled(refit, list(parallel(
        delayed(_in_worker)(parent, _test_aps, chosen[c], seed, max_iter, train_feats,
                            target(c), test_feats[keep[:, c]], test_targets[keep[:, c], c])
        for c in refit)), env)
    out = {name: [] for name in ("ap", "ap_11point", "ap_sklearn")}
    for cost, (aps, converged) in zip(chosen, tested):
        for name, ap in zip(out, aps):
            out[name].append(ap)
        if not converged:
            not_converged[cost] = not_converged.get(cost, 0) + 1
    out |= {"cost": chosen, "cv_ap": [[100.0 * a for a in row] for row in cv_ap]}
    return {"map": float(np.mean(out["ap"])),
            "map_11point": float(np.mean(out["ap_11point"])),
            "map_sklearn": float(np.mean(out["ap_sklearn"])),
            **out, "not_converged": not_converged}
