"""Layer-wise sensitivity of a trained float model: the two omegas of the sensitivity table.

* ``omega_kl(l, b)``: KL(p_float || p_{l at b bits}) averaged over a calibration set, with only layer l's
  weights quantized (activations float). The float model's KL to itself is 0, so this is the increase
  of the KL. Q_b is the quant module's own weight quantizer initialised the way ``quantize`` initialises
  it (LSQ step from the MSE-optimal clip, per output channel), so the table measures the weights QAT
  starts from.
* ``omega_hessian(l, b)``: HAWQ-V2 (Dong et al. 2020, eq. 4-5): Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2, with
  the Hessian trace of the calibration loss from Hutchinson's estimator Tr(H) = E_v[v^T H v] over
  Rademacher vectors v (their Algorithm 1), computed for all layers at once from Hessian-vector
  products (double backward).

Cost: the float logits are computed once; each (layer, bits) is one inference-mode forward of the
calibration set with that layer's weight tensor swapped (no model rebuild). Hutchinson costs one
gradient-with-graph per calibration batch plus one HVP per sample vector.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.layers import make_weight_quantizer
from ..quant.precision import strict_fp32

log = logging.getLogger("kdsearch.sensitivity")

WEIGHT_INIT = "mse"  # what `kdsearch.quant.quantize` initialises weight steps with (its default)


@torch.no_grad()
def fake_quant_weight(weight: Tensor, bits: int) -> Tensor:
    """Q_b(W): ``weight`` through the quant module's quantizer at its QAT initialisation (32 = identity)."""
    w = weight.detach()
    if bits == 32:
        return w.clone()
    q = make_weight_quantizer(int(bits), w.shape[0], "reference")
    if q is None:
        return w.clone()
    if hasattr(q, "init_from"):
        q.init_from(w.float(), WEIGHT_INIT)
    return q.to(w.device)(w.float()).to(w.dtype)


def _batches(x: Tensor, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, x.shape[0])) for i in range(0, x.shape[0], batch_size)]


