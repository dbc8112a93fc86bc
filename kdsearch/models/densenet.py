"""CIFAR DenseNets with bottleneck layers and compression (Huang et al. 2017, "Densely Connected
Convolutional Networks"), two configurations of one implementation:

* ``densenet_bc_190_40``: the paper's DenseNet-BC (L=190, k=40) for CIFAR: a 3x3 ``conv1`` stem with 2k
  channels, three dense blocks of (190 - 4) / 6 = 31 bottleneck layers each, transitions with compression
  0.5; 25.6 M params (Table 2). The seed's CIFAR-10 teacher.
* ``densenet121``: the CIFAR DenseNet-121 of kuangliu/pytorch-cifar: k = 32, blocks 6-12-24-16, a 3x3
  stride-1 ``conv1`` stem with 2k channels, compression 0.5; about 7.0 M params. A CIFAR-100 teacher in the seed.

A bottleneck layer is BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); a transition is BN-ReLU-conv1x1-avgpool2.
Final BN-ReLU, global pooling, classifier ``fc``.

``memory_efficient=True`` recomputes each layer's concatenation + BN-ReLU-conv1x1 in the backward pass with
``torch.utils.checkpoint`` (Pleiss et al. 2017, "Memory-Efficient Implementation of DenseNets"): the
activation memory of DenseNet-BC-190-40 then grows linearly, not quadratically, with depth. It is for FP32
training only: forward hooks (quantizer observers) fire twice on recomputed layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .registry import register_model
from .weight_init import init_weights


@contextlib.contextmanager
def _keep_running_stats(bn: nn.BatchNorm2d) -> Iterator[None]:
    """Undo the running-statistics update of a recomputed BN forward.

    Checkpoint recomputation runs ``bn`` in training mode a second time, which would update its running
    mean/var (and ``num_batches_tracked``) twice per step and so change the model being trained.
    """
    saved = [b.detach().clone() for b in bn.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(bn.buffers(), saved):
                buf.copy_(old)


class DenseLayer(nn.Module):
    """Bottleneck dense layer: takes the list of all earlier feature maps, returns ``growth_rate`` new ones."""

    def __init__(self, in_planes: int, growth_rate: int, bn_size: int, memory_efficient: bool) -> None:
        super().__init__()
        inter = bn_size * growth_rate
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)
        self.memory_efficient = memory_efficient

    def _bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.relu1(self.bn1(torch.cat(features, 1))))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and any(f.requires_grad for f in features):
            out = checkpoint(
                self._bottleneck,
                *features,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _keep_running_stats(self.bn1)),
            )
        else:
            out = self._bottleneck(*features)
        return self.conv2(self.relu2(self.bn2(out)))


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; each sees the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, in_planes: int, growth_rate: int, bn_size: int, memory_efficient: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_planes + i * growth_rate, growth_rate, bn_size, memory_efficient) for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression) - 2x2 average pooling between dense blocks."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """DenseNet-BC for 32x32 inputs: stem ``conv1`` (2k channels), dense blocks, transitions, ``fc``."""

    def __init__(
        self,
        block_config: tuple[int, ...],
        growth_rate: int,
        num_classes: int = 10,
        compression: float = 0.5,
        bn_size: int = 4,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if not block_config or min(block_config) < 1:
            raise ValueError(f"DenseNet: block_config must be positive layer counts, got {block_config}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"DenseNet: compression must be in (0, 1], got {compression}")
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, 3, stride=1, padding=1, bias=False)
        stages = []
        for i, num_layers in enumerate(block_config):
            stages.append(DenseBlock(num_layers, planes, growth_rate, bn_size, memory_efficient))
            planes += num_layers * growth_rate
            if i < len(block_config) - 1:
                out_planes = int(math.floor(planes * compression))
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model(tags=("teacher",))
def densenet_bc_190_40(num_classes: int = 10, **kw: Any) -> DenseNet:
    """DenseNet-BC, L=190, k=40 (25.6 M params): 3 blocks x 31 bottleneck layers."""
    n = (190 - 4) // 6
    return DenseNet((n, n, n), growth_rate=40, num_classes=num_classes, **kw)


@register_model(tags=("teacher",))
def densenet121(num_classes: int = 10, **kw: Any) -> DenseNet:
    """kuangliu/pytorch-cifar DenseNet-121 (k=32, blocks 6-12-24-16; about 7.0 M params)."""
    return DenseNet((6, 12, 24, 16), growth_rate=32, num_classes=num_classes, **kw)
