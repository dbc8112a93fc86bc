"""Fake quantizers: LSQ for integer weights and activations, a saturating fp16 cast for 16-bit layers.

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

Implementations of the same function (``impl``):

* ``"function"``: a ``torch.autograd.Function`` with the LSQ backward written out, using the identity
  sum(dy * (q - v*inside)) = (sum(dy * v_hat) - sum(dx * x)) / s, so the backward needs no division of
  the whole tensor and saves only x and v_hat (which the next ReLU/conv keep alive anyway).
* ``"compiled"``: the same, with the forward and the backward each fused into one loop by
  ``torch.compile`` (opt-in: a few kernels compile on first use, ~20 s on a 2-core CPU; needs a C++
  compiler on CPU, Triton on GPU).
* ``"reference"``: LSQ's own formulation with round/clamp and detach tricks, differentiated by autograd;
  the oracle the tests hold the others to, and the slowest (many elementwise passes and temporaries).
* ``"fused"``: PyTorch's ``torch._fake_quantize_learnable_per_{channel,tensor}_affine`` (one kernel forward,
  one backward). Its straight-through mask tests the *rounded* value, so values within half a step outside
  the clip range still pass gradient: a slightly different STE than LSQ's.

``"auto"`` picks ``function`` on CPU, where it beat the fused learnable ops (``benchmarks/qat_overhead.py``
prints every impl side by side), and ``fused`` on CUDA, where the hand-written ops cost 4-12 kernel launches
per quantizer per pass that the fused op avoids (not measured here: no GPU was available to this work; the
benchmark measures every impl with ``--device cuda``).

All quantizer math runs in fp32, also under ``torch.autocast``: the wrappers in ``layers.py`` hand fp32 tensors in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

INTEGER_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
STEP_EPS = 1e-8  # steps are clamped to this: a step that SGD pushes to <= 0 would divide by zero
IMPLS = ("auto", "function", "compiled", "reference", "fused")
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


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def lsq_grad_scale(numel: int, qp: int) -> float:
    """LSQ's step-gradient scale g = 1 / sqrt(N * Qp) (Esser et al. 2020, sec. 2.2)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qp, 1))


def _grad_scale(x: Tensor, g: float) -> Tensor:
    """Identity forward (bit-exact: the added term is exactly 0), gradient times g (LSQ's ``gradscale``)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def _round_ste(x: Tensor) -> Tensor:
    """round(x) exactly in the forward, identity gradient."""
    return x.round().detach() + (x - x.detach())


def lsq_fake_quant(x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
    """Reference LSQ fake quantization; ``step`` broadcasts against ``x`` (per channel or per tensor)."""
    s = _grad_scale(step, g)
    return _round_ste(torch.clamp(x / s, -qn, qp)) * s


class _LsqFunction(torch.autograd.Function):
    """LSQ fake quantization with a hand-derived backward; ``step`` broadcasts against ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:  # type: ignore[override]
        out = torch.div(x, step).clamp_(-qn, qp).round_().mul_(step)
        ctx.save_for_backward(x, step, out)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, step, out = ctx.saved_tensors
        inside = (x >= -ctx.qn * step) & (x <= ctx.qp * step)
        gx = torch.where(inside, gy, 0.0)
        # LSQ eq. 3 summed: sum(gy * (round(clamp(v)) - v * inside)) = (sum(gy * out) - sum(gx * x)) / s
        t = torch.addcmul(gy * out, gx, x, value=-1.0)
        if step.numel() == 1:
            gs = t.sum().reshape(step.shape)
        else:
            gs = t.sum(dim=[i for i, n in enumerate(step.shape) if n == 1], keepdim=True)
        return gx, gs * (ctx.g / step), None, None, None


