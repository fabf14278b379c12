"""Tests of barlow.evaluate and barlow.features on tiny synthetic data (CPU, a few
seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from barlow.evaluate import (
    finetune,
    fit_linear_on_features,
    lr_factor,
    precise_bn,
    topk_accuracy,
    train_linear_head,
)
from barlow.features import extract_features, knn_top1, raw_pixel_features


def clustered(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around random unit-scale centres: (features (N, dim), labels (N,))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def colour_images(n: int, num_classes: int, seed: int, batch_size: int = 32):
    """3×8×8 noise images whose class-c channel is brightened: a loader (list of batches)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randn(n, 3, 8, 8, generator=g)
    images[torch.arange(n), labels] += 2.0
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, n, batch_size)]


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ------------------------------------------------------------------------------- top-k
def test_topk_accuracy_hand_computed():
    logits = torch.tensor([[0.1, 0.7, 0.2],   # label 1: top-1 hit
                           [0.5, 0.3, 0.2],   # label 1: 2nd → top-2 hit
                           [0.2, 0.3, 0.5],   # label 0: 3rd → top-3 only
                           [0.6, 0.1, 0.3]])  # label 0: top-1 hit
    labels = torch.tensor([1, 1, 0, 0])
    assert topk_accuracy(logits, labels, ks=(1, 2, 3)) == {1: 50.0, 2: 75.0, 3: 100.0}
    # k is capped at the number of classes: top-5 of 3 classes counts every row.
    assert topk_accuracy(logits, labels) == {1: 50.0, 5: 100.0}


# --------------------------------------------------------------------------------- kNN
def test_knn_clustered_features_near_perfect():
    feats, labels = clustered(60, 10, 32, spread=0.1, seed=0)
    test_feats, test_labels = clustered(20, 10, 32, spread=0.1, seed=0)
    assert knn_top1(feats, labels, test_feats, test_labels, num_classes=10, k=20) >= 99.0


def test_knn_noise_near_chance_and_chunking_invariant():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    train_labels = torch.randint(0, 10, (2000,), generator=g)
    test_labels = torch.randint(0, 10, (2000,), generator=g)
    acc = knn_top1(train, train_labels, test, test_labels, num_classes=10, chunk=1024)
    assert abs(acc - 10.0) < 4.0
    assert knn_top1(train, train_labels, test, test_labels, num_classes=10, chunk=7) == acc


def test_knn_votes_are_similarity_weighted():
    # One close neighbour of class 1 against two farther ones of class 0: with a small
    # temperature exp(s/T) lets the close one win; with a large one, the majority wins.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_top1(train, labels, query, truth, num_classes=2, k=3, temperature=0.1) == 100.0
    assert knn_top1(train, labels, query, truth, num_classes=2, k=3, temperature=100.0) == 0.0


# --------------------------------------------------------------------- features, pixels
def test_extract_features_restores_modes_and_feeds_the_fast_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    feats, labels = extract_features(model, loader, "cpu")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert feats.dtype == torch.float32 and feats.shape == (40, 3)
    with torch.no_grad():
        torch.testing.assert_close(feats, model.eval()(x))
    assert torch.equal(labels, y)
    # The features must be usable for training (inference-mode tensors would not be).
    fit_linear_on_features(feats, labels, feats, labels, num_classes=3, epochs=1, lr=0.1,
                           weight_decay=0.0, batch_size=16)


def test_extract_features_autocast_returns_float32():
    feats, _ = extract_features(nn.Linear(4, 3), [(torch.randn(5, 4), torch.zeros(5))],
                                "cpu", autocast_dtype=torch.bfloat16)
    assert feats.dtype == torch.float32


def test_raw_pixel_features_flattens():
    loader = colour_images(10, 3, seed=0, batch_size=4)
    feats, labels = raw_pixel_features(loader)
    assert feats.shape == (10, 3 * 8 * 8)
    assert torch.equal(feats[:4], loader[0][0].reshape(4, -1))
    assert torch.equal(labels, torch.cat([b[1] for b in loader]))


# ---------------------------------------------------------------------------- schedules
def test_lr_factor_cosine_and_step():
    assert lr_factor("cosine", 0, 10) == 1.0
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 9, 10) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    # Transfer recipe: ÷10 twice at equal intervals; 14 epochs → 5, 5, 4.
    assert [lr_factor("step", e, 14) for e in range(14)] == pytest.approx(
        [1.0] * 5 + [0.1] * 5 + [0.01] * 4)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("linear", 0, 10)


# ------------------------------------------------------------------------ linear probes
def test_fit_linear_on_features_learns_and_is_deterministic():
    x, y = clustered(100, 4, 16, spread=0.3, seed=2)
    vx, vy = clustered(50, 4, 16, spread=0.3, seed=2)
    rows = []
    kwargs = dict(num_classes=4, epochs=5, lr=0.5, weight_decay=1e-6, batch_size=64, seed=3)
    head, result = fit_linear_on_features(x, y, vx, vy, **kwargs,
                                          on_epoch=lambda e, row: rows.append((e, row)))
    assert result["last"]["val_top1"] >= 95.0
    assert result["best"]["val_top1"] == max(r["val_top1"] for r in result["history"])
    assert rows == list(enumerate(result["history"]))
    assert set(result["last"]) == {"epoch", "lr_head", "train_loss", "val_loss",
                                   "val_top1", "val_top5"}
    assert [r["lr_head"] for r in result["history"]] == pytest.approx(
        [0.5 * lr_factor("cosine", e, 5) for e in range(5)])

    head2, result2 = fit_linear_on_features(x, y, vx, vy, **kwargs)
    assert torch.equal(head.weight, head2.weight) and result2 == result
    head3, _ = fit_linear_on_features(x, y, vx, vy, **{**kwargs, "seed": 4})
    assert not torch.equal(head.weight, head3.weight)


