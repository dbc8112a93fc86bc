"""The QDQ rewrite of a float ONNX graph into the integer form ONNX Runtime fuses (see `onnx_export`).

Input: the float twin of a QAT model (each quantized layer a float Conv/Gemm whose weight initializer is
``<layer>.weight`` and holds the dequantized weight; each BatchNorm a ``Mul``/``Add`` by constants), and the
`LayerQuant` of every quantized layer. Output, in place: BatchNorm folded into the integer layers, int8 weight
codes with per-channel ``DequantizeLinear``, int32 biases, and one ``QuantizeLinear -> DequantizeLinear`` pair
per quantized tensor (uint8, zero point), the form ORT's QDQ selectors turn into ``QLinearConv``/``QGemm``/
``QLinearAdd``/``QLinearGlobalAveragePool``.

Which tensors are quantized, and at which scale (`Point`):
* the input of an integer layer: that layer's own activation grid (the QAT model's, exact). Integer layers that
  read one tensor share one grid in QAT (`integer_graph`); where they do not (a model quantized without binding),
  the first one's is taken and the others requantize from it.
* the inputs of a quantized residual add (``QuantResidualAdd``, found by the Add node's module scope): its
  branch and shortcut grids (exact), so ORT's ``QLinearAdd`` adds what QAT adds. Its output is quantized only
  where a reader quantizes it in QAT; the zoo's last block's add and the pooling after it run in float, as in QAT.
  The zoo's models then have no calibrated tensor at all.
* a calibrated scale (min/max, uint8) where the QAT model has no grid but the runtime needs one
  (``Point.calibrated``): the inputs and output of an ``Add`` that is not a quantized add, the input of a pooling
  whose output is quantized when an integer layer produces it, and an integer layer's
  output that reaches no quantized tensor through at most one ReLU and is not read by float layers only (such a
  layer stays an fp32 conv on its integer operands, ``float_output``: what QAT computes). A part of the graph
  between float (16/32-bit) layers stays float.

Who reads a quantized tensor: for a calibrated point every consumer; for a QAT-given one the consumers that
quantize it in QAT (integer layers, quantized adds, shape ops on the way to one). A float layer or a BatchNorm
reads the tensor in float, as in QAT, unless the runtime has it only quantized (an integer layer's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .qdq import ActGrid, AddQuant, LayerQuant

POOLS = ("GlobalAveragePool", "AveragePool")
SHAPE_OPS = ("Flatten", "Reshape")


@dataclass(frozen=True)
class Point:
    """One quantized tensor: ``uint8 = clamp(round(x / scale) + zero_point, 0, 255)``; ``why`` for calibrated ones."""

    scale: float
    zero_point: int
    why: str = ""

    @property
    def calibrated(self) -> bool:
        return bool(self.why)

    @classmethod
    def of(cls, grid: ActGrid) -> "Point":
        return cls(grid.step, grid.zero_point)


def module_of(node_name: str) -> str:
    """The qualified name of the module a TorchScript-exported node came from: ``/layer1/layer1.0/add/Add`` ->
    ``layer1.0.add`` (a scope segment is the child's attribute name, or its qualified name inside a container)."""
    q = ""
    for seg in node_name.strip("/").split("/")[:-1]:
        q = seg if not q or seg.startswith(q + ".") else f"{q}.{seg}"
    return q


class QdqGraph:
    """A float graph being rewritten; node and tensor maps are rebuilt after every structural edit."""

    def __init__(self, model: onnx.ModelProto, layers: dict[str, LayerQuant], adds: dict[str, AddQuant] | None = None,
                 signed_activations: bool = False) -> None:
        self.model, self.g = model, model.graph
        self.signed = signed_activations  # int8 activations, zero point - 128 (the same numbers; for tests)
        self.inits = {t.name: t for t in self.g.initializer}
        self.by_weight = {f"{name}.weight": lq for name, lq in layers.items()}
        adds = adds or {}
        self.adds = {n.name: adds[m] for n in self.g.node if n.op_type == "Add" and (m := module_of(n.name)) in adds}
        self.clamped_weights = 0  # codes -(-128) that a negative BatchNorm scale pushed to 127
        self.notes: list[str] = []  # every place the graph quantizes where the QAT model computes in float
        self.float_output: dict[str, str] = {}  # integer layers left unfused on purpose (`plan_points`) -> why
        self._n = 0
        self._inline_constant_identities()
        for node in self.g.node:  # name each layer's node after the layer, for ORT's optimized graph to be read
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and node.input[1].endswith(".weight"):
                node.name = node.input[1][: -len(".weight")]

    def _inline_constant_identities(self) -> None:
        """The exporter shares equal constants through ``Identity`` nodes; read the initializer directly."""
        for node in [n for n in self.g.node if n.op_type == "Identity" and n.input[0] in self.inits]:
            src, out = node.input[0], node.output[0]
            if out in {o.name for o in self.g.output}:
                continue
            for user in self.g.node:
                for k, name in enumerate(user.input):
                    if name == out:
                        user.input[k] = src
            self.g.node.remove(node)

    # -- maps ------------------------------------------------------------------------------------------------
    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if tensor in n.input]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.g.node if tensor in n.output), None)

    def add_of(self, node: onnx.NodeProto) -> AddQuant | None:
        return self.adds.get(node.name) if node.op_type == "Add" else None

    def _integer_product(self, tensor: str) -> bool:
        """``tensor`` is an integer layer's output, or its ReLU's: the runtime has it only quantized."""
        prod = self.producer(tensor)
        if prod is not None and prod.op_type == "Relu":
            prod = self.producer(prod.input[0])
        lq = None if prod is None else self.layer_of(prod)
        return lq is not None and lq.integer

    def layer_of(self, node: onnx.NodeProto) -> LayerQuant | None:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            return self.by_weight.get(node.input[1])
        return None

    def float_layers(self) -> dict[str, str]:
        """Layers that stay float by design (16- or 32-bit weights) -> why."""
        out = {}
        for n in self.g.node:
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1].endswith(".weight"):
                lq = self.layer_of(n)
                bits = 32 if lq is None else lq.weight_bits
                out[n.name] = f"{bits}-bit layer: no integer kernel, runs in fp32"
        return out | self.float_output

    def integer_layers(self) -> list[tuple[onnx.NodeProto, LayerQuant]]:
        return [(n, lq) for n in self.g.node if (lq := self.layer_of(n)) is not None and lq.integer]

    def _const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def _add_init(self, name: str, value: np.ndarray) -> str:
        t = numpy_helper.from_array(value, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def _drop_init(self, name: str) -> None:
        if name in self.inits and not any(name in n.input for n in self.g.node):
            self.g.initializer.remove(self.inits.pop(name))

    def _insert_after(self, anchor: str, nodes: list[onnx.NodeProto]) -> None:
        """Insert nodes right after the producer of ``anchor`` (or first), keeping the list topologically sorted."""
        prod = self.producer(anchor)
        at = 0 if prod is None else list(self.g.node).index(prod) + 1
        for i, node in enumerate(nodes):
            self.g.node.insert(at + i, node)

    # -- BatchNorm folding and integer weights -----------------------------------------------------------------
    def _channel_const(self, node: onnx.NodeProto, other_than: str, channels: int) -> np.ndarray | None:
        names = [i for i in node.input if i != other_than]
        v = self._const(names[0]) if len(names) == 1 else None
        return None if v is None or v.size != channels else v.reshape(-1).astype(np.float64)

    def _take_batchnorm(self, node: onnx.NodeProto, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The per-channel (a, b) of the ``Mul``/``Add`` by constants right after ``node``, removed from the graph."""
        out = node.output[0]
        users = self.consumers(out)
        if node.op_type != "Conv" or len(users) != 1 or users[0].op_type != "Mul":
            return None
        mul = users[0]
        a = self._channel_const(mul, out, channels)
        adds = self.consumers(mul.output[0])
        is_add = len(adds) == 1 and adds[0].op_type == "Add"
        b = self._channel_const(adds[0], mul.output[0], channels) if is_add else None
        if a is None or b is None:
            return None
        node.output[0] = adds[0].output[0]
        self.g.node.remove(mul)
        self.g.node.remove(adds[0])
        for init in (*mul.input, *adds[0].input):
            self._drop_init(init)
        return a, b

    def fold_float_layers(self) -> None:
        """Fold the BatchNorm after each float (16/32-bit) layer into its fp32 weight and bias, as ORT would."""
        for node in list(self.g.node):
            lq = self.layer_of(node)
            w = self._const(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
            if w is None or (lq is not None and lq.integer):
                continue
            bias = self._const(node.input[2]).astype(np.float64) if len(node.input) > 2 else np.zeros(w.shape[0])
            folded = self._take_batchnorm(node, w.shape[0])
            if folded is not None:
                a, b = folded
                w_new = (w * a.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
                self.inits[node.input[1]].CopyFrom(numpy_helper.from_array(w_new, node.input[1]))
                b_name = self._add_init(self._name(f"{node.name}.bias_folded"), (a * bias + b).astype(np.float32))
                if len(node.input) > 2:
                    old, node.input[2] = node.input[2], b_name
                    self._drop_init(old)
                else:
                    node.input.append(b_name)

    def fold_and_quantize_weights(self) -> None:
        """Fold each integer conv's following ``Mul``/``Add`` (its BatchNorm) into the conv; int8 weights, int32 bias.

        Folding keeps the codes: ``W * a = q * (step * a)``, so the folded per-channel scale is ``step * |a|``
        (codes negated where ``a < 0``). The bias ``a * b0 + b`` becomes int32 at scale ``input step * weight scale``.
        """
        for node, lq in self.integer_layers():
            codes, scale = lq.codes.astype(np.int16), lq.scale.astype(np.float64)
            channels = codes.shape[0]
            bias = self._const(node.input[2]).astype(np.float64) if len(node.input) > 2 else np.zeros(channels)
            folded = self._take_batchnorm(node, channels)
            if folded is not None:
                a, b = folded
                codes = codes * np.where(a < 0, -1, 1).reshape((-1,) + (1,) * (codes.ndim - 1))
                self.clamped_weights += int((codes > 127).sum())
                scale, bias = scale * np.abs(a), a * bias + b
                dead = scale == 0  # BatchNorm weight 0: the channel is its bias; codes 0 at a scale that keeps
                codes[dead] = 0  # the int32 bias (at input step x this scale) in range
                scale[dead] = scale[~dead].max() if (~dead).any() else 1.0
            scale = scale.astype(np.float32)
            w_name, axis = node.input[1], 0
            if node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute):
                raise ValueError(f"export_onnx: Gemm {node.name!r} is not transB=1 (torch's Linear); "
                                 "cannot quantize it per channel")
            q = self._add_init(f"{w_name}_quantized", np.clip(codes, -128, 127).astype(np.int8).reshape(codes.shape))
            s = self._add_init(f"{w_name}_scale", scale)
            zp = self._add_init(f"{w_name}_zero_point", np.zeros(channels, np.int8))
            dq = helper.make_node("DequantizeLinear", [q, s, zp], [f"{w_name}_dq"], name=f"{w_name}_DequantizeLinear",
                                  axis=axis)
            self.by_weight[dq.output[0]] = lq
            in_scale = np.float32(lq.act.step) * scale
            b_name = f"{w_name[: -len('.weight')]}.bias"
            bias_q = np.clip(np.round(bias / in_scale), -(2**31), 2**31 - 1).astype(np.int32)
            bq = self._add_init(f"{b_name}_quantized", bias_q)
            bs = self._add_init(f"{b_name}_scale", in_scale.astype(np.float32))
            bz = self._add_init(f"{b_name}_zero_point", np.zeros(channels, np.int32))
            bdq = helper.make_node("DequantizeLinear", [bq, bs, bz], [f"{b_name}_dq"], name=f"{b_name}_DequantizeLinear",
                                   axis=0)
            old = list(node.input)
            i = list(self.g.node).index(node)
            self.g.node.insert(i, bdq)
            self.g.node.insert(i, dq)
            del node.input[:]
            node.input.extend([old[0], dq.output[0], bdq.output[0]])
            for init in old[1:]:
                self._drop_init(init)

    # -- activations ---------------------------------------------------------------------------------------------
    def _qdq_nodes(self, src: str, point: Point, clip: ActGrid | None = None) -> tuple[list[onnx.NodeProto], str]:
        base = self._name(src.strip("/").replace("/", "_") or "t")
        s = self._add_init(f"{base}_scale", np.array(point.scale, np.float32))
        zp = self._add_init(f"{base}_zero_point", np.array(point.zero_point - 128, np.int8) if self.signed
                            else np.array(point.zero_point, np.uint8))
        nodes, x = [], src
        if clip is not None:
            lo = self._add_init(f"{base}_lo", np.array(-clip.qn * clip.step, np.float32))
            hi = self._add_init(f"{base}_hi", np.array(clip.qp * clip.step, np.float32))
            nodes.append(helper.make_node("Clip", [x, lo, hi], [f"{base}_clipped"], name=f"{base}_Clip"))
            x = f"{base}_clipped"
        nodes.append(helper.make_node("QuantizeLinear", [x, s, zp], [f"{base}_q"], name=f"{base}_QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{base}_q", s, zp], [f"{base}_dq"],
                                      name=f"{base}_DequantizeLinear"))
        return nodes, f"{base}_dq"

    def _reads_quantized(self, user: onnx.NodeProto, tensor: str, point: Point) -> bool:
        """Whether ``user`` reads ``tensor``'s ``Q -> DQ``: always for a calibrated point (it exists for the runtime's
        sake); for a QAT-given one, the readers that quantize it in QAT (integer layers, quantized adds, shape ops
        on the way to one), and any reader where the runtime has the tensor only quantized. Others (a float
        layer, a BatchNorm) read it in float, as in QAT."""
        if point.calibrated or user.op_type in SHAPE_OPS or user.op_type in POOLS or self.add_of(user) is not None:
            return True
        lq = self.layer_of(user)
        if lq is not None and lq.integer and user.input[0] == tensor:
            return True
        if self._integer_product(tensor):
            self.notes.append(f"{user.name}: reads {tensor!r} quantized (an integer layer's output); "
                              "QAT reads it in float")
            return True
        return False

    def add_points(self, points: dict[str, Point]) -> None:
        """One ``Q -> DQ`` per tensor, read by the consumers ``_reads_quantized`` names; an integer layer whose grid
        is not the tensor's (another scale, or fewer than 8 bits) gets its own ``Clip -> Q -> DQ`` from it."""
        outputs = {o.name for o in self.g.output}
        for tensor, point in points.items():
            users = [u for u in self.consumers(tensor) if self._reads_quantized(u, tensor, point)]
            nodes, dq = self._qdq_nodes(tensor, point)
            self._insert_after(tensor, nodes)
            for user in users:
                lq = self.layer_of(user)
                src = dq
                if lq is not None and lq.integer and user.input[0] == tensor:
                    own = Point.of(lq.act)
                    if (own.scale, own.zero_point) != (point.scale, point.zero_point) or lq.act.narrower_than_uint8:
                        if (own.scale, own.zero_point) != (point.scale, point.zero_point):
                            self.notes.append(f"{lq.name}: input requantized from another layer's grid")
                        extra, src = self._qdq_nodes(dq, own, clip=lq.act)
                        self._insert_after(dq, extra)
                for k, name in enumerate(user.input):
                    if name == tensor:
                        user.input[k] = src
            if tensor in outputs:
                raise ValueError(f"export_onnx: graph output {tensor!r} cannot be quantized")

    def plan_points(self) -> tuple[dict[str, Point], dict[str, str]]:
        """The QAT-given points (integer layers' inputs) and the tensors that need a calibrated scale (-> why)."""
        given: dict[str, Point] = {}
        for node, lq in self.integer_layers():
            given.setdefault(node.input[0], Point.of(lq.act))
        for node in self.g.node:  # quantized residual adds: both inputs on their QAT grids
            aq = self.add_of(node)
            for tensor, grid in ([] if aq is None else zip(node.input, (aq.branch, aq.shortcut))):
                point = given.setdefault(tensor, Point.of(grid))
                if (point.scale, point.zero_point) != (grid.step, grid.zero_point):
                    self.notes.append(f"residual add {node.name}: reads {tensor!r} at another reader's grid")
        for tensor in list(given):  # through Flatten/Reshape: the same grid on both sides lets ORT drop the pair
            prod = self.producer(tensor)
            if prod is not None and prod.op_type in SHAPE_OPS and len(self.consumers(prod.input[0])) == 1:
                given.setdefault(prod.input[0], given[tensor])
        wanted: dict[str, str] = {}

        def want(tensor: str, why: str) -> None:
            if tensor not in given and tensor not in self.inits:
                wanted.setdefault(tensor, why)

        def after_relu(tensor: str) -> str:
            users = self.consumers(tensor)
            return users[0].output[0] if len(users) == 1 and users[0].op_type == "Relu" else tensor

        integer_out = {n.output[0] for n, _ in self.integer_layers()}
        for node in self.g.node:  # adds and pools next to integer layers (not in a float-by-design part)
            near_integer = any(i in integer_out or i in given for i in node.input)
            if self.add_of(node) is not None:
                # a quantized add's output is quantized where a reader quantizes it in QAT (the next block's conv
                # or add: given); the last block's, which the pooling reads, stays float: ORT then adds and pools in
                # float what QAT adds and pools in float (two cheap ops), instead of requantizing it
                continue
            elif (node.op_type == "Add" and not any(i in self.inits for i in node.input)
                    and (near_integer or after_relu(node.output[0]) in given)):
                for i in node.input:
                    want(i, "residual add input")
                    if i in given:
                        self.notes.append(f"residual add {node.name}: reads {i!r} at the next layer's input grid")
                want(after_relu(node.output[0]), "residual add output")
            elif node.op_type in POOLS and node.output[0] in given and self._integer_product(node.input[0]):
                want(node.input[0], "pooling input")  # an integer layer's output: the runtime has it only quantized
        outputs = {o.name for o in self.g.output}
        for node, _ in self.integer_layers():
            out = node.output[0]
            if out in outputs:
                continue
            readers = self.consumers(after_relu(out))
            if readers and all(r.op_type in ("Conv", "Gemm") and not ((lq := self.layer_of(r)) and lq.integer)
                               for r in readers):
                # only float layers (16/32-bit) read it: QAT hands them this layer's float output, so the runtime
                # must too. A fused integer conv could only hand over an 8-bit requantization of it.
                self.float_output[node.name] = ("integer weights and input, output read only by float layers: "
                                                "fp32 conv on its integer operands, exactly as in QAT")
                continue
            relu_out = after_relu(out)
            reached = relu_out if relu_out != out else None
            if out in given or out in wanted:
                continue
            if reached is not None and (reached in wanted or (reached in given and given[reached].zero_point == 0)):
                continue
            want(out, "integer layer output")
        return given, wanted

    def cast_half_inputs(self) -> None:
        """A 16-bit layer's input rounds to fp16 (Cast there and back), as in the QAT model."""
        for node in list(self.g.node):
            lq = self.layer_of(node)
            if lq is not None and lq.half_input:
                base = self._name(f"{lq.name}.input_fp16")
                to16 = helper.make_node("Cast", [node.input[0]], [f"{base}_16"], name=f"{base}_Cast16",
                                        to=TensorProto.FLOAT16)
                to32 = helper.make_node("Cast", [f"{base}_16"], [f"{base}_32"], name=f"{base}_Cast32",
                                        to=TensorProto.FLOAT)
                i = list(self.g.node).index(node)
                self.g.node.insert(i, to32)
                self.g.node.insert(i, to16)
                node.input[0] = to32.output[0]
