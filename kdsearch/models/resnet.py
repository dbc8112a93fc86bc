"""CIFAR ResNets with post-activation basic blocks (He et al. 2016, "Deep Residual Learning").

Two families share one implementation, differing only in stem width, stage widths and depth:

* ``resnet18``: the CIFAR ResNet-18 of kuangliu/pytorch-cifar, the seed's CIFAR-100 student: a 3x3 stride-1
  ``conv1`` stem (64 ch, no max-pool), BasicBlocks [2, 2, 2, 2] at 64-128-256-512 channels.
  11,220,132 parameters for 100 classes (44.9 MB FP32; the seed's "44.8 MB" is 11.2 M x 4 B).
* ``resnet20`` / ``resnet8``: He et al.'s CIFAR ResNets (Sec. 4.2), 6n+2 layers at 16-32-64 channels.
  Shortcuts are option B (1x1 conv + BN where the shape changes) rather than the paper's parameter-free
  option A (zero padding): every shortcut is then an ordinary quantizable ``nn.Conv2d``, and it is the
  same block as ResNet-18's. This adds 2,752 parameters to ResNet-20 (269,722 -> 272,474 for 10 classes).

Layer names: stem ``conv1``/``bn1``/``relu``, stages ``layer1``..``layerN``, classifier ``fc``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import register_model
from .residual import ResidualAdd
from .weight_init import init_weights


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (a separate ReLU module per use)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.add = ResidualAdd()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class CifarResNet(nn.Module):
    """A 3x3 stride-1 stem, stages of BasicBlocks (the first stage at stride 1, the others at 2), global pool."""

    def __init__(
        self, widths: tuple[int, ...], blocks: tuple[int, ...], num_classes: int = 10, stem_width: int | None = None
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"CifarResNet: widths {widths} and blocks {blocks} must be non-empty, of equal length")
        stem = widths[0] if stem_width is None else stem_width
        self.conv1 = nn.Conv2d(3, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        in_planes = stem
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, width, stride=(2 if i > 0 and j == 0 else 1)))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def _he_resnet(depth: int, num_classes: int, **kw: Any) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"He CIFAR ResNet: depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((16, 32, 64), (n, n, n), num_classes=num_classes, **kw)


@register_model(tags=("student",))
def resnet18(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """kuangliu/pytorch-cifar ResNet-18 (the seed's CIFAR-100 student)."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes=num_classes, **kw)


@register_model(tags=("small", "student"))
def resnet20(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """He et al. ResNet-20 (option-B shortcuts): the CPU-sized student."""
    return _he_resnet(20, num_classes, **kw)


@register_model(tags=("small",))
def resnet8(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """He et al. ResNet-8 (option-B shortcuts): a very small residual net for fast tests."""
    return _he_resnet(8, num_classes, **kw)
