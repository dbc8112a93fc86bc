"""LSQ fake quantization as differentiable ops: the formula, and the implementations ``impl`` selects.

LSQ (Esser et al., ICLR 2020): ``v_hat = clamp(round(v / s), -Qn, Qp) * s``, straight-through ``round``,
step gradient (their eq. 3) ``round(v/s) - v/s`` for ``-Qn < v/s < Qp`` and ``-Qn`` / ``Qp`` for
``v/s <= -Qn`` / ``v/s >= Qp``, scaled by ``g = 1 / sqrt(N * Qp)``; the input gradient is 1 strictly inside
the clip range and 0 elsewhere (eq. 5). The clip limits themselves count as clipped, as in eq. 3: every
implementation below writes that convention out instead of inheriting ``torch.clamp``'s subgradient at the
limits (which PyTorch has defined differently across releases).

Implementations of the same function (``impl``):

* ``"function"`` (the default, ``"auto"``, on every device): a ``torch.autograd.Function`` with the LSQ
  backward written out, using the identity sum(dy * (q - v*inside)) = (sum(dy * v_hat) - sum(dx * x)) / s,
  so the backward needs no division of the whole tensor and saves only x and v_hat (which the next
  ReLU/conv keep alive anyway).
* ``"compiled"``: the same, with the forward and the backward each fused into one loop by
  ``torch.compile`` (opt-in: a few kernels compile on first use, ~20 s on a 2-core CPU; needs a C++
  compiler on CPU, Triton on GPU).
* ``"reference"``: LSQ's own formulation with round/clip and detach tricks, differentiated by autograd;
  the slowest (many elementwise passes and temporaries). ``tests/test_lsq.py`` holds every impl, this one
  included, to an independent plain-autograd transcription of eq. 1-5.
* ``"fused"`` (opt-in, not LSQ): PyTorch's ``torch._fake_quantize_learnable_per_{channel,tensor}_affine``
  (one kernel forward, one backward). Its straight-through mask tests the *rounded* value, so for
  ``Qp < v/s < Qp + 1/2`` (and ``-Qn - 1/2 < v/s < -Qn``) it passes the input gradient and gives the step
  gradient ``Qp - v/s`` where LSQ gives 0 and ``Qp``; it also divides by multiplying with ``1/s``, so
  ``.5`` ties can round the other way. ``tests/test_lsq.py`` pins down exactly that difference, which is why
  ``"auto"`` never picks it (on CUDA it would save the hand-written op's few extra kernel launches per
  quantizer; ``benchmarks/qat_overhead.py`` times every impl).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


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


def _clip(v: Tensor, qn: int, qp: int) -> Tensor:
    """clamp(v, -Qn, Qp) whose gradient is 1 for -Qn < v < Qp and 0 elsewhere, the limits included (eq. 3/5)."""
    inside = (v > -qn) & (v < qp)
    return torch.where(inside, v, v.detach().clamp(-qn, qp))


def lsq_fake_quant(x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
    """Reference LSQ fake quantization; ``step`` broadcasts against ``x`` (per channel or per tensor)."""
    s = _grad_scale(step, g)
    return _round_ste(_clip(x / s, qn, qp)) * s


class _LsqFunction(torch.autograd.Function):
    """LSQ fake quantization with a hand-derived backward; ``step`` broadcasts against ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:  # type: ignore[override]
        # per-tensor on CPU: a Python scalar takes the faster scalar kernels (and costs no GPU sync)
        s = float(step) if step.numel() == 1 and not x.is_cuda else step
        out = torch.div(x, s).clamp_(-qn, qp).round_().mul_(s)
        ctx.save_for_backward(x, step, out)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, step, out = ctx.saved_tensors
        per_tensor = step.numel() == 1
        if per_tensor and not x.is_cuda:  # scalar bounds take the fast scalar kernels (no GPU sync here)
            s = float(step)
            lo, hi = -ctx.qn * s, ctx.qp * s
        else:
            lo, hi = -ctx.qn * step, ctx.qp * step
        # strictly inside the clip range (LSQ eq. 3: the limits count as clipped): the 1/0 mask, then grad_x
        gx = gy * ((x > lo) & (x < hi))
        if not ctx.needs_input_grad[1]:  # a fixed step (8 bits and wider): no step gradient to compute
            return gx, None, None, None, None
        # LSQ eq. 3 summed: sum(gy * (round(clamp(v)) - v * inside)) = (sum(gy * out) - sum(gx * x)) / s
        if per_tensor and gy.is_contiguous() and out.is_contiguous() and x.is_contiguous():
            gs = (torch.dot(gy.view(-1), out.view(-1)) - torch.dot(gx.view(-1), x.view(-1))).reshape(step.shape)
        elif per_tensor:
            gs = (gy * out - gx * x).sum().reshape(step.shape)
        else:
            gs = (gy * out - gx * x).sum(dim=[i for i, n in enumerate(step.shape) if n == 1], keepdim=True)
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
    gx = torch.where((x > lo) & (x < hi), gy, 0.0)  # strictly inside, as in LSQ eq. 3
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


IMPL_FNS = {
    "function": lambda *a: _LsqFunction.apply(*a),
    "compiled": lambda *a: _LsqCompiledFunction.apply(*a),
    "reference": lsq_fake_quant,
}


def resolve_impl(impl: str) -> str:
    """``"auto"`` is the hand-written LSQ op on every device (the fused op is not LSQ: see the module doc)."""
    return "function" if impl == "auto" else impl