def test_fit_linear_on_features_step_schedule():
    x, y = clustered(20, 3, 8, spread=0.3, seed=5)
    _, result = fit_linear_on_features(x, y, x, y, num_classes=3, epochs=6, lr=0.01,
                                       weight_decay=5e-4, batch_size=16, schedule="step")
    assert [r["lr_head"] for r in result["history"]] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])


def test_train_linear_head_frozen_backbone_unchanged():
    backbone = tiny_backbone()
    backbone.train()  # the trainer must switch it to eval itself, and switch it back
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train, val = colour_images(256, 3, seed=0), colour_images(128, 3, seed=1)
    head, result = train_linear_head(backbone, train, val, feat_dim=8, num_classes=3,
                                     epochs=4, lr=0.3, weight_decay=1e-6, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert backbone.training
    assert result["best"]["val_top1"] >= 70.0  # chance is 33
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    assert head.weight.shape == (3, 8)


class BNForcedToTrain(nn.Module):
    """A backbone whose BN ignores eval(): running statistics move during the probe."""

    def __init__(self):
        super().__init__()
        self.body = tiny_backbone()

    def forward(self, x):
        self.body[1].train()
        return self.body(x)


def weight_editing_backbone() -> nn.Module:
    backbone = tiny_backbone()

    def nudge(module, inputs, output):
        module.weight.add_(1e-3)

    backbone[0].register_forward_hook(nudge)
    return backbone


@pytest.mark.parametrize("make", [BNForcedToTrain, weight_editing_backbone],
                         ids=["bn-in-train-mode", "hook-edits-weights"])
def test_train_linear_head_raises_if_backbone_changes(make):
    loader = colour_images(64, 3, seed=0)
    with pytest.raises(RuntimeError, match="frozen backbone changed"):
        train_linear_head(make(), loader, loader, feat_dim=8, num_classes=3, epochs=1,
                          lr=0.1, weight_decay=0.0, device="cpu")


# ------------------------------------------------------------------------- fine-tuning
def test_finetune_improves_accuracy_and_changes_backbone():
    backbone, head = tiny_backbone(seed=7), nn.Linear(8, 3)
    train, val = colour_images(256, 3, seed=0), colour_images(128, 3, seed=1)
    vx, vy = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    with torch.no_grad():
        before_acc = topk_accuracy(head(backbone.eval()(vx)), vy, ks=(1,))[1]
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = finetune(backbone, head, train, val, epochs=4, lr_backbone=0.05, lr_head=0.5,
                      weight_decay=0.0, device="cpu")
    assert result["best"]["val_top1"] >= 90.0 > before_acc
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert "0.weight" in changed and "1.running_mean" in changed  # BN ran in train mode
    assert set(result["last"]) >= {"lr_backbone", "lr_head"}
    assert result["last"]["lr_backbone"] == pytest.approx(0.05 * lr_factor("cosine", 3, 4))
    assert not backbone.training and not head.training


def test_precise_bn_is_the_mean_of_the_batch_statistics():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=g) * (k + 1) + k, torch.zeros(8)) for k in range(3)]
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    weights = {k: v.clone() for k, v in net.state_dict().items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert precise_bn(net, batches, "cpu") == 3
    with torch.no_grad():
        acts = [net[0](x) for x, _ in batches]
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0))
    torch.testing.assert_close(bn.running_var,
                               torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0))
    assert bn.momentum == 0.1 and net.training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="no batches"):
        precise_bn(net, [], "cpu")


def test_finetune_recompute_bn_replays_the_epoch_and_changes_only_statistics(tiny_ffcv):
    """Training uses batch statistics, so re-estimating the running ones between epochs
    must leave every weight bit-identical, provided the FFCV loader is rewound to the
    epoch just trained and then set to the next: a wrong rewind changes the batches of
    the following epochs, hence the weights."""
    from barlow.data.loaders import eval_loader
    from barlow.models import build_backbone

    common = dict(resolution=16, mean=[0.0] * 3, std=[255.0] * 3, channels_last=False,
                  num_workers=1)
    train = eval_loader(str(tiny_ffcv / "train.beton"), 16, train_aug=True, seed=3,
                        train_crop_scale=(0.3, 1.0), order="random", **common)
    val = eval_loader(str(tiny_ffcv / "test.beton"), 32, train_aug=False, crop_ratio=1.0,
                      **common)
    runs = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        backbone, dim = build_backbone("small_resnet", 4, [1, 1, 1, 1])
        head = nn.Linear(dim, 4)
        train.seek(0)
        finetune(backbone, head, train, val, epochs=3, lr_backbone=0.05, lr_head=0.5,
                 weight_decay=0.0, device="cpu", recompute_bn=recompute)
        assert train.next_epoch == 3
        runs[recompute] = backbone.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in runs[False].items():
        if key.endswith(stats):
            continue
        assert torch.equal(value, runs[True][key]), key
    assert not torch.equal(runs[False]["bn1.running_var"], runs[True]["bn1.running_var"])
