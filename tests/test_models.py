"""Backbone shapes and layouts, the projector spec, and the two-view model."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from barlow.config import ModelConfig
from barlow.models import (BarlowTwins, Projector, backbone_state_dict, build_backbone,
                           parse_projector_sizes, resnet50_backbone, small_resnet)
from barlow.train import build_model


@pytest.fixture(scope="module")
def resnet50():
    return resnet50_backbone()


def test_resnet50_shape(resnet50):
    net, dim = resnet50
    assert dim == 2048
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2048)


def test_resnet50_state_dict_loads_into_torchvision(resnet50):
    net, _ = resnet50
    target = torchvision.models.resnet50()
    result = target.load_state_dict(backbone_state_dict(net), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"]
    assert result.unexpected_keys == []


@pytest.mark.parametrize("width,layers", [(64, (2, 2, 2, 2)), (8, (1, 2, 1, 1))])
@pytest.mark.parametrize("size,channels", [(32, 3), (28, 1)])
def test_small_resnet_shapes(width, layers, size, channels):
    net, dim = small_resnet(width, layers, in_channels=channels)
    assert dim == 8 * width
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, dim)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == list(layers)


def test_small_resnet18_has_torchvision_layout():
    net, _ = small_resnet()
    ours = {k: v.shape for k, v in net.state_dict().items()}
    theirs = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items()}
    assert set(theirs) - set(ours) == {"fc.weight", "fc.bias"}
    assert set(ours) <= set(theirs)
    # Only the stem differs: 3×3 instead of 7×7.
    assert [k for k in ours if ours[k] != theirs[k]] == ["conv1.weight"]
    assert ours["conv1.weight"] == (64, 3, 3, 3)


def test_small_resnet_resolution_kept_by_stem():
    net, _ = small_resnet(width=4, layers=(1, 1, 1, 1))
    features = {}
    net.layer1.register_forward_hook(lambda m, i, o: features.setdefault("layer1", o))
    net(torch.randn(2, 3, 32, 32))
    assert features["layer1"].shape[-2:] == (32, 32)


def test_zero_init_residual(resnet50):
    small, _ = small_resnet(width=8, layers=(1, 1, 1, 1))
    for net, block_type, last_bn in [(resnet50[0], Bottleneck, "bn3"),
                                     (small, BasicBlock, "bn2")]:
        blocks = [m for m in net.modules() if isinstance(m, block_type)]
        assert blocks
        for block in blocks:
            assert torch.all(getattr(block, last_bn).weight == 0)
        assert torch.all(net.bn1.weight == 1)


def test_build_backbone_dispatch():
    net, dim = build_backbone("small_resnet", width=4, layers=(1, 1, 1, 1))
    assert dim == 32 and net.layer4[0].conv1.out_channels == 32
    with pytest.raises(ValueError, match="'resnet18'"):
        build_backbone("resnet18")
    with pytest.raises(ValueError):
        small_resnet(width=4, layers=(1, 1, 1))


def test_parse_projector_sizes():
    assert parse_projector_sizes("8192-8192-8192") == [8192, 8192, 8192]
    assert parse_projector_sizes("64") == [64]
    for bad in ["", "8192--8192", "8192-x", "8192-0", "-5", "8192-8192-"]:
        with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[")):
            parse_projector_sizes(bad)


def test_projector_structure():
    proj = Projector(16, "32-32-8")
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU,
                     nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert proj(torch.randn(4, 16)).shape == (4, 8)
    assert proj.out_dim == 8
    assert [type(m) for m in Projector(16, "8")] == [nn.Linear]


def test_projector_without_batch_norm():
    proj = Projector(16, "32-32-8", batch_norm=False)
    assert [type(m) for m in proj] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in proj.modules())
    # Hidden Linears keep their biases (no BN to supply the offset); the last has none.
    assert [m.bias is not None for m in proj if isinstance(m, nn.Linear)] == [True, True, False]
    # Without BN each sample's embedding depends on that sample alone, in training mode.
    x = torch.randn(6, 16)
    torch.testing.assert_close(proj.train()(x)[:2], proj(x[:2]))
    assert [type(m) for m in Projector(16, "8", batch_norm=False)] == [nn.Linear]


def test_build_model_reads_projector_bn():
    cfg = dict(arch="small_resnet", width=4, layers=(1, 1, 1, 1), projector="16-8")
    with_bn = build_model(ModelConfig(**cfg, projector_bn=True)).projector
    without = build_model(ModelConfig(**cfg, projector_bn=False)).projector
    assert [type(m) for m in with_bn] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [type(m) for m in without] == [nn.Linear, nn.ReLU, nn.Linear]


def test_barlow_twins_normalises_each_view_by_its_own_batch():
    torch.manual_seed(0)
    backbone, dim = small_resnet(width=4, layers=(1, 1, 1, 1))
    model = BarlowTwins(backbone, Projector(dim, "16-8")).train()
    y1, y2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 5 + 2
    z1, z2 = model(y1, y2)
    assert z1.shape == z2.shape == (4, 8)
    # Same as running each view alone: the other view's statistics never leak in.
    torch.testing.assert_close(model(y1, torch.randn(4, 3, 8, 8))[0], z1)


def test_backbone_state_dict_unwraps():
    backbone, dim = small_resnet(width=4, layers=(1, 1, 1, 1))
    model = BarlowTwins(backbone, Projector(dim, "8"))
    want = backbone.state_dict()
    ddp_like = nn.Module()  # DDP keeps the model as .module; building a real one needs a group
    ddp_like.module = torch.compile(model)  # compiles lazily: construction is free
    for source in (model, ddp_like, backbone):
        got = backbone_state_dict(source)
        assert list(got) == list(want)
        assert not any(k.startswith(("module.", "backbone.", "_orig_mod.")) for k in got)
