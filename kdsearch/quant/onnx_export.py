"""ONNX export in the integer form that ONNX Runtime's CPU provider fuses into integer kernels (QDQ, opset 13).

What runs at which width in ORT (CPU provider, checked by ``onnx_fusion.check_fusion`` on every export):

* **Integer layers (weights 2-8 bits)**: ``QLinearConv`` / ``QGemm``, u8 x s8 -> int32, i.e. 8-bit speed
  whatever the searched width. Weights: per-output-channel symmetric int8 tensors holding the layer's own b-bit
  codes (a 4-bit layer's int8 tensor holds values in [-8, 7]), with the BatchNorm that follows the conv folded in
  (``W * a = q * (step * a)``: the codes stay, the per-channel scale becomes ``step * |a|``). Biases: int32 at
  scale ``input step * weight scale``. Activations: uint8 with a zero point. A signed b-bit grid [-Qn..Qp]*s is
  exactly the uint8 grid with zero point 128 (b = 8), an unsigned one zero point 0, so each layer's input is
  rounded exactly as in QAT; below 8 bits a float ``Clip`` to the layer's range comes first (8-bit containers).
  ONNX has no 2/3/5/6-bit type and ORT does not fuse int4, so the *compressed* artifact is the ``.kdq`` file.
* **The QAT model is the integer graph** (`integer_graph`): the BatchNorm after an integer layer adds its bias
  on the int32 accumulator grid, integer layers reading one tensor share one grid, and the zoo's residual adds
  add quantized inputs (``QuantResidualAdd``), whose grids the export takes. ORT's model then computes the `.kdq`
  model's function up to fp32 summation order.
* **Requantizations the QAT model does not have.** ORT needs a QuantizeLinear after every fused op. Where a
  layer's output reaches the next layer's input through at most a ReLU, the next layer's own grid is used
  (exact). Elsewhere a scale is calibrated (min/max, uint8) on images the caller gives (the run's validation
  images, never test): a layer output that feeds no quantized tensor (and a pooling's input that an integer
  layer produces), and the inputs and output of a residual ``Add`` that is not a ``ResidualAdd`` module (a user's
  model written with ``+``). Each such place is listed in the model's metadata (``kdsearch.requantized``);
  `kdsearch bench` measures the top-1 agreement with the `.kdq`. The zoo's models have none: a quantized add's
  output that no reader quantizes in QAT (the last block's, before the pooling) stays float, and so does the
  pooling, exactly as in QAT.
* **An integer layer read only by float layers** (a 16-bit layer right after it): QAT hands them its float
  output, which a fused integer conv cannot produce (it requantizes to 8 bits). It runs as an fp32 conv on its
  integer weights and input, exactly as in QAT, listed as float by design.
* **16-bit layers**: float ``Conv``/``Gemm`` in fp32 with fp16-rounded weights and an fp16-rounded input
  (``Cast`` there and back). ORT's CPU provider has no fp16/int16 conv, so they are float by design (metadata
  ``kdsearch.float_layers``); 32-bit layers stay float too. The residual adds and pooling around them stay float.
* The logits leave the last ``QGemm`` in fp32 (no output quantization).

``activations="int8"`` writes signed int8 activations instead (zero point shifted by -128, numerically the same):
ORT's x86 selectors do not fuse those everywhere; it exists to test that the fusion check catches it.

The graph's input is ``[batch, C, H, W]`` with a dynamic batch and fixed (C, H, W): the data's image shape,
given by the caller or recorded with the model (``export.input_shape_of``), never assumed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .export import checked_input_shape, input_shape_of
from .onnx_fusion import FLOAT_LAYERS_KEY, REQUANTIZED_KEY, FusionReport, check_fusion, require_fused
from .qdq import AddQuant, LayerQuant, add_quant, layer_quant

ACTIVATIONS = ("uint8", "int8")


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
def _float_twin(model: nn.Module) -> tuple[nn.Module, dict[str, LayerQuant], dict[str, AddQuant]]:
    """A copy that computes the QAT model's layers in float (dequantized weights, BN as its eval affine)."""
    from .api import _set_module
    from .layers import QuantResidualAdd, _EvalFoldMixin, is_quant_layer

    twin = copy.deepcopy(model).cpu().eval()
    layers: dict[str, LayerQuant] = {}
    adds: dict[str, AddQuant] = {}
    for name, m in list(twin.named_modules()):
        if isinstance(m, QuantResidualAdd):
            adds[name] = add_quant(name, m)
        elif isinstance(m, _EvalFoldMixin):
            _set_module(twin, name, _ChannelAffine(*m.folded_affine()))
        elif is_quant_layer(m):
            lq = layers[name] = layer_quant(name, m)
            if lq.codes is not None:
                shape = (-1,) + (1,) * (m.weight.dim() - 1)
                m.weight.copy_(torch.from_numpy(lq.codes.astype(np.float32)) * torch.from_numpy(lq.scale).view(shape))
            elif lq.half_weight is not None:
                m.weight.copy_(lq.half_weight)
            if m.bias is not None:  # the bias the layer adds in eval mode (on the integer grid where it rounds)
                m.bias.copy_(m._bias())
    return twin, layers, adds


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


