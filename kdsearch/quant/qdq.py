"""What a QAT model says each quantized layer computes, read once, as plain numbers for the ONNX exporter.

The exporter (`onnx_export`) never reads a quantizer's parameters itself: the step of an activation quantizer
(``act_step``), the integer codes and per-channel steps of a weight quantizer (``effective_step`` and
``integers``, the quantizers' public interface) are read here, so a change in how the quantizers store their
steps (a fixed buffer, a log-parameterised step) touches one function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .quantizers import HalfQuantizer, LsqActQuantizer, LsqWeightQuantizer


def act_step(aq: nn.Module) -> float:
    """The step an activation quantizer rounds with (positive)."""
    if hasattr(aq, "effective_step"):
        return float(aq.effective_step().reshape(-1)[0])
    return float(aq.step.float().clamp_min(1e-8).reshape(-1)[0])


@dataclass(frozen=True)
class ActGrid:
    """A layer's input grid: ``clamp(round(x / step), -qn, qp) * step`` (LSQ's signed or unsigned range).

    On 8 bits this is exactly a uint8 grid with zero point ``qn`` (0 unsigned, 128 signed): a signed 8-bit grid
    [-128..127]*s is the uint8 grid [0..255] shifted by 128, so nothing changes numerically. Below 8 bits the
    uint8 grid is wider than the layer's, and the exporter clips to [-qn*s, qp*s] as well.
    """

    step: float
    bits: int
    signed: bool

    @property
    def qn(self) -> int:
        return 2 ** (self.bits - 1) if self.signed else 0

    @property
    def qp(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def zero_point(self) -> int:
        return self.qn

    @property
    def narrower_than_uint8(self) -> bool:
        return self.qn + self.qp < 255

    @classmethod
    def of(cls, aq: LsqActQuantizer) -> "ActGrid":
        """The grid an (initialized) activation quantizer rounds to."""
        return cls(act_step(aq), int(aq.bits), bool(aq.is_signed))


@dataclass(frozen=True)
class LayerQuant:
    """One quantized conv/linear as the exporter needs it.

    ``codes``/``scale``: the int8 weight codes (the layer's b-bit integers, b <= 8) and the per-output-channel
    step, or None for a 16-bit layer (``half_weight``: its fp16-rounded weight). ``act``: the input grid of an
    integer layer; ``half_input``: the input is rounded to fp16 (a 16-bit layer).
    """

    name: str
    weight_bits: int
    codes: np.ndarray | None
    scale: np.ndarray | None
    act: ActGrid | None
    half_input: bool
    half_weight: Tensor | None

    @property
    def integer(self) -> bool:
        return self.codes is not None and self.act is not None


@torch.no_grad()
def layer_quant(name: str, layer: nn.Module) -> LayerQuant:
    """Read one quantized layer (``is_quant_layer``); raises if its activation quantizer never saw data."""
    aq, wq = layer.act_quantizer, layer.weight_quantizer
    act = None
    if isinstance(aq, LsqActQuantizer):
        if not aq.is_initialized:
            raise ValueError(f"export_onnx: activation quantizer of {name!r} never saw data; calibrate first")
        act = ActGrid.of(aq)
    codes = scale = half_weight = None
    if isinstance(wq, LsqWeightQuantizer):
        codes = wq.integers(layer.weight).cpu().numpy().astype(np.int8)
        scale = wq.effective_step().detach().float().cpu().numpy()
    elif isinstance(wq, HalfQuantizer):
        half_weight = layer.weight.detach().float().clamp(-65504.0, 65504.0).half().float().cpu()
    return LayerQuant(name, int(layer.weight_bits), codes, scale, act, isinstance(aq, HalfQuantizer), half_weight)


@dataclass(frozen=True)
class AddQuant:
    """One quantized residual add (``QuantResidualAdd``): the grids of its branch and shortcut inputs."""

    name: str
    branch: ActGrid
    shortcut: ActGrid


@torch.no_grad()
def add_quant(name: str, add: nn.Module) -> AddQuant:
    """Read one ``QuantResidualAdd``; raises if a grid never saw data."""
    grids = []
    for which in ("branch", "shortcut"):
        q = add.grid(which)
        if not q.is_initialized:
            raise ValueError(f"export_onnx: the {which} quantizer of residual add {name!r} never saw data; "
                             "calibrate first")
        grids.append(ActGrid.of(q))
    return AddQuant(name, *grids)


def qdq_operands(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Kept for the layers' export hook: the exporter now runs quantized layers as float convs and writes the
    quantization into the ONNX graph itself (``export_onnx``), so a quantized layer is never traced directly."""
    raise RuntimeError("a quantized layer cannot be traced by itself: use kdsearch.quant.export_onnx")
