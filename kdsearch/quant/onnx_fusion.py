"""Did ONNX Runtime's CPU provider fuse the exported model into integer kernels? Count its optimized graph.

ORT is asked for the graph it actually runs (``SessionOptions.optimized_model_filepath``, the default
optimization level) and every convolution and matrix product in it is counted: integer (``QLinearConv``,
``QGemm``, ``QLinearMatMul``, ``ConvInteger``/``MatMulInteger``...) or float (``Conv``, ``Gemm``, ``MatMul``
and their fused variants, in any domain). A float one belongs either to a layer the model keeps in float by
design (16- or 32-bit weights, listed by the exporter in the model's metadata) or is a failure, named with the
likeliest reason read off the exported graph (ORT does not say why a selector declined).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INTEGER_OPS = frozenset({"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm",
                         "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"})
FLOAT_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul",
                       "FusedMatMul"})
FUSABLE = ("Relu", "Clip", "Add", "Mul", "Sigmoid", "LeakyRelu", "HardSigmoid", "Cast")  # ORT fuses into FusedConv
FLOAT_LAYERS_KEY = "kdsearch.float_layers"  # metadata: {layer: why it stays float}
REQUANTIZED_KEY = "kdsearch.requantized"  # metadata: [where the graph quantizes what QAT computes in float]


class FusionError(ValueError):
    """An exported model whose integer layers ORT runs in float."""


@dataclass(frozen=True)
class FloatNode:
    name: str
    op_type: str
    layer: str | None
    reason: str


@dataclass
class FusionReport:
    """Integer and float compute ops in ORT's optimized graph; ``ok`` when every float one is by design."""

    integer: dict[str, int] = field(default_factory=dict)
    other_integer: dict[str, int] = field(default_factory=dict)  # QLinearAdd, QLinearGlobalAveragePool, ...
    unfused: list[FloatNode] = field(default_factory=list)
    by_design: list[FloatNode] = field(default_factory=list)
    ort_version: str = ""
    requantized: list[str] = field(default_factory=list)  # the export's REQUANTIZED_KEY notes

    @property
    def ok(self) -> bool:
        return not self.unfused

    def summary(self) -> str:
        ints = ", ".join(f"{n} {k}" for k, n in sorted(self.integer.items())) or "none"
        others = "".join(f", {n} {k}" for k, n in sorted(self.other_integer.items()))
        line = f"ORT {self.ort_version} CPU: integer ops: {ints}{others}; float convs/matmuls: {len(self.unfused)} unfused"
        if self.by_design:
            names = ", ".join(sorted({f.layer or f.name for f in self.by_design}))
            line += f", {len(self.by_design)} float by design ({names})"
        for f in self.unfused:
            line += f"\n  {f.op_type} {f.name} ({f.layer or 'no kdsearch layer'}): {f.reason}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "ort_version": self.ort_version, "integer_ops": self.integer,
                "integer_total": sum(self.integer.values()), "other_integer_ops": self.other_integer,
                "float_unfused": [vars(f) for f in self.unfused],
                "float_by_design": [vars(f) for f in self.by_design]}


def optimized_model(path: str | os.PathLike[str]) -> Any:
    """The graph ORT's CPU provider runs for ``path`` (default optimizations), as an ``onnx.ModelProto``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def _layer(node: Any, keys: dict[str, str]) -> str | None:
    """The layer an optimized node came from. The exporter names each layer's node after the layer; ORT keeps
    that name with a suffix, or names a rewritten node after its output tensor (also a key)."""
    return next((layer for key, layer in keys.items()
                 if node.name == key or node.name.startswith(f"{key}_") or key in node.output), None)


def _layer_keys(graph: Any) -> dict[str, str]:
    """Names an optimized node may carry -> its layer: the layer's node name, and the output tensors of the layer
    and of the elementwise ops ORT fuses into a float conv (``FusedConv`` is named after the last one's output)."""
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    pairs = []
    for n in graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        pairs.append((n.name, n.name))
        out = n.output[0]
        for _ in range(4):
            pairs.append((out, n.name))
            nxt = users.get(out, [])
            if len(nxt) != 1 or nxt[0].op_type not in FUSABLE:
                break
            out = nxt[0].output[0]
    return dict(sorted(pairs, key=lambda kv: len(kv[0]), reverse=True))


def _why(model: Any, layer: str | None) -> str:
    """The likeliest reason ORT left an integer layer in float, read off the exported graph."""
    from onnx import TensorProto

    g = model.graph
    node = next((n for n in g.node if layer and n.name == layer and n.op_type in ("Conv", "Gemm")), None)
    if node is None:
        return "not found in the exported graph"
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    src = producers.get(node.input[0])
    if src is None or src.op_type != "DequantizeLinear":
        return "its input is not quantized (no DequantizeLinear before it)"
    zp = inits.get(src.input[2]) if len(src.input) > 2 else None
    if zp is not None and zp.data_type == TensorProto.INT8:
        return "signed int8 activations: ORT's x86 CPU kernels take uint8 activations (zero point 128 for signed grids)"
    w = producers.get(node.input[1])
    wt = inits.get(w.input[0]) if w is not None and w.op_type == "DequantizeLinear" else None
    if wt is None:
        return "its weight is not a DequantizeLinear of an integer initializer"
    if wt.data_type != TensorProto.INT8:
        return f"weights of type {TensorProto.DataType.Name(wt.data_type)}: ORT's CPU provider fuses int8 weights only"
    users = [n for n in g.node if node.output[0] in n.input]
    if len(users) == 1 and users[0].op_type == "Relu":
        users = [n for n in g.node if users[0].output[0] in n.input]
    if node.op_type == "Conv" and not (len(users) == 1 and users[0].op_type == "QuantizeLinear"):
        return "its output does not go to exactly one QuantizeLinear (QLinearConv needs DQ -> Conv -> Q)"
    return "ORT's selector declined it (pattern looks complete; check types, zero points and bias scale)"


def check_fusion(path: str | os.PathLike[str]) -> FusionReport:
    """Load ``path`` in ORT's CPU provider, save its optimized graph, count integer vs float compute ops."""
    import onnx
    import onnxruntime as ort

    exported = onnx.load(str(path))
    meta = {p.key: p.value for p in exported.metadata_props}
    float_layers: dict[str, str] = json.loads(meta.get(FLOAT_LAYERS_KEY, "{}"))
    keys = _layer_keys(exported.graph)
    report = FusionReport(ort_version=ort.__version__, requantized=json.loads(meta.get(REQUANTIZED_KEY, "[]")))
    counts: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for node in optimized_model(path).graph.node:
        if node.op_type in INTEGER_OPS:
            counts[node.op_type] += 1
        elif node.op_type.startswith("QLinear"):
            others[node.op_type] += 1
        elif node.op_type in FLOAT_OPS:
            layer = _layer(node, keys)
            if layer in float_layers:
                report.by_design.append(FloatNode(node.name, node.op_type, layer, float_layers[layer]))
            else:
                report.unfused.append(FloatNode(node.name, node.op_type, layer, _why(exported, layer)))
    report.integer, report.other_integer = dict(counts), dict(others)
    return report


def require_fused(report: FusionReport, path: str | os.PathLike[str]) -> None:
    """Raise `FusionError` naming every integer layer ORT left in float."""
    if not report.ok:
        raise FusionError(f"{path}: ONNX Runtime did not fuse every integer layer; " + report.summary())
