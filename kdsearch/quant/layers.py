"""Quantized drop-in replacements for ``nn.Conv2d`` and ``nn.Linear`` (torchao-style module swap).

The wrappers *are* ``nn.Conv2d`` / ``nn.Linear`` subclasses that share the float layer's ``weight`` and
``bias`` parameters, so ``isinstance`` checks, initialisers, optimiser parameter groups and
``state_dict`` keys of the float model keep working; the quantizers add their own steps
(``weight_quantizer.scale``, ``act_quantizer.scale``: a fixed buffer at 8 bits and wider, a learned
``log_step`` parameter below) and buffers.

Forward: quantize the input (activation quantizer: LSQ, fp16 cast, or nothing), quantize the weight
(per channel, or fp16), then the ordinary conv/linear. All of it runs in strict fp32
(``precision.strict_fp32``: autocast off, no TF32), also when the caller has bf16 autocast on, because the
exported integer model computes q*s products in fp32: under bf16 the conv would round every product to 8
significant bits and the QAT model would not be the model the file holds. The output is fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdsearch.models.residual import ResidualAdd

from .precision import strict_fp32, strict_fp32_active
from .quantizers import HalfQuantizer, LsqActQuantizer, LsqWeightQuantizer

Quantizer = LsqWeightQuantizer | LsqActQuantizer | HalfQuantizer


def on_grid(v: Tensor, step: Tensor) -> Tensor:
    """``v`` rounded to the nearest multiple of ``step`` (per channel; left as is where the step is 0), in fp64.

    Used for biases, which an integer runtime holds as int32 multiples of the accumulator step."""
    s = step.to(v.device).double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, torch.round(v.double() / safe) * safe, v.double()).to(v.dtype)


def make_weight_quantizer(bits: int, out_channels: int, impl: str,
                          learned: bool | None = None) -> LsqWeightQuantizer | HalfQuantizer | None:
    """``learned``: None = by width (learned below 8 bits, see ``quantizers.StepOf``), False = every step fixed."""
    if bits == 32:
        return None
    if bits == 16:
        return HalfQuantizer()
    return LsqWeightQuantizer(bits, out_channels, impl, learned=learned)


def make_act_quantizer(act_bits: int | None, impl: str, init: str,
                       learned: bool | None = None) -> LsqActQuantizer | HalfQuantizer | None:
    if act_bits is None or act_bits == 32:
        return None
    if act_bits == 16:
        return HalfQuantizer()
    return LsqActQuantizer(act_bits, impl, init, learned=learned)


class _QuantMixin:
    """Shared by QuantConv2d / QuantLinear: the two quantizers and the strict-fp32 forward (each supplies ``_op``)."""

    weight: nn.Parameter
    weight_quantizer: LsqWeightQuantizer | HalfQuantizer | None
    act_quantizer: LsqActQuantizer | HalfQuantizer | None
    _bypass: bool

    def _adopt(self, src: nn.Module, weight_bits: int, act_bits: int | None, impl: str, act_init: str,
               learned: bool | None) -> Any:
        """Take over `src`'s parameters (shared, not copied), attach the quantizers, match its mode and device."""
        self.weight, self.bias = src.weight, src.bias
        self.weight_quantizer = make_weight_quantizer(weight_bits, src.weight.shape[0], impl, learned)
        self.act_quantizer = make_act_quantizer(act_bits, impl, act_init, learned)
        self._bypass = False
        self._bias_into_bn = False  # a BatchNorm reads this layer's output: the bias rounds there (`integer_graph`)
        self.train(src.training)  # type: ignore[attr-defined]
        return self.to(src.weight.device)  # type: ignore[attr-defined]

    @property
    def weight_bits(self) -> int:
        return 32 if self.weight_quantizer is None else int(self.weight_quantizer.bits)

    @property
    def act_bits(self) -> int | None:
        return None if self.act_quantizer is None else int(self.act_quantizer.bits)

    def quantized_weight(self) -> Tensor:
        """The fake-quantized fp32 weight used by the forward pass."""
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            w = self.weight.float()
            return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def accumulator_step(self) -> Tensor | None:
        """``input step x weight step`` per output channel: the grid of the int32 accumulator an integer runtime
        adds this layer's bias on (ONNX's ``QLinearConv`` bias scale); None unless input and weight are integer."""
        aq, wq = self.act_quantizer, self.weight_quantizer
        if not (isinstance(aq, LsqActQuantizer) and aq.is_initialized and isinstance(wq, LsqWeightQuantizer)):
            return None
        return (aq.effective_step().double() * wq.effective_step().double()).detach()

    def _bias(self) -> Tensor | None:
        """The bias the forward adds: in eval mode an integer layer's lies on its accumulator grid, as the int32
        bias of the deployed graph does (HAWQ-V3, sec. 3.1); a following BatchNorm rounds it instead (folded)."""
        b = self.bias
        if b is None or self.training or self._bias_into_bn:  # type: ignore[attr-defined]
            return b
        step = self.accumulator_step()
        return b if step is None else on_grid(b, step)

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        """The float layer's arithmetic on (quantized input, quantized weight): conv or linear."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self._bypass:
            return super().forward(x)  # type: ignore[misc]
        if torch.onnx.is_in_onnx_export():
            from .qdq import qdq_operands

            return self._op(*qdq_operands(self, x))
        if strict_fp32_active() and not torch.is_autocast_enabled(x.device.type):
            # a phase (training, evaluation, calibration) set the precision flags once for all its layers
            return self._quantized_forward(x)
        with strict_fp32(x.device.type):  # a bare call: set them for this layer alone
            return self._quantized_forward(x)

    def _quantized_forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return self._op(x, self.quantized_weight())


class QuantConv2d(_QuantMixin, nn.Conv2d):
    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_bits: int,
        act_bits: int | None,
        *,
        impl: str = "auto",
        act_init: str = "mse",
        learned: bool | None = None,
    ) -> QuantConv2d:
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype,
        )  # fmt: skip
        return q._adopt(conv, weight_bits, act_bits, impl, act_init, learned)

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return self._conv_forward(x, w, self._bias())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QuantLinear(_QuantMixin, nn.Linear):
    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_bits: int,
        act_bits: int | None,
        *,
        impl: str = "auto",
        act_init: str = "mse",
        learned: bool | None = None,
    ) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                dtype=linear.weight.dtype)  # fmt: skip
        return q._adopt(linear, weight_bits, act_bits, impl, act_init, learned)

    def _op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w, self._bias())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class _EvalFoldMixin:
    """BatchNorm that, in eval mode, computes ``x * a + b`` with the per-channel (a, b) that export stores.

    Why: the exported file folds BN's running statistics and affine into (a, b) (2 floats per channel).
    Evaluating the QAT model with the very same arithmetic makes the reloaded model bit-identical to it;
    with the native BN kernel, 1-ulp differences flip the rounding of a few downstream activation codes,
    and one flipped code moves the logits by ~1e-3. Training mode is the ordinary BN (batch statistics).
    """

    weight: nn.Parameter
    bias: nn.Parameter
    running_mean: Tensor
    running_var: Tensor
    eps: float

    _int_bias_of: list[nn.Module]  # the integer layer whose output this BatchNorm reads (`integer_graph.bind`)

    def folded_affine(self) -> tuple[Tensor, Tensor]:
        """The eval-mode ``(a, b)``. After an integer layer, ``a * bias + b`` lies on the folded accumulator grid
        ``input step x weight step x |a|``: the int32 bias that the deployed graph adds (HAWQ-V3, sec. 3.1)."""
        invstd = 1.0 / torch.sqrt(self.running_var.float() + self.eps)
        a = self.weight.float() * invstd
        b = self.bias.float() - self.running_mean.float() * a
        src = getattr(self, "_int_bias_of", None)
        step = src[0].accumulator_step() if src else None
        if step is not None:
            b0 = src[0].bias.float().detach() if src[0].bias is not None else torch.zeros_like(b)
            b = on_grid(a * b0 + b, step.to(a.device) * a.double().abs()) - a * b0
        return a, b

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        a, b = self.folded_affine()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * a.view(shape) + b.view(shape)

    @classmethod
    def from_float(cls, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
        new = cls(bn.num_features, bn.eps, bn.momentum, True, True, device="meta")  # type: ignore[call-arg]
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new


class FoldingBatchNorm1d(_EvalFoldMixin, nn.BatchNorm1d):
    pass


class FoldingBatchNorm2d(_EvalFoldMixin, nn.BatchNorm2d):
    pass


def folding_bn(bn: nn.Module) -> nn.Module | None:
    """The eval-folding replacement for an affine, tracking BatchNorm1d/2d; None for anything else."""
    if isinstance(bn, _EvalFoldMixin) or not (getattr(bn, "affine", False) and getattr(bn, "track_running_stats", False)):
        return None
    if type(bn) is nn.BatchNorm2d:
        return FoldingBatchNorm2d.from_float(bn)
    if type(bn) is nn.BatchNorm1d:
        return FoldingBatchNorm1d.from_float(bn)
    return None


def unit_running_var(eps: float) -> float:
    """An fp32 value r with r + eps == 1 exactly in fp32: a folded BN loads as mean 0, var r, so 1/sqrt = 1."""
    r = torch.tensor(1.0 - eps, dtype=torch.float32)
    for _ in range(64):
        total = float(r + eps)
        if total == 1.0:
            return float(r)
        r = torch.nextafter(r, torch.tensor(-1.0 if total > 1.0 else 2.0))
    raise ValueError(f"BatchNorm eps={eps}: no fp32 variance r with r + eps == 1")


ADD_INPUTS = ("branch", "shortcut")  # a quantized add's inputs, in the order of its forward; the file's step keys


class QuantResidualAdd(ResidualAdd):
    """``branch + shortcut`` with both inputs on 8-bit grids, as an integer runtime adds them (``QLinearAdd``).

    Why: ONNX Runtime (and HAWQ-V3's integer-only graphs) add quantized tensors only; adding float ones in QAT
    and quantized ones in deployment cost 0.37 points of top-1 agreement (benchmarks/results/onnx_agreement.md).
    The branch (a conv + BN output) gets its own grid. The shortcut reads the grid of the integer layer that
    reads the same tensor (an identity shortcut is the block input, which the block's first conv quantizes):
    `integer_graph.bind` finds that layer in a forward and shares its quantizer, so the tensor has one grid, as
    in the deployed graph; otherwise the shortcut has its own (``shortcut_quantizer``, unused while shared).
    """

    def __init__(self, bits: int = 8, impl: str = "auto", act_init: str = "mse", learned: bool | None = None) -> None:
        super().__init__()
        self.branch_quantizer = LsqActQuantizer(bits, impl, act_init, learned=learned)
        self.shortcut_quantizer = LsqActQuantizer(bits, impl, act_init, learned=learned)
        self._shares: list[nn.Module] = []  # [the layer whose input quantizer the shortcut reads] (not a submodule)
        self._bypass = False

    def share_shortcut(self, layer: nn.Module | None) -> None:
        """Read the shortcut at ``layer``'s input grid (None: at this add's own). ``shortcut_quantizer`` stays a
        submodule either way, so the ``state_dict``'s keys do not depend on the binding."""
        self._shares = [] if layer is None else [layer]

    @property
    def shortcut_grid(self) -> LsqActQuantizer:
        return self._shares[0].act_quantizer if self._shares else self.shortcut_quantizer

    def grid(self, which: str) -> LsqActQuantizer:
        """The quantizer of input ``which`` (one of ``ADD_INPUTS``)."""
        return self.branch_quantizer if which == "branch" else self.shortcut_grid

    def forward(self, branch: Tensor, shortcut: Tensor) -> Tensor:
        if self._bypass:
            return branch + shortcut
        return self.branch_quantizer(branch.float()) + self.shortcut_grid(shortcut.float())


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)


def is_quant_layer(m: nn.Module) -> bool:
    return isinstance(m, QUANT_LAYER_TYPES)


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """Inside the block the caller may switch modules between train and eval; every module's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def bypass_quantization(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its float self (no quantizer runs, none is lazily initialised) inside the block.

    Used by the layer inventory, whose zero batch must not become the activation calibration batch.
    """
    layers = {m: m._bypass for m in model.modules() if is_quant_layer(m) or isinstance(m, QuantResidualAdd)}
    for m in layers:
        m._bypass = True
    try:
        yield
    finally:  # restore, not clear: blocks nest (the first forward inside one binds the integer graph in another)
        for m, was in layers.items():
            m._bypass = was
