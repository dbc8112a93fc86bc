"""Fake quantizers: LSQ's arithmetic for integer weights and activations, a saturating fp16 cast for 16-bit layers.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) quantizes ``v`` with a learned step ``s``:

    q = clamp(round(v / s), -Qn, Qp),     v_hat = q * s

with a straight-through estimator for ``round`` and the step gradient (their eq. 3)

    d v_hat / d s = -v/s + round(v/s)  inside the clip range,  -Qn below it,  Qp above it,

scaled by ``g = 1 / sqrt(N * Qp)`` (their section 2.2) so that step sizes and weights learn at comparable
rates. ``N`` is the number of values that share the step: the weights of one output channel for the
per-channel weight quantizer, the features of one sample for the per-tensor activation quantizer.

Ranges (LSQ's): signed ``Qn = 2^(b-1), Qp = 2^(b-1) - 1`` (zero point 0, "symmetric" in the sense of no
offset); unsigned ``Qn = 0, Qp = 2^b - 1``, chosen for activations whose calibration batch is non-negative
(after ReLU/ReLU6), which doubles their resolution.

Which steps are learned: only below 8 bits, as a log-step in an optimizer of its own; 8-bit and wider steps are
set from the data (weights: MSE-optimal per channel; activations: calibration) and fixed. ``StepOf`` says why.

The autograd implementations (``impl``) live in ``lsq_ops.py``.

All quantizer math runs in fp32, also under ``torch.autocast``: the wrappers in ``layers.py`` run it inside
``precision.strict_fp32`` and hand fp32 tensors in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .lsq_ops import IMPL_FNS, lsq_grad_scale, resolve_impl

INTEGER_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
STEP_EPS = 1e-8  # the smallest step an initialisation may set (an all-zero channel gets step 1 instead)
IMPLS = ("auto", "function", "compiled", "reference", "fused")  # see lsq_ops.py
INITS = ("mse", "lsq", "max", "none")
_FP16_MAX = 65504.0
_MSE_GRID = 64  # candidate clip ratios for the MSE step search
_MSE_ACT_SAMPLES = 1 << 18


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in INTEGER_BITS:
        raise ValueError(f"bits must be one of {INTEGER_BITS} for an integer quantizer, got {bits!r}")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def signed_range(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of a signed b-bit integer: the full two's-complement range, as in LSQ."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def weight_range(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of a b-bit weight code: 8-bit weights use the narrow symmetric range [-127, 127] (TFLite's int8
    weight convention), narrower ones the full range. Why: the deployed graph folds a negative BatchNorm scale into
    the weights by negating a channel's codes, and -(-128) does not fit int8 (ORT would hold it at 127: another
    model); a b < 8-bit code negates within int8 anyway."""
    qn, qp = signed_range(bits)
    return (qp, qp) if bits == 8 else (qn, qp)


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def _quant_error(x: Tensor, s: Tensor, qn: int, qp: int, dims: tuple[int, ...]) -> Tensor:
    return (torch.clamp(torch.round(x / s), -qn, qp) * s - x).pow(2).sum(dim=dims)


def _mse_step(x: Tensor, amax: Tensor, qn: int, qp: int, dims: tuple[int, ...]) -> Tensor:
    """Per-row step minimising ||Q(x) - x||^2 over a grid of clip ratios of max|x| (plus LSQ's init).

    ``x``: [C, K] (per-channel) or [1, K]; ``amax``: [C, 1]. One pass per candidate keeps memory at O(C*K).
    """
    top = max(qp, 1)
    best_s = (amax / top).clamp_min(STEP_EPS)
    best_e = _quant_error(x, best_s, qn, qp, dims)
    lsq = (2 * x.abs().mean(dim=dims, keepdim=True) / math.sqrt(top)).clamp_min(STEP_EPS)
    candidates = [amax * (r / top) for r in torch.linspace(0.02, 1.0, _MSE_GRID).tolist()] + [lsq]
    for cand in candidates:
        s = cand.clamp_min(STEP_EPS)
        e = _quant_error(x, s, qn, qp, dims)
        better = (e < best_e).view(best_s.shape)
        best_s = torch.where(better, s, best_s)
        best_e = torch.minimum(e, best_e)
    return best_s


def init_weight_step(weight: Tensor, bits: int, method: str = "mse") -> Tensor:
    """Initial per-output-channel step for signed ``bits``-bit weights, shape [out_channels].

    ``"lsq"``: 2 mean|w| / sqrt(Qp) (LSQ paper). ``"max"``: max|w| / Qp (no clipping).
    ``"mse"``: the clip ratio minimising the channel's squared quantization error (grid of 64 ratios
    plus the LSQ value). Measured on Gaussian and Laplacian weights (tests/test_quant.py,
    benchmarks/qat_overhead.py): MSE gives the lowest error at every bit-width, hence the default.
    """
    _check_bits(bits)
    qn, qp = weight_range(bits)
    w = weight.detach().float().reshape(weight.shape[0], -1)
    amax = w.abs().amax(dim=1, keepdim=True)
    if method == "lsq":
        s = 2 * w.abs().mean(dim=1, keepdim=True) / math.sqrt(qp)
    elif method == "max":
        s = amax / qp
    elif method == "mse":
        s = _mse_step(w, amax, qn, qp, dims=(1,))
    else:
        raise ValueError(f"method must be one of ('mse', 'lsq', 'max'), got {method!r}")
    s = torch.where(amax > 0, s, torch.ones_like(s))  # an all-zero channel: any step is exact
    return s.clamp_min(STEP_EPS).reshape(-1)


