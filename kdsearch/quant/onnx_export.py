"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes: the standard form runtimes fuse into int8 kernels.

What ONNX (opset 13) can express, and how each layer is written:

* integer weights (2-8 bits): an int8 initializer holding the codes q and ``DequantizeLinear(q, step, 0,
  axis=0)``. Exact for every bit-width, but sub-8-bit codes occupy a whole int8 each: ONNX has no 2/3/5/6-bit
  type (int4 only from opset 21), so the *compressed* artifact is the safetensors file, not the ONNX one.
* integer activations (2-8 bits): ``Clip(x, -Qn*s, Qp*s) -> QuantizeLinear(s, zp) -> DequantizeLinear``,
  zero point int8 (signed) or uint8 (unsigned). The Clip narrows the 8-bit container to the layer's b-bit
  range, so the QDQ pair reproduces LSQ's b-bit rounding exactly.
* 16-bit layers: Cast to fp16 and back for inputs; weights as fp32 constants holding fp16-rounded values
  (the TorchScript exporter folds a constant fp16 -> fp32 Cast away whatever we emit).
  Constant folding is off: it would fold DequantizeLinear of the int8 codes back into fp32 weights.
* BatchNorm: the folded per-channel affine (Mul, Add), as in the safetensors file.

The graph's input is ``[batch, C, H, W]`` with a dynamic batch and fixed (C, H, W): the data's image shape,
given by the caller or recorded with the model (``export.input_shape_of``: a reloaded ``.kdq`` file carries
it), never assumed.

Needs the ``onnx`` package (PyTorch's TorchScript-based exporter refuses to run without it). Outputs match the
PyTorch model to float rounding: a conv whose sum is ordered differently can move a downstream activation
across a rounding boundary, so compare with a tolerance, not bitwise.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .export import checked_input_shape, input_shape_of
from .qdq import qdq_operands  # noqa: F401  (re-exported: the layers call it while exporting)
from .quantizers import HalfQuantizer, LsqActQuantizer, LsqWeightQuantizer


class _ChannelAffine(nn.Module):
    """BatchNorm folded to ``x * a + b`` (per channel), precomputed so the graph holds two constants."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a.detach().clone())
        self.register_buffer("b", b.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.a.view(shape) + self.b.view(shape)


@torch.no_grad()
def _prepare(model: nn.Module) -> None:
    """Precompute integer codes, steps and BN affines outside the trace (else their arithmetic is traced)."""
    from .api import _set_module
    from .layers import _EvalFoldMixin, is_quant_layer

    for name, m in list(model.named_modules()):
        if isinstance(m, _EvalFoldMixin):
            _set_module(model, name, _ChannelAffine(*m.folded_affine()))
        elif is_quant_layer(m):
            aq, wq = m.act_quantizer, m.weight_quantizer
            cache: dict[str, object] = {}
            if isinstance(aq, LsqActQuantizer):
                if not aq.is_initialized:
                    raise ValueError(f"export_onnx: activation quantizer of {name!r} never saw data; calibrate first")
                qn, qp = aq.qrange
                cache["act"] = (float(aq.effective_step()), qn, qp, aq.is_signed)
            if isinstance(wq, LsqWeightQuantizer):
                q = wq.integers(m.weight).to(torch.int8)
                cache["weight"] = (q, wq.effective_step().clone(), torch.zeros(q.shape[0], dtype=torch.int8))
            elif isinstance(wq, HalfQuantizer):
                cache["half_weight"] = m.weight.float().clamp(-65504.0, 65504.0).half().float()
            m._onnx_cache = cache


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None, example: Tensor | None) -> tuple[int, ...]:
    """The one per-sample shape that the caller's ``input_shape``, ``example``'s and the model's record agree on."""
    known = {
        "input_shape": None if input_shape is None else checked_input_shape(input_shape),
        "example_input": None if example is None else tuple(example.shape[1:]),
        "the model's recorded input shape": input_shape_of(model),
    }
    shapes = {k: v for k, v in known.items() if v is not None}
    if not shapes:
        raise ValueError("export_onnx: pass input_shape=(C, H, W), the data's image shape; the model records none")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"export_onnx: the input shapes disagree: {shapes}")
    return next(iter(shapes.values()))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor | None = None,
    opset: int = 13,
    *,
    input_shape: Sequence[int] | None = None,
) -> None:
    """Write ``model`` (quantized, calibrated; CPU) as ONNX with QDQ nodes, atomically.

    The input's per-sample shape comes from ``input_shape`` (the data's image shape), ``example_input``
    (traced instead of zeros) or the shape recorded with the model; given more than one, they must agree.
    """
    if importlib.util.find_spec("onnx") is None:  # PyTorch's exporter itself needs it
        raise ImportError("export_onnx needs the 'onnx' package: pip install onnx")
    from kdsearch.io import atomic_path

    shape = _input_shape(model, input_shape, example_input)
    example = example_input if example_input is not None else torch.zeros(1, *shape)
    m = copy.deepcopy(model).cpu().eval()
    _prepare(m)
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            m, (example.cpu(),), str(tmp), dynamo=False, opset_version=opset, do_constant_folding=False,
            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
