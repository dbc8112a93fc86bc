"""The size model: exactly the bytes the exported file's tensors hold, and the averages derived from them.

What is counted (one entry per tensor of the file, see ``storage_plan``; ``export.py`` writes exactly these):

* integer weights (2-8 bits): ``ceil(numel * bits / 8)`` bytes, densely packed (8-bit as int8);
  16-bit weights: 2 bytes each (IEEE half); 32-bit layers: 4 bytes each;
* per integer layer: one fp32 step per output channel and, when its input is integer-quantized, one fp32
  activation step (bits and signedness go into the metadata JSON);
* per quantized residual add (``QuantResidualAdd``): one fp32 step for each of its two inputs, also where the
  shortcut shares the grid of a layer's input (the file stays one tensor per step; 4 bytes);
* each BatchNorm: 2 fp32 per channel, its running statistics and affine folded into ``y*a + b``
  (the seed counts BN's 2 parameters per channel at 32 bits; the folded pair is what the file holds);
* every other parameter (biases, ...) and persistent buffer at its stored width (fp32).

Not counted: the safetensors header and the metadata JSON (names, shapes, BitConfig), a few KB to a few
tens of KB; the export test bounds file size by ``total_bytes`` + 2% + 16 KB.

This holds for any ``nn.Module``, not only the zoo's: every ``nn.Conv2d`` (grouped and depthwise included)
and ``nn.Linear`` module is a quantizable layer, and whatever else has parameters is stored in fp32;
``float_parts`` lists those and why (tests/test_user_models.py checks torchvision's MobileNetV3 against an
independent count of its parameters at their bit-widths).

MB are 10^6 bytes. ``avg_bits`` = 8 * total_bytes / num_params over *all* the float model's parameters
(quantizer steps excluded from the count but their storage included), which is the seed's convention
(MobileNetV2: 2,296,922 params x 4.8 bits / 8 = 1.378 MB, fp32 = 9.19 MB).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .bitconfig import ActRule, BitConfig, check_act_rule, quantizable_layers, resolve_act_bits
from kdsearch.models.residual import ResidualAdd

from .layers import ADD_INPUTS, QuantResidualAdd, is_quant_layer
from .quantizers import HalfQuantizer, LsqActQuantizer, LsqWeightQuantizer, StepOf

Role = Literal["qweight", "hweight", "scale", "act_step", "add_step", "bn", "float"]
_QUANTIZER_TYPES = (LsqWeightQuantizer, LsqActQuantizer, HalfQuantizer, StepOf)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the exported file: its key, what it is, its element count and bits per element."""

    key: str
    role: Role
    numel: int
    bits: int

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * self.bits / 8)


@dataclass(frozen=True)
class SizeReport:
    weight_bits_total: int  # bits of the conv/linear weights as stored (packed, byte-padded per layer)
    other_bits_total: int  # biases, BN, scales, activation steps, other params/buffers
    total_bytes: int
    total_mb: float  # 10^6 bytes
    avg_bits: float  # 8 * total_bytes / num_params
    fp32_mb: float  # 4 bytes per parameter
    compression: float  # fp32_mb / total_mb
    num_params: int  # the float model's parameters (quantizer steps excluded)
    weight_avg_bits: float  # mean bits of the quantizable weights alone (no padding, no scales)

    def __post_init__(self) -> None:
        if self.total_bytes * 8 != self.weight_bits_total + self.other_bits_total:
            raise ValueError("SizeReport.total_bytes must equal (weight_bits_total + other_bits_total) / 8")


def _layer_specs(
    model: nn.Module, bit_config: Mapping[str, int] | None, act_bits: ActRule
) -> dict[str, tuple[int, int | None]]:
    """layer name -> (weight bits, integer activation bits or None) as the file would hold it."""
    layers = quantizable_layers(model)
    quantized = any(is_quant_layer(m) for _, m in layers)
    specs: dict[str, tuple[int, int | None]] = {}
    if quantized:
        for n, m in layers:
            wb = m.weight_bits if is_quant_layer(m) else 32  # type: ignore[union-attr]
            aq = getattr(m, "act_quantizer", None)
            specs[n] = (wb, aq.bits if isinstance(aq, LsqActQuantizer) else None)
        if bit_config is not None and dict(bit_config) != {n: s[0] for n, s in specs.items()}:
            raise ValueError("model_size: bit_config differs from the bits the quantized model runs with")
        return specs
    check_act_rule(act_bits)
    cfg = BitConfig.uniform(model, 32) if bit_config is None else BitConfig.from_dict(dict(bit_config))
    cfg = cfg.validate(model)
    for n, _ in layers:
        ab = resolve_act_bits(cfg[n], act_bits)
        specs[n] = (cfg[n], ab if ab is not None and ab <= 8 else None)
    return specs


