"""The ONNX-traceable arithmetic of a quantized layer: QuantizeLinear/DequantizeLinear-shaped autograd functions.

Kept apart from `onnx_export` (which prepares a model and calls the exporter) so that the layers can use it
while being traced without importing the exporter: the quant package's modules import in one direction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantizers import HalfQuantizer


class _ActQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: float, qn: int, qp: int, signed: bool) -> Tensor:  # type: ignore[override]
        return torch.clamp(torch.round(x / step), -qn, qp) * step

    @staticmethod
    def symbolic(g, x, step: float, qn: int, qp: int, signed: bool):  # type: ignore[no-untyped-def]
        const = lambda t: g.op("Constant", value_t=t)  # noqa: E731
        s = const(torch.tensor(step, dtype=torch.float32))
        zp = const(torch.tensor(0, dtype=torch.int8 if signed else torch.uint8))
        lo, hi = const(torch.tensor(-qn * step, dtype=torch.float32)), const(torch.tensor(qp * step, dtype=torch.float32))
        q = g.op("QuantizeLinear", g.op("Clip", x, lo, hi), s, zp)
        return g.op("DequantizeLinear", q, s, zp)


class _WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zp: Tensor) -> Tensor:  # type: ignore[override]
        return q.float() * scale.view(-1, *([1] * (q.dim() - 1)))

    @staticmethod
    def symbolic(g, q, scale, zp):  # type: ignore[no-untyped-def]
        return g.op("DequantizeLinear", q, scale, zp, axis_i=0)


class _HalfCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clamp(-65504.0, 65504.0).half().float()

    @staticmethod
    def symbolic(g, x):  # type: ignore[no-untyped-def]
        return g.op("Cast", g.op("Cast", x, to_i=10), to_i=1)  # 10 = FLOAT16, 1 = FLOAT


def qdq_operands(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The (input, weight) of a quantized layer as QDQ-expressible ops; used while exporting to ONNX."""
    cache = getattr(layer, "_onnx_cache", None)
    if cache is None:
        raise RuntimeError("qdq_operands: use kdsearch.quant.export_onnx, which prepares the layers")
    if "act" in cache:
        x = _ActQDQ.apply(x, *cache["act"])
    elif isinstance(layer.act_quantizer, HalfQuantizer):
        x = _HalfCast.apply(x)
    if "weight" in cache:
        w = _WeightDQ.apply(*cache["weight"])
    elif "half_weight" in cache:
        w = cache["half_weight"]
    else:
        w = layer.weight
    return x, w
