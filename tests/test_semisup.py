"""Tests of barlow.semisup's pieces apart from a whole run (tests/test_semisup_stage.py
runs the stage end to end): the weight-change measure and each run's starting point."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from barlow.semisup import relative_change, run_backbone

# run_backbone reads these three fields of a ModelConfig only.
MODEL = SimpleNamespace(arch="small_resnet", width=4, layers=(1, 1, 1, 1))


def test_relative_change_hand_computed():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
    before = {k: p.detach().clone() for k, p in layer.named_parameters()}
    assert relative_change(before, layer) == 0.0
    with torch.no_grad():
        layer.weight.add_(torch.tensor([[0.0, 0.5]]))
    assert relative_change(before, layer) == pytest.approx(0.5 / 5.0)


def test_runs_start_from_the_file_or_from_the_seed(tmp_path):
    saved, saved_dim = run_backbone("scratch", MODEL, "", seed=1)
    weights = tmp_path / "backbone.pt"
    torch.save(saved.state_dict(), weights)
    torch.manual_seed(99)  # the pretrained run does not depend on the global RNG
    barlow, dim = run_backbone("barlow", MODEL, weights, seed=0)
    again, _ = run_backbone("scratch", MODEL, "", seed=1)
    other, _ = run_backbone("scratch", MODEL, "", seed=2)
    for key, value in saved.state_dict().items():
        assert torch.equal(barlow.state_dict()[key], value)
        assert torch.equal(again.state_dict()[key], value)
    assert not all(torch.equal(other.state_dict()[k], v) for k, v in saved.state_dict().items())
    assert dim == saved_dim
    with pytest.raises(ValueError, match="unknown run"):
        run_backbone("linear", MODEL, weights, seed=0)
