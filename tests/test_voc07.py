"""Tests of barlow.voc07: the two AP definitions by hand, the SVM protocol on separable
and on noise features (CPU, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from barlow.voc07 import envelope_ap, svm_share, voc07_11point_ap, voc07_svm_map
from test_evaluate import clustered

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def test_ap_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    # precision 1, 1/2, 2/3, 1/2, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1.
    # 11-point: t ∈ {0,..,.3} → 1; t ∈ {.4,.5,.6} → 2/3; t ∈ {.7,..,1} → 3/5.
    assert voc07_11point_ap(scores, targets) == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 0.6) / 11)
    # Envelope: recall steps of 1/3 at envelope precisions 1, 2/3, 3/5.
    assert envelope_ap(scores, targets) == pytest.approx((1 + 2 / 3 + 0.6) / 3)
    # A perfect ranking has AP 1 under both.
    assert voc07_11point_ap(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == 1.0
    assert envelope_ap(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == 1.0
    with pytest.raises(ValueError, match="without a positive"):
        envelope_ap(np.array([1.0, 2.0]), np.array([0, 0]))


def test_voc07_svm_separable_features_give_full_map():
    x, y = clustered(60, 3, 8, spread=0.1, seed=0)
    tx, ty = clustered(30, 3, 8, spread=0.1, seed=0)
    out = voc07_svm_map(x, y, tx, ty, costs=(0.01, 0.1, 1.0))
    assert out["map"] >= 99.0 and out["map_11point"] >= 99.0 and out["map_sklearn"] >= 99.0
    assert len(out["ap"]) == len(out["cost"]) == 3
    assert all(c in (0.01, 0.1, 1.0) for c in out["cost"])
    assert np.asarray(out["cv_ap"]).shape == (3, 3)


def test_voc07_svm_noise_gives_chance_map_and_ignores_difficult():
    rng = np.random.default_rng(0)
    rate = 0.3
    x, tx = rng.normal(size=(300, 16)), rng.normal(size=(1500, 16))
    y = (rng.random((300, 4)) < rate).astype(int)
    ty = (rng.random((1500, 4)) < rate).astype(int)
    out = voc07_svm_map(x, y, tx, ty, costs=(0.01, 1.0))
    assert abs(out["map"] - 100 * rate) < 6.0
    assert abs(out["map_11point"] - 100 * rate) < 8.0
    assert abs(out["map_sklearn"] - 100 * rate) < 6.0

    # VOC layout: -1 = difficult, ignored at test time. Class-0 rows marked difficult
    # score like positives; were they counted as negatives, class 0's AP would drop.
    xs, ys = clustered(60, 3, 8, spread=0.1, seed=0)
    txs, tys = clustered(30, 3, 8, spread=0.1, seed=0)
    train_matrix = np.eye(3, dtype=int)[ys.numpy()]
    test_matrix = np.eye(3, dtype=int)[tys.numpy()]
    test_matrix[np.flatnonzero(tys.numpy() == 0)[::2], 0] = -1
    clean = voc07_svm_map(xs, train_matrix, txs, test_matrix, costs=(0.1,))
    assert clean["ap"][0] >= 99.0


@pytest.mark.parametrize("count, world", [(600, 8), (30, 4), (3, 8), (1, 1)])
def test_svm_shares_are_disjoint_cover_every_fit_and_differ_by_one_at_most(count, world):
    shares = [svm_share(count, rank, world) for rank in range(world)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for share in shares:
        assert share.tolist() == sorted(share.tolist())
    # The same shares on every call: the ranks compute them apart.
    assert all(np.array_equal(s, svm_share(count, r, world)) for r, s in enumerate(shares))
