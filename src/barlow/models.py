"""Backbones, the projector, and the two-view Barlow Twins network.

Backbones keep torchvision's module names (conv1, bn1, layer1..layer4, fc) so that
`backbone_state_dict` exports checkpoints in torchvision's layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from barlow.config import parse_projector_sizes

ARCHS = ("resnet50", "small_resnet")


def resnet50_backbone() -> tuple[nn.Module, int]:
    """torchvision ResNet-50, residual branches' last BN γ zeroed, fc = Identity: 2048-d."""
    net = torchvision.models.resnet50(weights=None, zero_init_residual=True)
    net.fc = nn.Identity()
    return net, 2048


class SmallResNet(nn.Module):
    """ResNet of BasicBlocks for 28–32 px images (the usual CIFAR variant).

    A 3×3 stride-1 stem without max-pool keeps the resolution that a 7×7 stride-2 stem
    and pooling would cut from 32 to 8 before the first block. Stage widths are
    width·(1, 2, 4, 8) with strides (1, 2, 2, 2); output 8·width after global pooling.
    """

    def __init__(self, width: int = 64, layers: Sequence[int] = (2, 2, 2, 2),
                 in_channels: int = 3) -> None:
        super().__init__()
        if width < 1 or len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"small_resnet needs width >= 1 and four stage depths >= 1, "
                             f"got width={width}, layers={tuple(layers)}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0], stride=1)
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.out_dim = 8 * width
        # torchvision's ResNet initialisation, zero_init_residual=True included: each
        # block starts as the identity, as in the ResNet-50 backbone.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))
        stage = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        stage += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_resnet(width: int = 64, layers: Sequence[int] = (2, 2, 2, 2),
                 in_channels: int = 3) -> tuple[nn.Module, int]:
    """`SmallResNet` and its feature dim 8·width; (64, (2, 2, 2, 2)) is CIFAR ResNet-18."""
    net = SmallResNet(width, layers, in_channels)
    return net, net.out_dim


def build_backbone(arch: str, width: int = 64, layers: Sequence[int] = (2, 2, 2, 2),
                   in_channels: int = 3) -> tuple[nn.Module, int]:
    """Backbone and feature dim by name.

    "resnet50": the paper's ImageNet backbone (fixed shape; width, layers and
    in_channels are not used). "small_resnet": `SmallResNet(width, layers, in_channels)`.
    """
    if arch == "resnet50":
        return resnet50_backbone()
    if arch == "small_resnet":
        return small_resnet(width, layers, in_channels)
    raise ValueError(f"backbone {arch!r} is not one of {list(ARCHS)}")


class Projector(nn.Sequential):
    """MLP head: one block per hidden layer, then a bare Linear without bias.

    ``sizes`` lists the output widths: "8192-8192-8192" is the paper's 2048 → 8192 →
    8192 → 8192 head. ``batch_norm`` chooses the hidden blocks (the paper's loss
    ablations, "no BN in MLP"):

        true:  h ← ReLU(BN(W h))       Linear without bias → BatchNorm1d → ReLU, as the
                                       reference: BN subtracts the batch mean, which
                                       would cancel a bias, and adds its own β
        false: h ← ReLU(W h + b)       Linear with bias → ReLU: with no BN to supply the
                                       offset, each unit keeps its own bias, as in any
                                       plain MLP

    The last Linear has no bias either way, as in the reference: with the loss's
    batch normalisation a bias there would cancel; with "feature" or "none"
    normalisation it would not, and this head still has none, so the two switches
    change only what they name.
    """

    def __init__(self, in_dim: int, sizes: str, batch_norm: bool = True) -> None:
        dims = [in_dim, *parse_projector_sizes(sizes)]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-2], dims[1:-1]):
            if batch_norm:
                layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out)]
            else:
                layers += [nn.Linear(d_in, d_out, bias=True)]
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        super().__init__(*layers)
        self.out_dim = dims[-1]


class BarlowTwins(nn.Module):
    """Backbone + projector, applied to the two views in one forward call.

    Each view goes through the network on its own, so every batch norm normalises a
    view by that view's statistics, as in the reference; concatenating the views would
    mix both views' statistics. One call per step also keeps DDP to the one forward
    per backward it expects.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, y1: Tensor, y2: Tensor) -> tuple[Tensor, Tensor]:
        return self.projector(self.backbone(y1)), self.projector(self.backbone(y2))


def backbone_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights in torchvision layout, from a BarlowTwins model that may
    be wrapped in DDP or torch.compile (their "module." / "_orig_mod." prefixes never
    appear); a bare backbone is returned as is."""
    while True:
        inner = [getattr(model, name) for name in ("module", "_orig_mod")
                 if isinstance(getattr(model, name, None), nn.Module)]
        if not inner:
            break
        model = inner[0]
    if isinstance(model, BarlowTwins):
        model = model.backbone
    return dict(model.state_dict())
