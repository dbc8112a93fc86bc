"""Wide residual networks, WRN-d-k (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

CIFAR variant: a 3x3 ``conv1`` stem with 16 channels, three stages of n = (d - 4) / 6 pre-activation wide
basic blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) at 16k, 32k, 64k channels, strides 1-2-2, then
BN-ReLU, global average pooling and the ``fc`` classifier. Where a block changes shape the shortcut is a
1x1 conv (no BN) applied to the block's pre-activated input, as in the authors' code.

Published sizes (Table 1 / the authors' repo, 10 classes): WRN-28-10 36.5 M, WRN-28-4 5.9 M,
WRN-16-4 2.7 M, WRN-16-2 0.69 M. ``drop_rate`` (default 0.0) is the paper's dropout between the convs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import register_model
from .residual import ResidualAdd
from .weight_init import init_weights


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block, B(3, 3) in the paper's notation."""

    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        self.add = ResidualAdd()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return self.add(out, x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs (works for any input size via global pooling)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet: depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet: widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"WideResNet: drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        in_planes = 16
        for i, width in enumerate(widths):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(WideBasicBlock(in_planes, width, stride=stride, drop_rate=drop_rate))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(tags=("teacher",))
def wrn_28_10(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-28-10 (36.5 M params): the seed's strongest CIFAR-10 / CIFAR-100 teacher."""
    return WideResNet(28, 10, num_classes=num_classes, **kw)


@register_model(tags=("teacher",))
def wrn_28_4(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-28-4 (5.9 M params): a CIFAR-10 teacher in the seed."""
    return WideResNet(28, 4, num_classes=num_classes, **kw)


@register_model(tags=("small", "teacher"))
def wrn_16_4(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-16-4 (2.7 M params): a mid-sized teacher for CPU runs."""
    return WideResNet(16, 4, num_classes=num_classes, **kw)


@register_model(tags=("small", "teacher"))
def wrn_16_2(num_classes: int = 10, **kw: Any) -> WideResNet:
    """WRN-16-2 (0.69 M params): the CPU-sized teacher for tests and smoke runs."""
    return WideResNet(16, 2, num_classes=num_classes, **kw)
