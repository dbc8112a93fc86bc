"""A tiny plain CNN (~25 k params) for tests that need a real, trainable model in milliseconds.

Three conv-BN-ReLU layers (16, 32, 64 channels; the last two at stride 2), global average pooling and the
``fc`` classifier. Layer names follow the zoo: ``conv1``..``conv3``, ``bn1``..``bn3``, ``relu1``..``relu3``, ``fc``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import register_model
from .weight_init import init_weights


class TinyCNN(nn.Module):
    """conv-bn-relu x3 -> global average pool -> fc."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"TinyCNN: widths must be three positive channel counts, got {widths}")
        in_planes = 3
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(in_planes, width, 3, stride=stride, padding=1, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(width))
            self.add_module(f"relu{i}", nn.ReLU(inplace=False))
            in_planes = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in (1, 2, 3):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(tags=("small",))
def tiny_cnn(num_classes: int = 10, **kw: Any) -> TinyCNN:
    """The smallest model in the zoo, for very fast tests."""
    return TinyCNN(num_classes=num_classes, **kw)
