"""The evaluation trainers on 2 gloo processes reproduce one process to float tolerance,
and the shared VOC07 SVM search reproduces it exactly.

What differs between one process and W under torchrun is only who computes what: each
rank takes B/W rows of every global batch (contiguous here, as DDP needs equal shares)
and a disjoint share of the validation rows. With the same global batches the maths is
the same — DDP averages the per-rank mean gradients into the global mean, global batch
norm normalises over the union — so the weights after training agree with the
single-process ones up to the order of float sums, and the pooled validation counts
(each sample once) give the same rows. One spawn runs every check; the workers save
what they computed and the assertions run here against references computed in this
process.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from barlow import distributed as bdist
from barlow import voc07
from barlow.config import ConfigError
from barlow.footprint import Gathered, check_fits
from barlow.evaluate import finetune, linear_head, train_linear_head
from barlow.models import small_resnet

# Every test reads the results of one spawn of gloo worker processes.
pytestmark = pytest.mark.slow

WORLD = 2
BATCH = 8             # global; each rank takes a contiguous half of every batch
N_TRAIN = 24          # 3 batches per epoch
N_VAL = 9             # odd: the ranks' shares differ (5 and 4)
EPOCHS = 3
CLASSES = 3


def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N_TRAIN + N_VAL, 3, 8, 8, generator=g)
    labels = torch.arange(N_TRAIN + N_VAL) % CLASSES
    images[labels == 1, 0] += 1.0  # something to learn
    return {"x": images[:N_TRAIN], "y": labels[:N_TRAIN],
            "val_x": images[N_TRAIN:], "val_y": labels[N_TRAIN:]}


def batches(d: dict, rank: int | None) -> tuple[list, list]:
    """(train batches, val batches): the whole of each for rank None, else the rank's
    half of every train batch and its share of the val rows (barlow.distributed.shard)."""
    train = []
    for start in range(0, N_TRAIN, BATCH):
        rows = slice(start, start + BATCH)
        if rank is not None:
            half = BATCH // WORLD
            rows = slice(start + rank * half, start + (rank + 1) * half)
        train.append((d["x"][rows], d["y"][rows]))
    val_rows = (np.arange(N_VAL) if rank is None else
                bdist.shard(N_VAL, bdist.DistEnv(rank, rank, WORLD, torch.device("cpu"))))
    return train, [(d["val_x"][val_rows], d["val_y"][val_rows])]


def frozen_backbone() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6)).eval()


def probe(d: dict, rank: int | None, env=None) -> dict:
    train, val = batches(d, rank)
    head, result = train_linear_head(frozen_backbone(), train, val, feat_dim=6,
                                     num_classes=CLASSES, epochs=EPOCHS, lr=0.5,
                                     weight_decay=1e-4, device="cpu", env=env)
    return {"state": {k: v.detach().clone() for k, v in head.state_dict().items()},
            "history": result["history"]}


def tune(d: dict, rank: int | None, env=None) -> dict:
    train, val = batches(d, rank)
    torch.manual_seed(2)
    backbone, dim = small_resnet(width=4, layers=(1, 1, 1, 1))
    head = linear_head(dim, CLASSES, seed=0)
    result = finetune(backbone, head, train, val, epochs=EPOCHS, lr_backbone=0.05,
                      lr_head=0.5, weight_decay=1e-4, device="cpu", env=env)
    state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
             **{f"head.{k}": v for k, v in head.state_dict().items()}}
    return {"state": {k: v.detach().clone() for k, v in state.items()},
            "history": result["history"],
            "global_bn": any(isinstance(m, bdist.GlobalBatchNorm) for m in backbone.modules())}


def svm(env=None) -> dict:
    """The VOC07 SVM protocol on 3 classes, 3 costs, 2 folds (18 searched fits, 3
    refits), and how many SVMs this process fitted (``n_jobs`` 1: all of them here)."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % CLASSES
    feats = rng.normal(size=(60, 6)) + 0.8 * np.eye(CLASSES, 6)[labels]
    fitted, fit = [], voc07._fit_svm

    def counted(*args):
        fitted.append(args[0])
        return fit(*args)

    voc07._fit_svm = counted
    try:
        result = voc07.voc07_svm_map(feats[:40], labels[:40], feats[40:], labels[40:],
                                     costs=(1e-3, 0.1, 10.0), folds=2, n_jobs=1, env=env)
    finally:
        voc07._fit_svm = fit
    return {"result": result, "fitted": len(fitted)}


