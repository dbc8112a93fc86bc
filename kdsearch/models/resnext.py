"""CIFAR ResNeXt-29 (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks", Sec. 5.3).

A 3x3 ``conv1`` stem with 64 channels, three stages of 3 bottleneck blocks with outputs 256-512-1024 at
strides 1-2-2, global pooling and the ``fc`` classifier: 3 x 3 x 3 + 2 = 29 layers. A block is
conv1x1(D)-BN-ReLU-grouped conv3x3(D, groups=C)-BN-ReLU-conv1x1(out)-BN, plus the shortcut (1x1 conv + BN
where the shape changes), then ReLU; the bottleneck width D = C x d x (out / 256) doubles with each stage,
as in the authors' CIFAR code (template (C x d) = 8 x 64d: D = 512, 1024, 2048). 34.4 M params (Table 7).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import register_model
from .residual import ResidualAdd
from .weight_init import init_weights


class ResNeXtBottleneck(nn.Module):
    """Aggregated transform as a grouped convolution (the paper's form (c), Fig. 3)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, cardinality: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )
        self.add = ResidualAdd()
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.add(out, self.shortcut(x)))


class CifarResNeXt(nn.Module):
    """ResNeXt-(9n+2) for 32x32 inputs with ``cardinality`` groups of ``base_width`` channels in stage 1."""

    def __init__(
        self, depth: int = 29, cardinality: int = 8, base_width: int = 64, num_classes: int = 10, widen_factor: int = 4
    ) -> None:
        super().__init__()
        if (depth - 2) % 9 != 0 or depth < 11:
            raise ValueError(f"CifarResNeXt: depth must be 9n+2 with n >= 1, got {depth}")
        if cardinality < 1 or base_width < 1:
            raise ValueError(f"CifarResNeXt: cardinality and base_width must be >= 1, got {cardinality}, {base_width}")
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        in_planes = 64
        for i in range(3):
            out_planes = 64 * widen_factor * 2**i
            width = cardinality * base_width * 2**i
            stage = []
            for j in range(n):
                stage.append(ResNeXtBottleneck(in_planes, out_planes, 2 if i > 0 and j == 0 else 1, cardinality, width))
                in_planes = out_planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(tags=("teacher",))
def resnext29_8x64d(num_classes: int = 10, **kw: Any) -> CifarResNeXt:
    """ResNeXt-29, 8x64d (34.4 M params): a CIFAR-100 teacher in the seed."""
    return CifarResNeXt(29, cardinality=8, base_width=64, num_classes=num_classes, **kw)
