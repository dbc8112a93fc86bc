"""Every LSQ implementation against an independent transcription of the paper, backward pass included.

The oracle is LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) written out in plain autograd,
with the clip limits as in their eq. 3 (``v/s <= -Qn`` and ``v/s >= Qp`` are clipped) and the step-gradient
scale ``g = 1/sqrt(N*Qp)`` of their sec. 2.2; ``test_oracle_is_eq3`` checks it against eq. 3 evaluated by
hand in float64. Inputs cover the grid, ``.5`` ties, the clip limits themselves, the half step just outside
them (where the fused PyTorch op deviates) and values far outside, with power-of-two steps so that these
points are exact in fp32, plus random values with random steps.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from kdsearch.quant import LsqActQuantizer, LsqWeightQuantizer
from kdsearch.quant.lsq_ops import resolve_impl
from kdsearch.quant.quantizers import signed_range, unsigned_range, weight_range
from test_quant import _one_thread  # noqa: F401 - that module's autouse one-thread fixture, for this module too


def _gradscale(s: torch.Tensor, g: float) -> torch.Tensor:
    """LSQ's ``gradscale``: value s, gradient times g."""
    return (s - s * g).detach() + s * g


def oracle(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """LSQ fake quantization, eq. 1-2 of the paper, for autograd; ``s`` broadcasts over x's rows (axis 0)."""
    n = x[0].numel()  # values sharing a step: one output channel's weights, one sample's activations
    s = _gradscale(s, 1.0 / math.sqrt(n * qp))
    v = x / s
    inside = (v > -qn) & (v < qp)
    limit = torch.where(v <= -qn, float(-qn), float(qp))  # a constant: no gradient to x where clipped
    v_bar = torch.where(inside, v, limit)
    v_round = v_bar + (v_bar.round() - v_bar).detach()  # round with a straight-through gradient
    return v_round * s


def _eq3(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/ds) from eq. 3 and 5 of the paper, element by element in float64."""
    x, s, gy = x.double(), s.double(), gy.double()
    v = x / s
    inside = (v > -qn) & (v < qp)
    dvhat_ds = torch.where(inside, v.round() - v, torch.where(v <= -qn, float(-qn), float(qp)))
    g = 1.0 / math.sqrt(x[0].numel() * qp)
    per_elem = gy * dvhat_ds
    ds = per_elem.sum().reshape(1) if s.numel() == 1 else per_elem.reshape(len(x), -1).sum(dim=1)
    return gy * inside, ds * g


def _values(qn: int, qp: int, rows: int, seed: int, special: bool) -> torch.Tensor:
    """v = x/s, [rows, 64 + specials]: random over the range and 2 steps beyond it, and with ``special`` the
    grid points, .5 ties, both limits, the half step outside them and far outside. The specials are exact
    only with power-of-two steps: with others, x = v*s divides back to v within an ulp, and the impls compare
    x with -Qn*s, Qp*s where the paper compares x/s with -Qn, Qp, an ulp-level ambiguity at the limits alone."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(rows, 64, generator=g) * (qn + qp + 4) - qn - 2
    if special:
        pts = [float(k) for k in range(-qn, qp + 1)] + [k + 0.5 for k in range(-qn, qp)]
        pts += [-qn - 0.25, -qn - 0.5, -qn - 0.75, -qn - 3.0, qp + 0.25, qp + 0.5, qp + 0.75, qp + 3.0]
        v = torch.cat([torch.tensor(pts).repeat(rows, 1), v], dim=1)
    return v[:, torch.randperm(v.shape[1], generator=g)]


def _pow2_steps(rows: int) -> torch.Tensor:
    return torch.tensor([2.0 ** -(2 + i % 4) for i in range(rows)])


def _run(q: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, grad x, grad step) of quantizer ``q`` for upstream gradient ``gy``."""
    x = x.clone().requires_grad_()
    y = q(x)
    y.backward(gy)
    return y.detach(), x.grad, q.scale.step.grad.clone()


def _run_oracle(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, gy: torch.Tensor):
    x = x.clone().requires_grad_()
    s = step.reshape(-1, *([1] * (x.dim() - 1))).clone().requires_grad_()
    y = oracle(x, s, qn, qp)
    y.backward(gy)
    return y.detach(), x.grad, s.grad.reshape(-1)


def _exact_step(q: torch.nn.Module, step: torch.Tensor) -> torch.nn.Module:
    """``q`` with its step set to exactly ``step`` (a fixed step: a learned log-step would round through exp/log)
    and marked as needing a gradient, so the op's step gradient (LSQ eq. 3) is computed and can be compared."""
    q.set_step(step) if hasattr(q, "set_step") else q.scale.set(step)
    q.scale.step.requires_grad_(True)
    return q


def _weight_case(bits: int, impl: str, pow2: bool, seed: int = 0):
    qn, qp = weight_range(bits)
    rows = 4
    step = _pow2_steps(rows) if pow2 else torch.rand(rows, generator=torch.Generator().manual_seed(seed)) * 0.1 + 0.01
    x = (_values(qn, qp, rows, seed, special=pow2) * step.view(-1, 1)).view(rows, -1, 1, 1)
    q = _exact_step(LsqWeightQuantizer(bits, rows, impl, learned=False), step)
    return q, x, step, qn, qp


def _act_case(bits: int, signed: bool, impl: str, pow2: bool, seed: int = 0):
    qn, qp = signed_range(bits) if signed else unsigned_range(bits)
    step = torch.tensor([0.125 if pow2 else 0.0371])
    x = _values(qn, qp, 3, seed, special=pow2) * step  # [batch, features], as a Linear layer's input
    q = LsqActQuantizer(bits, impl, learned=False)
    q.set_state(float(step), signed)
    return _exact_step(q, step), x, step, qn, qp


CPU_IMPLS = [
    "reference",
    "function",
    "auto",
    pytest.param("compiled", marks=[
        pytest.mark.slow,
        pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler"),
    ]),
]


def _cases(impl: str):
    for bits in (2, 4, 8):
        for pow2 in (True, False):
            yield _weight_case(bits, impl, pow2, seed=bits)
            for signed in (True, False):
                yield _act_case(bits, signed, impl, pow2, seed=bits + 1)


def test_oracle_is_eq3():
    for q, x, step, qn, qp in _cases("reference"):
        gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        _, gx, gs = _run_oracle(x, step, qn, qp, gy)
        gx3, gs3 = _eq3(x, step.reshape(-1, *([1] * (x.dim() - 1))), qn, qp, gy)
        assert torch.equal(gx == 0, gx3 == 0)
        torch.testing.assert_close(gx.double(), gx3, rtol=1e-6, atol=0)
        torch.testing.assert_close(gs.double(), gs3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_values_and_gradients_match_lsq(impl):
    """Output, input gradient (STE mask) and step gradient of every CPU implementation equal the oracle's."""
    for q, x, step, qn, qp in _cases(impl):
        gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        y, gx, gs = _run(q, x, gy)
        y0, gx0, gs0 = _run_oracle(x, step, qn, qp, gy)
        where = f"{type(q).__name__} bits={q.bits} Qn={qn} Qp={qp} step={step.tolist()}"
        assert torch.equal(y, y0), where
        assert torch.equal(gx == 0, gx0 == 0), where  # the same straight-through mask, limits included
        torch.testing.assert_close(gx, gx0, rtol=1e-6, atol=0, msg=where)
        torch.testing.assert_close(gs, gs0, rtol=2e-5, atol=1e-6, msg=where)


def test_auto_is_the_hand_written_lsq_op_on_every_device():
    """resolve_impl no longer looks at the device: "auto" is LSQ on CUDA too, not the fused op."""
    assert resolve_impl("auto") == "function"
    assert LsqWeightQuantizer(4, 2).impl == LsqActQuantizer(4).impl == "auto"


def test_no_learnable_zero_point():
    """LSQ has no zero point (symmetric signed / zero-based unsigned ranges); no quantizer may train one."""
    for q in (LsqWeightQuantizer(4, 3, "fused"), LsqActQuantizer(4, "fused")):
        assert [n for n, _ in q.named_parameters()] == ["scale.log_step"]  # learned below 8 bits: the log-step only
    for q in (LsqWeightQuantizer(8, 3, "fused"), LsqActQuantizer(8, "fused")):
        assert [n for n, _ in q.named_parameters()] == []  # 8 bits: a fixed step, nothing learned
        assert not q.zero_point.requires_grad and float(q.zero_point.abs().sum()) == 0.0


def test_fused_op_is_not_lsq_in_the_half_step_outside_the_clip_range():
    """PyTorch's fused learnable fake-quant masks on the rounded value: for Qp < v < Qp + 1/2 (and mirrored
    below -Qn) it passes dL/dx and gives the step gradient Qp - v where LSQ gives 0 and Qp. Elsewhere it is
    LSQ. This is why "auto" does not pick it; if PyTorch ever changes the op, this test says so."""
    bits, s = 4, 0.125
    qn, qp = signed_range(bits)
    band = torch.tensor([qp + 0.125, qp + 0.25, qp + 0.375, -qn - 0.125, -qn - 0.25, -qn - 0.375])
    elsewhere = torch.tensor([-qn - 3.0, -qn - 0.75, -3.25, -0.75, 0.0, 1.25, 6.75, qp + 0.75, qp + 2.0])
    for v, in_band in ((band, True), (elsewhere, False)):
        x = (v * s).view(1, -1)
        gy = torch.linspace(0.5, 1.5, v.numel()).view(1, -1)
        q = LsqActQuantizer(bits, "fused", learned=False)
        q.set_state(s, True)
        y, gx, gs = _run(_exact_step(q, torch.tensor([s])), x, gy)
        y0, gx0, gs0 = _run_oracle(x, torch.tensor([s]), qn, qp, gy)
        assert torch.equal(y, y0) and q.zero_point.grad is None
        g = 1.0 / math.sqrt(v.numel() * qp)
        if in_band:
            assert torch.equal(gx0, torch.zeros_like(gx0)) and torch.equal(gx, gy)
            clipped = torch.where(v > 0, float(qp), float(-qn))
            torch.testing.assert_close(gs0, (gy * clipped).sum().view(1) * g)
            torch.testing.assert_close(gs, (gy * (clipped - v)).sum().view(1) * g)
        else:
            assert torch.equal(gx, gx0)
            torch.testing.assert_close(gs, gs0)
