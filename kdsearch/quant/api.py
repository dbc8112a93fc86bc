"""``quantize``: the one verb that turns a float model into a QAT model (torchao's ``quantize_`` pattern).

QAT is then the ordinary training loop on the returned model: build the float model, load the float
checkpoint, ``quantize`` (step sizes initialise from those weights and, with ``calib``, from calibration
batches), then create the optimizer. Steps below 8 bits are learned ``log_step`` parameters
(``quantizer_parameters``; ``kdsearch.train`` gives them an Adam optimizer of their own), wider ones fixed.
After training, ``reestimate_bn`` refreshes BatchNorm statistics before export. The quantized layers compute in strict fp32 even under
``torch.autocast`` (``precision.strict_fp32``), as the exported model does; ``kdsearch.train`` runs whole QAT
phases that way (no TF32 in the backward either). A QAT checkpoint is the quantized model's ``state_dict``: load it into
``quantize(fresh_model, cfg, weight_init="none")`` (the activation steps' init state is in it too).

BatchNorm: kept as a separate float layer during QAT (batch statistics in training, as in LSQ), not
folded into the conv weights before quantization. In eval mode it is evaluated as the per-channel affine
``y*a + b`` that its running statistics and affine fold into (``FoldingBatchNorm2d``); the exported file
stores exactly that (a, b), two fp32 per channel, which is also what the size model counts, and the
reloaded model reproduces the QAT model's eval outputs bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .bitconfig import ActRule, BitConfig, check_act_rule, quantizable_layers, resolve_act_bits
from kdsearch.models.residual import ResidualAdd

from .integer_graph import bind, bind_on_first_call, is_integer_layer
from .layers import QuantConv2d, QuantLinear, QuantResidualAdd, folding_bn, is_quant_layer, modes_restored
from .quantizers import INITS, LsqActQuantizer, _check_impl


def is_quantized(model: nn.Module) -> bool:
    return any(is_quant_layer(m) for m in model.modules())


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(
    model: nn.Module,
    bit_config: BitConfig | dict[str, int],
    act_bits: ActRule = 8,
    *,
    calib: torch.Tensor | None = None,
    weight_init: str = "mse",
    act_init: str = "mse",
    impl: str = "auto",
    learn_steps: bool = True,
) -> nn.Module:
    """Swap every Conv2d/Linear of ``model`` (in place) for its quantized wrapper; return ``model``.

    ``bit_config`` must name every quantizable layer (``BitConfig.validate``); 32-bit layers stay float
    modules. ``act_bits`` is the activation rule (``resolve_act_bits``). ``weight_init``: "mse" (default,
    lowest measured error), "lsq", "max", or "none" (steps left at 1, for loading a checkpoint).
    Activation steps initialise from ``calib`` if given (``calibrate``: a tensor or several batches, in eval
    mode), else from the first batch the layer sees. ``learn_steps=False`` fixes every step (a reloaded model);
    otherwise steps below 8 bits are learned log-steps and the rest fixed (``quantizers.StepOf`` says why).
    """
    if is_quantized(model):
        raise ValueError("quantize: the model is already quantized; quantize a fresh float model")
    cfg = bit_config if isinstance(bit_config, BitConfig) else BitConfig.from_dict(bit_config)
    cfg = cfg.validate(model)
    check_act_rule(act_bits)
    _check_impl(impl)
    if weight_init not in INITS:
        raise ValueError(f"quantize: weight_init must be one of {INITS}, got {weight_init!r}")
    if act_init not in INITS[:3]:
        raise ValueError(f"quantize: act_init must be one of {INITS[:3]}, got {act_init!r}")
    for name, layer in quantizable_layers(model):
        bits = cfg[name]
        if bits == 32:
            continue
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        new = cls.from_float(layer, bits, resolve_act_bits(bits, act_bits), impl=impl, act_init=act_init,
                             learned=None if learn_steps else False)
        if hasattr(new.weight_quantizer, "init_from"):
            new.weight_quantizer.init_from(layer.weight, weight_init)
        _set_module(model, name, new)
    for name, m in list(model.named_modules()):
        bn = folding_bn(m)
        if bn is not None:
            _set_module(model, name, bn)
    integer = any(is_integer_layer(m) for m in model.modules())
    for name, m in list(model.named_modules()):
        if integer and type(m) is ResidualAdd:  # quantized adds only where integer layers are (8-bit containers)
            _set_module(model, name, QuantResidualAdd(8, impl, act_init, learned=None if learn_steps else False))
    model._kdsearch_bound = False
    model.register_forward_pre_hook(bind_on_first_call)
    if calib is not None:
        calibrate(model, calib)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor]) -> None:
    """(Re-)set every activation step from eval-mode forwards of ``batches`` (one tensor, or several).

    Each activation quantizer observes its float input over all batches (earlier layers unquantized, as
    PyTorch's observers and NNCF's range initialisers see it) and takes the MSE-optimal step of the pooled
    samples. Why eval mode and several un-augmented batches: the ranges then describe what the deployed
    model sees (BatchNorm on running statistics, clean images), not one augmented batch under batch
    statistics, which is what the first training batch would give. Train/eval modes are restored. The first
    batch also binds the integer graph (``integer_graph.bind``: folded int32 biases, one grid per tensor,
    quantized residual adds) before anything is observed.
    """
    quantizers: list[LsqActQuantizer] = []
    bound = False
    with modes_restored(model):
        try:
            model.eval()
            for x in [batches] if isinstance(batches, torch.Tensor) else batches:
                if not bound:  # the integer graph's links first (`integer_graph`): shared grids observe both reads
                    bind(model, x)
                    bound = True
                    quantizers = [m for m in model.modules() if isinstance(m, LsqActQuantizer)]  # each once
                    for q in quantizers:
                        q.start_observing()
                model(x)
        finally:
            for q in quantizers:
                q.finish_observing()


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running statistics of the (quantized) model from ``batches``; return how many.

    Why: during QAT the running statistics are an exponential average over batches whose weights (and
    quantization) kept changing; the deployed model folds them into its per-channel affine. Re-estimating them
    with the final weights, as a cumulative average (``momentum=None``) over the given batches, is the standard
    fix after QAT (e.g. torchao's and NNCF's QAT guidance; Nagel et al. 2022, "Overcoming Oscillations in
    Quantization-Aware Training", sec. 4). Only BatchNorm layers run in training mode; nothing else changes.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = {m: m.momentum for m in bns}
    with modes_restored(model):
        try:
            model.eval()
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for x in batches:
                model(x)
        finally:
            for m in bns:
                m.momentum = momenta[m]
    return len(bns)


def bit_config_of(model: nn.Module) -> BitConfig:
    """The weight bits the (quantized or float) model actually runs with; float layers count as 32."""
    return BitConfig(
        {n: (m.weight_bits if is_quant_layer(m) else 32) for n, m in quantizable_layers(model)}  # type: ignore[union-attr]
    )


def act_bits_of(model: nn.Module) -> dict[str, int | None]:
    """Per-layer input quantization: integer bits, 16 (fp16 cast) or None (float)."""
    return {n: (m.act_bits if is_quant_layer(m) else None) for n, m in quantizable_layers(model)}  # type: ignore[union-attr]


STEP_PARAM_SUFFIX = "_quantizer.scale.log_step"


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned log-steps (sub-8-bit quantizers): ``kdsearch.train`` gives them an optimizer of their own."""
    return [p for n, p in model.named_parameters() if n.endswith(STEP_PARAM_SUFFIX)]
