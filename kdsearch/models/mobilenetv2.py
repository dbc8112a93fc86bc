"""CIFAR MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

The variant of kuangliu/pytorch-cifar, the seed's CIFAR-10 student: exactly 2,296,922 parameters for
10 classes (9.2 MB FP32 = 2.3 M x 4 B). Differences from the ImageNet network, all for 32x32 inputs:
stride 1 in the ``conv1`` stem and in the second stage (so the last feature map is 4x4), BN after every
conv, and a 1x1 conv + BN shortcut in stride-1 blocks whose channel count changes (so every stride-1 block
is residual). Stride-2 blocks have no residual.

Activations are ``nn.ReLU`` like kuangliu's (``activation="relu6"`` gives the paper's ReLU6); the last
1x1 conv of each block is linear (no activation), as in the paper.

``width_mult`` scales every channel count (rounded to a multiple of 8, as in torchvision / the paper's
reference code) except the 1280-d last conv, which is only ever widened (``max(1, width_mult)``), as in
torchvision. ``mobilenetv2_x0_5`` and ``mobilenetv2_x0_25`` are the CPU-sized variants.

Layer names: stem ``conv1``/``bn1``, blocks ``layers.<i>.conv1..conv3`` (expand, depthwise, project),
``layers.<i>.shortcut.0`` (shortcut conv), last conv ``conv2``/``bn2``, classifier ``fc``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import register_model
from .residual import ResidualAdd
from .weight_init import init_weights

# (expansion t, output channels c, blocks n, first stride s), the paper's Table 2 with CIFAR strides.
CIFAR_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the paper; 1 for 32x32 inputs
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it (torchvision's rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise (3x3) - linear project (1x1), each followed by BN."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        planes = expansion * in_planes
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = act(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = act(inplace=False)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))
        self.add = ResidualAdd() if stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.add(out, self.shortcut(x)) if self.add is not None else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (see the module docstring for the CIFAR changes)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, activation: str = "relu") -> None:
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"MobileNetV2: width_mult must be > 0, got {width_mult}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MobileNetV2: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        in_planes = make_divisible(32 * width_mult)
        last_planes = make_divisible(1280 * max(1.0, width_mult))
        self.conv1 = nn.Conv2d(3, in_planes, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = act(inplace=False)
        blocks = []
        for expansion, channels, num_blocks, stride in CIFAR_CFG:
            out_planes = make_divisible(channels * width_mult)
            for i in range(num_blocks):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if i == 0 else 1, act))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, last_planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_planes)
        self.act2 = act(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.act1(self.bn1(self.conv1(x))))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(tags=("student",))
def mobilenetv2(num_classes: int = 10, **kw: Any) -> MobileNetV2:
    """kuangliu/pytorch-cifar MobileNetV2 (2,296,922 params for 10 classes): the seed's CIFAR-10 student."""
    return MobileNetV2(num_classes=num_classes, **kw)


@register_model(tags=("small",))
def mobilenetv2_x0_5(num_classes: int = 10, **kw: Any) -> MobileNetV2:
    """MobileNetV2 at width 0.5: the seed's student shape at a CPU-trainable size."""
    return MobileNetV2(num_classes=num_classes, **{"width_mult": 0.5, **kw})


@register_model(tags=("small",))
def mobilenetv2_x0_25(num_classes: int = 10, **kw: Any) -> MobileNetV2:
    """MobileNetV2 at width 0.25: the smallest depthwise-separable net in the zoo, for fast tests."""
    return MobileNetV2(num_classes=num_classes, **{"width_mult": 0.25, **kw})
