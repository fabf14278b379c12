"""benchmarks/time_to_accuracy.py: it reads the kNN curve from the pretrain stage's own
progress lines, and times and medians the way its docstring says (no timing is
asserted)."""

from __future__ import annotations

import io
import sys

from barlow.progress import Progress
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import time_to_accuracy as tta  # noqa: E402


def test_reads_knn_and_pairs_from_the_stage_progress_line():
    out = io.StringIO()
    progress = Progress("pretrain", 3744, "step", enabled=True, stream=out)
    progress.line(468, epoch="2.00", loss=412.5, **{"pairs/s": 1342, "kNN top-1": 74.23})
    progress.line(702, epoch="3.00", loss=400.1, **{"pairs/s": 1290})
    first, second = out.getvalue().splitlines()
    assert tta.parse_epoch_line(first) == (74.23, 1342.0)
    assert tta.parse_epoch_line(second) == (None, 1290.0)


def test_time_to_target_is_the_first_epoch_at_or_above_it():
    curve = [(60.0, 74.2), (120.0, 78.0), (180.0, 77.5), (240.0, 79.2)]
    assert tta.time_to(curve, 78.0) == 120.0
    assert tta.time_to(curve, 79.0) == 240.0
    assert tta.time_to(curve, 80.0) is None


def test_summary_medians_and_a_round_that_missed_the_target():
    runs = [tta.Run(stages={"pretrain": s, "linear": 10.0}, knn_curve=[(s, k)],
                    pairs_per_s=1000.0,
                    linear={"val_top1_best": 87.0, "test_top1_at_best_val": 86.5})
            for s, k in ((100.0, 76.0), (120.0, 74.0), (110.0, 77.0))]
    out = tta.summary(runs, ["pretrain", "linear"], knn_targets=[75.0, 70.0])
    assert out["pretrain_s"] == 110.0 and out["chain_s"] == 120.0 and out["knn_top1"] == 76.0
    assert out["time_to_knn_75_s"] is None  # one round never reached 75
    assert out["time_to_knn_70_s"] == 110.0
    assert out["linear_test_top1_at_best_val"] == 86.5
    assert tta.ratio(90.0, 120.0) == 0.75 and tta.ratio(None, 120.0) is None