def lsq_function(x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
    """Same values and gradients as ``lsq_fake_quant``, in fewer passes (``impl="function"``)."""
    return _LsqFunction.apply(x, step, qn, qp, g)


def _fq_forward(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return torch.clamp(x / step, lo, hi).round() * step


def _fq_backward(
    x: Tensor, gy: Tensor, out: Tensor, lo: Tensor, hi: Tensor, per_channel: bool
) -> tuple[Tensor, Tensor]:
    """(grad_x, sum of gy*out - grad_x*x per channel or overall); one fused loop when compiled."""
    gx = torch.where((x >= lo) & (x <= hi), gy, 0.0)
    t = gy * out - gx * x
    return gx, (t.sum(dim=1) if per_channel else t.sum())


_COMPILED: dict[str, Any] = {}


def _compiled(name: str) -> Any:
    """torch.compile'd kernels, built on first use (inductor: C++ on CPU, Triton on GPU)."""
    if name not in _COMPILED:
        fn = {"forward": _fq_forward, "backward": _fq_backward}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[name]


def _flat(t: Tensor, rows: int) -> Tensor:
    """[rows, K] for per-channel, 1-D for per-tensor (when contiguous): few ranks, few recompilations."""
    if rows > 1:
        return t.reshape(rows, -1)
    return t.reshape(-1) if t.is_contiguous() else t


class _LsqCompiledFunction(torch.autograd.Function):
    """``_LsqFunction`` with each pass fused into one loop by torch.compile (``impl="compiled"``).

    Inputs are detached (dynamo specialises Parameter shapes), flattened, and the range bounds passed as
    tensors (it specialises Python ints), so one model compiles a handful of kernels, not one per layer.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:  # type: ignore[override]
        rows = step.numel()
        sv = step.detach().reshape(rows, 1) if rows > 1 else step.detach().reshape(1)
        out = _compiled("forward")(_flat(x.detach(), rows), sv, sv.new_full((), -qn), sv.new_full((), qp))
        out = out.view(x.shape) if out.shape != x.shape else out
        ctx.save_for_backward(x, step, out)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, step, out = (t.detach() for t in ctx.saved_tensors)
        rows = step.numel()
        sv = step.reshape(rows, 1) if rows > 1 else step.reshape(1)
        xf = _flat(x, rows)
        gx, t = _compiled("backward")(
            xf, _flat(gy, rows).reshape(xf.shape), _flat(out, rows).reshape(xf.shape), -ctx.qn * sv, ctx.qp * sv, rows > 1
        )
        return gx.reshape(x.shape), (t.reshape(step.shape) / step) * ctx.g, None, None, None


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
    qn, qp = signed_range(bits)
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


_IMPL_FNS = {
    "function": lambda *a: _LsqFunction.apply(*a),
    "compiled": lambda *a: _LsqCompiledFunction.apply(*a),
    "reference": lsq_fake_quant,
}


def _resolve_impl(impl: str, x: Tensor) -> str:
    return ("fused" if x.is_cuda else "function") if impl == "auto" else impl


class LsqWeightQuantizer(nn.Module):
    """Signed, per-output-channel LSQ fake quantizer for conv/linear weights (axis 0)."""

    def __init__(self, bits: int, out_channels: int, impl: str = "auto") -> None:
        super().__init__()
        _check_bits(bits)
        _check_impl(impl)
        self.bits = bits
        self.qn, self.qp = signed_range(bits)
        self.impl = impl
        self.step = nn.Parameter(torch.ones(out_channels))
        self.register_buffer("zero_point", torch.zeros(out_channels), persistent=False)

    @torch.no_grad()
    def init_from(self, weight: Tensor, method: str = "mse") -> None:
        if method != "none":
            self.step.copy_(init_weight_step(weight, self.bits, method))

    def effective_step(self) -> Tensor:
        return self.step.float().clamp_min(STEP_EPS)

    def forward(self, w: Tensor) -> Tensor:
        s = self.effective_step()
        g = lsq_grad_scale(w[0].numel(), self.qp)
        impl = _resolve_impl(self.impl, w)
        if impl == "fused":
            return torch._fake_quantize_learnable_per_channel_affine(
                w, s, self.zero_point, 0, -self.qn, self.qp, g
            )
        return _IMPL_FNS[impl](w, s.view(-1, *([1] * (w.dim() - 1))), self.qn, self.qp, g)

    @torch.no_grad()
    def integers(self, w: Tensor) -> Tensor:
        """The integer codes q (int16, same shape as w) whose q * step equals this quantizer's output."""
        s = self.effective_step().view(-1, *([1] * (w.dim() - 1)))
        return torch.round(self.forward(w.float()) / s).to(torch.int16)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.step.numel()}, impl={self.impl}"


class LsqActQuantizer(nn.Module):
    """Per-tensor LSQ fake quantizer for a layer's input; the step is set from the first batch it sees.

    Signedness is chosen from that batch: unsigned when its minimum is >= 0 (inputs after ReLU/ReLU6),
    signed otherwise. ``initialized``/``signed`` are buffers, so a loaded checkpoint does not re-initialise;
    Python-side copies avoid a device sync per forward.
    """

    def __init__(self, bits: int, impl: str = "auto", init: str = "mse") -> None:
        super().__init__()
        _check_bits(bits)
        _check_impl(impl)
        if init not in INITS[:3]:
            raise ValueError(f"init must be one of {INITS[:3]}, got {init!r}")
        self.bits = bits
        self.impl = impl
        self.init_method = init
        self.step = nn.Parameter(torch.ones(1))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("zero_point", torch.zeros(1), persistent=False)
        self._signed = False
        self._initialized = False

    @property
    def qrange(self) -> tuple[int, int]:
        return signed_range(self.bits) if self._signed else unsigned_range(self.bits)

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    @property
    def is_signed(self) -> bool:
        return self._signed

    @torch.no_grad()
    def set_state(self, step: float, signed: bool) -> None:
        """Set step and signedness explicitly (used by calibration and by ``load_quantized``)."""
        self.step.fill_(step)
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self._signed, self._initialized = bool(signed), True

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        signed = bool(x.detach().min() < 0)
        self.set_state(init_act_step(x, self.bits, signed, self.init_method), signed)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kw: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        self._signed, self._initialized = bool(self.signed), bool(self.initialized)

    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized:
            self.calibrate(x)
        qn, qp = self.qrange
        s = self.step.float().clamp_min(STEP_EPS)
        g = lsq_grad_scale(x[0].numel() if x.dim() > 1 else x.numel(), qp)
        impl = _resolve_impl(self.impl, x)
        if impl == "fused":
            return torch._fake_quantize_learnable_per_tensor_affine(x, s, self.zero_point, -qn, qp, g)
        return _IMPL_FNS[impl](x, s, qn, qp, g)

    def extra_repr(self) -> str:
        sign = "signed" if self._signed else "unsigned" if self._initialized else "sign from first batch"
        return f"bits={self.bits}, {sign}, impl={self.impl}"


class HalfQuantizer(nn.Module):
    """IEEE half emulation: round to fp16 (saturating at +-65504) and back, straight-through gradient.

    Used for 16-bit weights and for the inputs of 16-bit layers (what an fp16 kernel would see).
    """

    bits = 16

    def forward(self, x: Tensor) -> Tensor:
        return x + (x.clamp(-_FP16_MAX, _FP16_MAX).half().float() - x).detach()

    def extra_repr(self) -> str:
        return "fp16"
