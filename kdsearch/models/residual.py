"""The residual add as a module of its own: ``branch + shortcut``.

Why a module: an integer runtime adds quantized tensors only (ONNX Runtime's ``QLinearAdd``, HAWQ-V3's
integer-only residual blocks), so the quantized model must see the add to quantize its inputs during QAT the
way the deployed graph will (`kdsearch.quant.quantize` swaps it for ``QuantResidualAdd``). In float it is the
plain sum; it has no parameters, so checkpoints of the zoo's models are unchanged by it.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualAdd(nn.Module):
    """``branch + shortcut`` (the block's residual branch first, its shortcut second)."""

    def forward(self, branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return branch + shortcut