def _ranges(model: object, tensors: list[str], calib: Tensor) -> dict[str, tuple[float, float]]:
    """Min/max of ``tensors`` over ``calib``, by ONNX Runtime's own MinMax calibrator."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": b.numpy()} for b in calib.float().cpu().split(64)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stage1.onnx"
        onnx.save(model, str(path))
        cal = create_calibrator(path, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"))
        cal.collect_data(Reader())
        data = cal.compute_data()
    return {t: tuple(float(np.asarray(v).reshape(-1)[0]) for v in data[t].range_value) for t in tensors}


def _calibrated_point(lo: float, hi: float, why: str):  # type: ignore[no-untyped-def]
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    from .onnx_graph import Point

    zp, scale = compute_scale_zp(np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0)), np.uint8(0), np.uint8(255))
    scale = float(scale)
    return Point(scale if scale > 0 else 1.0, int(zp), why)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor | None = None,
    opset: int = 13,
    *,
    input_shape: Sequence[int] | None = None,
    calib: Tensor | None = None,
    activations: str = "uint8",
    check: bool = True,
) -> FusionReport | None:
    """Write ``model`` (quantized, calibrated; CPU) as integer QDQ ONNX atomically; return ORT's fusion report.

    ``calib``: images (the run's validation images) for the scales of the requantizations QAT does not have;
    required when the graph has any. ``check``: load the written graph in ORT's CPU provider and refuse it
    (`FusionError`, no file written) if an integer layer stays in float. The input's per-sample shape comes
    from ``input_shape``, ``example_input`` or the shape recorded with the model; they must agree.
    """
    if importlib.util.find_spec("onnx") is None:  # PyTorch's exporter itself needs it
        raise ImportError("export_onnx needs the 'onnx' package: pip install 'kdsearch[onnx]'")
    if activations not in ACTIVATIONS:
        raise ValueError(f"export_onnx: activations must be one of {ACTIVATIONS}, got {activations!r}")
    import onnx

    from kdsearch.io import atomic_path

    from .layers import bypass_quantization
    from .onnx_graph import QdqGraph

    shape = _input_shape(model, input_shape, example_input)
    example = example_input if example_input is not None else torch.zeros(1, *shape)
    twin, layers, adds = _float_twin(model)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        with torch.no_grad(), bypass_quantization(twin):  # the layers as float convs; the graph gets the rest
            torch.onnx.export(
                twin, (example.cpu(),), str(float_path), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        proto = onnx.load(str(float_path))
    graph = QdqGraph(proto, layers, adds, signed_activations=activations == "int8")
    graph.fold_and_quantize_weights()
    graph.fold_float_layers()
    given, wanted = graph.plan_points()
    graph.add_points(given)
    if wanted:
        if calib is None:
            raise ValueError(f"export_onnx: {len(wanted)} tensors ({', '.join(sorted(set(wanted.values())))}) need a "
                             "scale calibrated on images: pass calib= (the run's validation images)")
        ranges = _ranges(proto, list(wanted), calib)
        graph.add_points({t: _calibrated_point(*ranges[t], why) for t, why in wanted.items()})
    graph.cast_half_inputs()
    float_layers = graph.float_layers()
    notes = [f"{t}: {why}, calibrated scale" for t, why in wanted.items()] + graph.notes
    if graph.clamped_weights:
        notes.append(f"{graph.clamped_weights} weight codes -128 negated by a negative BatchNorm scale, held at 127")
    onnx.helper.set_model_props(proto, {FLOAT_LAYERS_KEY: json.dumps(float_layers), REQUANTIZED_KEY: json.dumps(notes)})
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp_file:
        onnx.save(proto, str(tmp_file))
        report = check_fusion(tmp_file) if check else None
        if report is not None:
            require_fused(report, path)
    return report
