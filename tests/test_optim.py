"""LARS against the recipe's formula worked by hand; schedule values; parameter groups."""

import math

import pytest
import torch
from torch import nn

from barlow.optim import (LARS, build_optimizer, param_groups, scale_lr,
                          warmup_cosine)

LR, WD, ETA, MOM = 0.2, 1e-2, 0.001, 0.9


def by_hand(p, g, mu, adapt):
    """One LARS update, transcribed from the recipe, in plain tensor arithmetic."""
    if adapt:
        dp = g + WD * p
        pn, un = p.norm(), dp.norm()
        q = ETA * pn / un if pn > 0 and un > 0 else 1.0
        dp = q * dp
    else:
        dp = g
    mu = MOM * mu + dp
    return p - LR * mu, mu


def test_lars_two_steps_match_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    groups = param_groups(model, WD)
    for group in groups:
        group["lr"] = LR
    opt = LARS(groups, lr=0.0, momentum=MOM, eta=ETA)
    expected = {p: (p.detach().clone(), torch.zeros_like(p)) for p in model.parameters()}
    adapt = {p: p.ndim > 1 for p in model.parameters()}
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 5, dtype=torch.float64)).square().sum().backward()
        for p in model.parameters():
            expected[p] = by_hand(expected[p][0], p.grad, expected[p][1], adapt[p])
        opt.step()
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), expected[p][0], rtol=1e-12, atol=1e-14)


def test_lars_trust_ratio_is_one_for_zero_norms():
    zero_param = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    zero_grad = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = LARS([zero_param, zero_grad], lr=LR, weight_decay=0.0, momentum=MOM, eta=ETA)
    zero_param.grad = torch.full_like(zero_param, 2.0)
    zero_grad.grad = torch.zeros_like(zero_grad)
    opt.step()
    # ‖p‖ = 0: q = 1, the plain gradient step; ‖dp‖ = 0: no movement, no NaN.
    torch.testing.assert_close(zero_param.detach(), torch.full_like(zero_param, -LR * 2.0))
    torch.testing.assert_close(zero_grad.detach(), torch.ones_like(zero_grad))


def test_lars_skips_parameters_without_gradient():
    used, unused = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = LARS([used, unused], lr=LR)
    used.grad = torch.ones(2, 2)
    opt.step()
    assert not torch.equal(used.detach(), torch.ones(2, 2))
    assert torch.equal(unused.detach(), torch.ones(2, 2))


def test_param_groups_split_by_ndim():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4, 2), nn.LayerNorm(2))
    model[0].bias.requires_grad_(False)
    weights, biases = param_groups(model, 1e-6)
    assert weights["name"] == "weights" and biases["name"] == "biases"
    assert {id(p) for p in weights["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in biases["params"]} == {
        id(model[1].weight), id(model[1].bias), id(model[3].bias),
        id(model[4].weight), id(model[4].bias)}
    assert weights["weight_decay"] == 1e-6 and weights["lars_adaptation"]
    assert biases["weight_decay"] == 0.0 and not biases["lars_adaptation"]


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD),
                                      ("adamw", torch.optim.AdamW)])
def test_build_optimizer_keeps_group_weight_decay(name, cls):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = build_optimizer(name, param_groups(model, 0.5), lr=0.1)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert [g["name"] for g in opt.param_groups] == ["weights", "biases"]


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="'adam'"):
        build_optimizer("adam", param_groups(nn.Linear(2, 2), 0.0))


def test_warmup_cosine_values():
    base, total, warmup = 0.8, 1000, 100
    assert warmup_cosine(0, total, warmup, base) == 0.0
    assert warmup_cosine(50, total, warmup, base) == pytest.approx(0.4)
    assert warmup_cosine(warmup, total, warmup, base) == pytest.approx(base)
    # Halfway through the cosine q = 1/2: lr = base·(r + (1 − r)/2).
    assert warmup_cosine(550, total, warmup, base) == pytest.approx(base * (0.001 + 0.999 / 2))
    assert warmup_cosine(total, total, warmup, base) == pytest.approx(0.001 * base)
    assert warmup_cosine(total + 7, total, warmup, base) == pytest.approx(0.001 * base)
    # The last scheduled step is a hair above the end value, the curve is monotone.
    lrs = [warmup_cosine(s, total, warmup, base) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_cosine_without_warmup_and_other_ratio():
    assert warmup_cosine(0, 10, 0, 1.0, final_ratio=0.1) == pytest.approx(1.0)
    q = 0.5 * (1 + math.cos(math.pi * 3 / 10))
    assert warmup_cosine(3, 10, 0, 1.0, final_ratio=0.1) == pytest.approx(0.1 + 0.9 * q)


@pytest.mark.parametrize("step,total,warmup", [(-1, 10, 0), (0, 0, 0), (0, 10, 11)])
def test_warmup_cosine_rejects_impossible_positions(step, total, warmup):
    with pytest.raises(ValueError):
        warmup_cosine(step, total, warmup, 1.0)


def test_scale_lr():
    assert scale_lr(0.2, 2048) == pytest.approx(1.6)
    assert scale_lr(0.0048, 256) == pytest.approx(0.0048)
    assert scale_lr(0.3, 512, reference_batch=128) == pytest.approx(1.2)