def storage_plan(
    model: nn.Module, bit_config: Mapping[str, int] | None = None, act_bits: ActRule = 8
) -> list[StoredTensor]:
    """Every tensor the exported file holds for ``model`` (float + config, or already quantized)."""
    specs = _layer_specs(model, bit_config, act_bits)
    integer_acts = any(ab is not None for _, ab in specs.values())  # `quantize` then quantizes the residual adds
    float_model = not any(is_quant_layer(x) for x in model.modules())
    plan: list[StoredTensor] = []
    for mod_name, m in model.named_modules():
        if isinstance(m, _QUANTIZER_TYPES):
            continue  # covered by their layer's entries
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(m, QuantResidualAdd) or (isinstance(m, ResidualAdd) and integer_acts and float_model):
            plan += [StoredTensor(f"{prefix}{k}_step", "add_step", 1, 32) for k in ADD_INPUTS]
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            plan.append(StoredTensor(f"{prefix}affine", "bn", 2 * m.num_features, 32))
            continue
        for pname, p in m.named_parameters(recurse=False):
            key = prefix + pname
            wb, ab = specs.get(mod_name, (32, None))
            if pname != "weight" or wb == 32:
                plan.append(StoredTensor(key, "float", p.numel(), p.element_size() * 8))
            elif wb == 16:
                plan.append(StoredTensor(key, "hweight", p.numel(), 16))
            else:
                plan.append(StoredTensor(key, "qweight", p.numel(), wb))
                plan.append(StoredTensor(f"{prefix}weight_scale", "scale", p.shape[0], 32))
                if ab is not None:
                    plan.append(StoredTensor(f"{prefix}act_step", "act_step", 1, 32))
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                plan.append(StoredTensor(prefix + bname, "float", b.numel(), b.element_size() * 8))
    return plan


@dataclass(frozen=True)
class FloatPart:
    """Parameters the exported file keeps in floating point, and why (for the sensitivity priors and the report)."""

    name: str  # a module name, or a layer's "<name>.bias"
    kind: str  # the module's class
    params: int
    why: str


def float_parts(model: nn.Module, bit_config: Mapping[str, int] | None = None) -> list[FloatPart]:
    """Everything of ``model`` that stays in float under ``bit_config`` (default: any), in module order."""
    layers = dict(quantizable_layers(model))
    bits = dict(bit_config or {})
    out: list[FloatPart] = []
    for name, m in model.named_modules():
        if isinstance(m, _QUANTIZER_TYPES):
            continue
        own = {n: p.numel() for n, p in m.named_parameters(recurse=False)}
        kind = type(m).__name__
        if not own:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(FloatPart(name, kind, sum(own.values()), "BatchNorm: folded into one fp32 y*a+b per channel"))
        elif name in layers and bits.get(name) == 32:
            out.append(FloatPart(name, kind, sum(own.values()), "32 bits in this configuration (e.g. a pin)"))
        elif name in layers:
            out += [FloatPart(f"{name}.{n}", kind, c, "bias: fp32, added to the integer accumulator")
                    for n, c in own.items() if n != "weight"]
        else:
            out.append(FloatPart(name or "(model)", kind, sum(own.values()),
                                 f"{kind} is not an nn.Conv2d or nn.Linear: no integer kernel, stored fp32"))
    return out


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "_quantizer." not in n)


def model_size(model: nn.Module, bit_config: Mapping[str, int] | None = None, *, act_bits: ActRule = 8) -> SizeReport:
    """Size of ``model`` as the exported file would hold it.

    Float model: ``bit_config`` (default: all 32) and ``act_bits`` say how it would be quantized.
    Quantized model: read from its modules (a ``bit_config``, if given, must agree).
    """
    plan = storage_plan(model, bit_config, act_bits)
    layers = dict(quantizable_layers(model))
    weight_keys = {f"{name}.weight" for name in layers}
    weight_bits = sum(t.nbytes * 8 for t in plan if t.key in weight_keys)
    total_bytes = sum(t.nbytes for t in plan)
    n = _num_params(model)
    specs = _layer_specs(model, bit_config, act_bits)
    w_numel = sum(m.weight.numel() for m in layers.values())
    w_bits = sum(m.weight.numel() * specs[name][0] for name, m in layers.items())
    total_mb = total_bytes / 1e6
    return SizeReport(
        weight_bits_total=weight_bits,
        other_bits_total=total_bytes * 8 - weight_bits,
        total_bytes=total_bytes,
        total_mb=total_mb,
        avg_bits=8 * total_bytes / n,
        fp32_mb=4 * n / 1e6,
        compression=(4 * n / 1e6) / total_mb,
        num_params=n,
        weight_avg_bits=w_bits / max(w_numel, 1),
    )