def refused(rank: int, env) -> str | None:
    """check_fits where rank 1 alone would gather more than this machine's memory (10⁶
    rows × 10⁶ float32, 4 TB) and rank 0 4 MB: the line each rank raised, if any."""
    try:
        check_fits([Gathered("linear.baselines", "raw_pixels",
                             {"test": 10**6 if rank == 1 else 1}, 10**6)], env.device)
    except ConfigError as err:
        return str(err)
    return None


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with bdist.process_group(timeout_s=60) as env:
        d = data()
        rows = torch.arange(5 * 2).reshape(5, 2)
        share = bdist.shard(5, env)
        out = {"share": share, "gathered": bdist.gather_rows(rows[share]),
               "summed": bdist.reduce_sum(torch.tensor([rank + 1.0], dtype=torch.float64)),
               "probe": probe(d, rank, env), "tune": tune(d, rank, env), "svm": svm(env),
               "refused": refused(rank, env)}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist_eval")
    mp.spawn(worker, args=(free_port(), str(tmp)), nprocs=WORLD)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_shares_gather_back_to_the_whole_once(ranks):
    assert [r["share"].tolist() for r in ranks] == [[0, 1, 2], [3, 4]]
    for r in ranks:
        assert torch.equal(r["gathered"], torch.arange(10).reshape(5, 2))
        assert r["summed"].item() == 3.0
    with pytest.raises(ValueError, match="3 rows cannot be split over 4 processes"):
        bdist.shard(3, bdist.DistEnv(0, 0, 4, torch.device("cpu")))


def test_svm_fits_are_shared_and_give_the_one_process_result_exactly(ranks):
    """Each rank fits its share (barlow.voc07.svm_share) of the 18 searched fits and 3
    refits, none twice; the pooled result, chosen costs and APs included, is the
    single process's to the bit, on every rank."""
    reference = svm()
    assert reference["fitted"] == 18 + 3
    assert sorted(r["svm"]["fitted"] for r in ranks) == [10, 11]  # 9 + 1, 9 + 2
    for r in ranks:
        assert r["svm"]["result"] == reference["result"]
    assert len(set(reference["result"]["cost"])) > 1  # the choice is not trivial


def test_a_footprint_one_rank_refuses_stops_every_rank_with_its_line(ranks):
    lines = [r["refused"] for r in ranks]
    assert lines[0] == lines[1]
    assert lines[0].startswith("params: linear.baselines: raw_pixels gathers 1,000,000 test"
                               " rows × 1,000,000 float32 features on every rank: 4,000.0 GB")


def assert_same_run(runs: list[dict], reference: dict) -> None:
    """Same weights to float32 tolerance on every rank, identical validation counts."""
    for run in runs:
        assert run["state"].keys() == reference["state"].keys()
        for key, value in reference["state"].items():
            torch.testing.assert_close(run["state"][key], value, rtol=1e-4, atol=1e-5,
                                       msg=key)
        for got, want in zip(run["history"], reference["history"], strict=True):
            assert got["val_top1"] == want["val_top1"] and got["val_top5"] == want["val_top5"]
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
            assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


def test_augmenting_probe_head_matches_one_process(ranks):
    reference = probe(data(), None)
    assert_same_run([r["probe"] for r in ranks], reference)
    # The head moved: the comparison is not between two untrained heads.
    assert not torch.allclose(reference["state"]["weight"],
                              linear_head(6, CLASSES, 0).weight, atol=1e-3)


def test_finetuning_with_global_batch_norm_matches_one_process(ranks):
    reference = tune(data(), None)
    assert all(r["tune"]["global_bn"] for r in ranks)
    assert_same_run([r["tune"] for r in ranks], reference)
    # BN running statistics are part of the state compared: global, not per-rank.
    assert any("running_var" in k for k in reference["state"])