def init_act_step(x: Tensor, bits: int, signed: bool, method: str = "mse") -> float:
    """Initial per-tensor activation step from an observed batch (same methods as weights)."""
    qn, qp = signed_range(bits) if signed else unsigned_range(bits)
    flat = x.detach().float().reshape(-1)
    amax = flat.abs().max()
    if float(amax) == 0.0:
        return 1.0
    if flat.numel() > _MSE_ACT_SAMPLES:  # a strided subsample keeps the search cheap and deterministic
        flat = flat[:: flat.numel() // _MSE_ACT_SAMPLES + 1]
    if method == "lsq":
        s = 2 * flat.abs().mean() / math.sqrt(qp)
    elif method == "max":
        s = amax / qp
    elif method == "mse":
        s = _mse_step(flat.view(1, -1), amax.view(1, 1), qn, qp, dims=(1,))
    else:
        raise ValueError(f"method must be one of ('mse', 'lsq', 'max'), got {method!r}")
    return max(float(s.reshape(())), STEP_EPS)


LEARN_BELOW = 8  # steps of quantizers narrower than this many bits are learned; at 8 bits and wider they are fixed


class StepOf(nn.Module):
    """A quantizer's step: fixed (a buffer) or learned (``log_step``, a parameter), never <= 0 either way.

    Why two kinds (issue: learned 8-bit weight steps ran away and killed channels):

    * **Fixed at 8 bits and wider.** At 8 bits the rounding error is far below the weights' own noise, so a
      learned step buys nothing and costs stability: with each channel's largest weight at the clip edge,
      LSQ's step gradient is dominated by the ``+-Qp * dL/dv`` terms of the clipped values, the step grows or
      shrinks far faster than the weights move, and a step clamped at ``STEP_EPS`` clips the whole channel to
      zero for good. HAWQ-V3 (Yao et al. 2021) and torchao's QAT take 8-bit weight scales from the weights
      themselves; here they are set once, from the trained float weights (``init_weight_step``), and frozen,
      which also makes export and reload bit-exact. 8-bit activation steps are calibrated (``calibrate``)
      and frozen likewise.
    * **Learned below 8 bits**, where LSQ's gain lives (Esser et al. 2020), but stably: the parameter is
      ``log s`` (so ``s = exp(log s)`` can never cross zero), its gradient still carries LSQ's scale
      ``g = 1/sqrt(N Qp)``, and ``kdsearch.train`` puts these parameters in an optimizer of their own
      (Adam, ``TrainConfig.step_lr``): Adam's per-parameter normalisation makes the update of ``log s``
      about ``step_lr`` per step whatever the step's magnitude, so the drift of a step over a run is bounded
      by ``steps x step_lr`` instead of by the size of its gradient.
    """

    def __init__(self, channels: int, learned: bool) -> None:
        super().__init__()
        self.learned = learned
        if learned:
            self.log_step = nn.Parameter(torch.zeros(channels))
        else:
            self.register_buffer("step", torch.ones(channels))

    def value(self) -> Tensor:
        return self.log_step.float().exp() if self.learned else self.step.float()

    @torch.no_grad()
    def set(self, step: Tensor | float) -> None:
        t = torch.as_tensor(step, dtype=torch.float32).reshape(-1).clamp_min(STEP_EPS)
        if self.learned:
            self.log_step.copy_(t.log().expand_as(self.log_step))
        else:
            self.step.copy_(t.expand_as(self.step))


class LsqWeightQuantizer(nn.Module):
    """Signed, per-output-channel fake quantizer for conv/linear weights (axis 0): LSQ's formula and gradient.

    ``learned`` (default: ``bits < LEARN_BELOW``) picks a learned log-step or a fixed one (see ``StepOf``).
    """

    def __init__(self, bits: int, out_channels: int, impl: str = "auto", learned: bool | None = None) -> None:
        super().__init__()
        _check_bits(bits)
        _check_impl(impl)
        self.bits = bits
        self.qn, self.qp = weight_range(bits)
        self.impl = impl
        self.scale = StepOf(out_channels, bits < LEARN_BELOW if learned is None else learned)
        self.register_buffer("zero_point", torch.zeros(out_channels), persistent=False)

    @property
    def learned(self) -> bool:
        return self.scale.learned

    @torch.no_grad()
    def init_from(self, weight: Tensor, method: str = "mse") -> None:
        if method != "none":
            self.scale.set(init_weight_step(weight, self.bits, method))

    def set_step(self, step: Tensor) -> None:
        self.scale.set(step)

    def effective_step(self) -> Tensor:
        """The per-channel step [out_channels] the forward uses (what export stores)."""
        return self.scale.value()

    def forward(self, w: Tensor) -> Tensor:
        s = self.effective_step()
        g = lsq_grad_scale(w[0].numel(), self.qp)
        impl = resolve_impl(self.impl)
        if impl == "fused":
            return torch._fake_quantize_learnable_per_channel_affine(
                w, s, self.zero_point, 0, -self.qn, self.qp, g
            )
        return IMPL_FNS[impl](w, s.view(-1, *([1] * (w.dim() - 1))), self.qn, self.qp, g)

    @torch.no_grad()
    def integers(self, w: Tensor) -> Tensor:
        """The integer codes q (int16, same shape as w) whose q * step equals this quantizer's output."""
        s = self.effective_step().view(-1, *([1] * (w.dim() - 1)))
        return torch.round(self.forward(w.float()) / s).to(torch.int16)

    def extra_repr(self) -> str:
        kind = "learned log-step" if self.learned else "fixed step"
        return f"bits={self.bits}, channels={self.zero_point.numel()}, {kind}, impl={self.impl}"


class LsqActQuantizer(nn.Module):
    """Per-tensor fake quantizer for a layer's input (LSQ's formula); its step comes from calibration.

    ``kdsearch.quant.calibrate`` sets the step (MSE over several eval-mode batches) and the signedness:
    unsigned when the calibration data is non-negative (inputs after ReLU/ReLU6), signed otherwise. A
    quantizer that never saw calibration initialises from the first batch it sees (a fallback for direct
    use). The step is fixed at 8 bits and wider and learned (log-parameterised) below, as for weights
    (``StepOf``). ``initialized``/``signed`` are buffers, so a loaded checkpoint does not re-initialise;
    Python-side copies avoid a device sync per forward.
    """

    def __init__(self, bits: int, impl: str = "auto", init: str = "mse", learned: bool | None = None) -> None:
        super().__init__()
        _check_bits(bits)
        _check_impl(impl)
        if init not in INITS[:3]:
            raise ValueError(f"init must be one of {INITS[:3]}, got {init!r}")
        self.bits = bits
        self.impl = impl
        self.init_method = init
        self.scale = StepOf(1, bits < LEARN_BELOW if learned is None else learned)
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("zero_point", torch.zeros(1), persistent=False)
        self._signed = False
        self._initialized = False
        self._observed: list[Tensor] | None = None  # calibration: samples seen while observing

    @property
    def learned(self) -> bool:
        return self.scale.learned

    @property
    def qrange(self) -> tuple[int, int]:
        return signed_range(self.bits) if self._signed else unsigned_range(self.bits)

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def is_signed(self) -> bool:
        return self._signed

    def effective_step(self) -> Tensor:
        """The step (shape [1]) the forward uses (what export stores)."""
        return self.scale.value()

    @torch.no_grad()
    def set_state(self, step: float, signed: bool) -> None:
        """Set step and signedness explicitly (used by calibration and by ``load_quantized``)."""
        self.scale.set(step)
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self._signed, self._initialized = bool(signed), True

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        signed = bool(x.detach().min() < 0)
        self.set_state(init_act_step(x, self.bits, signed, self.init_method), signed)

    def start_observing(self) -> None:
        """Pass inputs through unquantized and keep a subsample of each, until ``finish_observing``."""
        self._observed = []

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Set step and signedness from everything observed (one MSE search over the pooled samples)."""
        seen, self._observed = self._observed, None
        if seen:
            self.calibrate(torch.cat(seen))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kw: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        self._signed, self._initialized = bool(self.signed), bool(self.initialized)

    def forward(self, x: Tensor) -> Tensor:
        if self._observed is not None:
            flat = x.detach().float().reshape(-1)
            self._observed.append(flat[:: max(1, flat.numel() // _MSE_ACT_SAMPLES + 1)].clone())
            return x
        if not self._initialized:
            self.calibrate(x)
        qn, qp = self.qrange
        s = self.effective_step()
        g = lsq_grad_scale(x[0].numel() if x.dim() > 1 else x.numel(), qp)
        impl = resolve_impl(self.impl)
        if impl == "fused":
            return torch._fake_quantize_learnable_per_tensor_affine(x, s, self.zero_point, -qn, qp, g)
        return IMPL_FNS[impl](x, s, qn, qp, g)

    def extra_repr(self) -> str:
        sign = "signed" if self._signed else "unsigned" if self._initialized else "sign from first batch"
        kind = "learned log-step" if self.learned else "fixed step"
        return f"bits={self.bits}, {sign}, {kind}, impl={self.impl}"


class HalfQuantizer(nn.Module):
    """IEEE half emulation: round to fp16 (saturating at +-65504) and back, straight-through gradient.

    Used for 16-bit weights and for the inputs of 16-bit layers (what an fp16 kernel would see).
    """

    bits = 16

    def forward(self, x: Tensor) -> Tensor:
        return x + (x.clamp(-_FP16_MAX, _FP16_MAX).half().float() - x).detach()

    def extra_repr(self) -> str:
        return "fp16"