@torch.inference_mode()
def _log_probs(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    return torch.cat([F.log_softmax(model(x[s].to(device)).float(), dim=1) for s in _batches(x, batch_size)])


@torch.inference_mode()
def _mean_kl(model: nn.Module, x: Tensor, ref_logp: Tensor, batch_size: int, device: torch.device) -> float:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for s in _batches(x, batch_size):
        logq = F.log_softmax(model(x[s].to(device)).float(), dim=1)
        total += F.kl_div(logq, ref_logp[s], log_target=True, reduction="sum").double()
    return float(total) / x.shape[0]


def _sweep(
    model: nn.Module, calib: Tensor, bits_by_layer: Mapping[str, Sequence[int]], batch_size: int,
    device: torch.device,
) -> dict[tuple[str, int], tuple[float, float]]:
    """{(layer, bits): (mean KL to the float model, ||Q_b(W) - W||^2)}, one weight swap per entry."""
    model.eval()
    ref = _log_probs(model, calib, batch_size, device)
    out: dict[tuple[str, int], tuple[float, float]] = {}
    for name, bits_list in bits_by_layer.items():
        weight = model.get_submodule(name).weight
        original = weight.data
        try:
            for bits in bits_list:
                qw = fake_quant_weight(original, bits)
                qerr = float((qw.double() - original.double()).pow(2).sum())
                weight.data = qw
                out[(name, int(bits))] = (max(0.0, _mean_kl(model, calib, ref, batch_size, device)), qerr)
        finally:
            weight.data = original
    return out


def omega_kl(
    model: nn.Module,
    calib: Tensor,
    bits_by_layer: Mapping[str, Sequence[int]],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> dict[tuple[str, int], float]:
    """{(layer, bits): mean KL(float || layer-alone-quantized)} on the normalised images ``calib``."""
    device = device or next(model.parameters()).device
    return {k: kl for k, (kl, _) in _sweep(model, calib, bits_by_layer, batch_size, device).items()}


def _rademacher(shapes: Sequence[torch.Size], gen: torch.Generator, device: torch.device) -> list[Tensor]:
    return [(torch.randint(0, 2, s, generator=gen, dtype=torch.int8) * 2 - 1).to(device, torch.float32) for s in shapes]


def hutchinson_mean_traces(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    layers: Sequence[str],
    *,
    samples: int = 16,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Tr(H_l) / n_l for each layer's weights, H the Hessian of the mean cross-entropy on (images, labels).

    Hutchinson (HAWQ-V2, Algorithm 1): Tr(H) ~ (1/S) sum_s v_s^T H v_s, v_s Rademacher. The same v_s is
    used on every calibration batch (regenerated from ``seed`` + s), so the estimate is that of the loss
    over the whole calibration set. Eval mode: BatchNorm uses its running statistics, as at deployment.
    """
    device = device or next(model.parameters()).device
    model.eval()
    params = [model.get_submodule(n).weight for n in layers]
    needs = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    shapes = [p.shape for p in params]
    acc = torch.zeros(len(params), dtype=torch.float64, device=device)
    n = images.shape[0]
    try:
        for s in _batches(images, batch_size):
            x, y = images[s].to(device), labels[s].to(device)
            loss = F.cross_entropy(model(x).float(), y) * ((s.stop - s.start) / n)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for k in range(samples):
                vs = _rademacher(shapes, torch.Generator().manual_seed(seed * 1_000_003 + k), device)
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=k < samples - 1)
                acc += torch.stack([(h * v).sum().double() for h, v in zip(hvs, vs)])
            del grads, loss
    finally:
        for p, r in zip(params, needs):
            p.requires_grad_(r)
    traces = acc / samples
    return {name: float(traces[i]) / params[i].numel() for i, name in enumerate(layers)}


@dataclass
class Timings:
    """Seconds spent per part of the table, for the stage's report."""

    float_logits_and_kl: float = 0.0  # includes quantizing each (layer, bits) weight once
    hessian: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    hessian_skipped: str = ""  # why the Hessian columns are NaN (the model has an op with no second derivative)

    def to_dict(self) -> dict[str, float]:
        d = {"kl": round(self.float_logits_and_kl, 3), "hessian": round(self.hessian, 3)}
        d.update({k: round(v, 3) for k, v in self.extra.items()})
        d["total"] = round(sum(d.values()), 3)
        return d


def sensitivity_table(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    bits_by_layer: Mapping[str, Sequence[int]],
    *,
    hutchinson_samples: int = 16,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | None = None,
    kinds: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, Timings]:
    """One row per (layer, bits): layer, layer_index, kind, bits, params, omega_kl, omega_hessian,
    hessian_mean_trace, weight_qerr (= ||Q_b(W) - W||^2). Byte costs are added by the caller (``costs``).

    ``images``: normalised float calibration images (CPU or device); ``labels`` their classes.
    """
    device = device or next(model.parameters()).device
    model.to(device)
    t = Timings()
    # Strict fp32 for the whole sweep (no TF32 / implicit bf16, no autocast): the small KLs of 8-bit weights
    # would otherwise carry the reduced-precision matmuls' noise, and rank layers by it.
    with strict_fp32(device.type):
        t0 = time.perf_counter()
        sweep = _sweep(model, images, bits_by_layer, batch_size, device)
        t.float_logits_and_kl = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            traces = hutchinson_mean_traces(model, images, labels, list(bits_by_layer), samples=hutchinson_samples,
                                            seed=seed, batch_size=batch_size, device=device)
        except RuntimeError as err:
            # A user's model may use an op without a second derivative (torchvision's MobileNetV3: hardsigmoid).
            # HAWQ's trace needs one, omega_kl does not: the Hessian columns are NaN, and the reason is kept.
            if "derivative for" not in str(err):
                raise
            t.hessian_skipped = str(err).splitlines()[0]
            log.warning("sensitivity: no Hessian estimate (%s); omega_kl only", t.hessian_skipped)
            traces = {name: float("nan") for name in bits_by_layer}
        t.hessian = time.perf_counter() - t0
    rows = []
    for index, (name, bits_list) in enumerate(bits_by_layer.items()):
        params = model.get_submodule(name).weight.numel()
        for bits in sorted({int(b) for b in bits_list}, reverse=True):
            kl, qerr = sweep[(name, bits)]
            rows.append({
                "layer": name, "layer_index": index, "kind": (kinds or {}).get(name, ""), "bits": bits,
                "params": params, "omega_kl": kl, "omega_hessian": traces[name] * qerr,
                "hessian_mean_trace": traces[name], "weight_qerr": qerr,
            })  # fmt: skip
    return pd.DataFrame(rows), t
