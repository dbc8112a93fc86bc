"""The compute model: bit operations (BOPs), the second cost beside the size model (``size.py``).

    BOPs = sum over conv/linear layers l of  MACs_l x b_w(l) x b_a(l)

the definition of HAWQ-V3 (Yao et al. 2021, "HAWQ-V3: Dyadic Neural Network Quantization", sec. 4 and
Table 2: ResNet18 1858 GBOPs in fp32, 116 at W8A8) and of AIMET's mixed-precision BOPs. ``MACs_l`` are the
multiply-accumulates of one input of the data's image shape, taken from the model's own shapes by forward
hooks (``layer_inventory``); ``b_w`` is the layer's weight width and ``b_a`` the width of its input
activation under the spec's ``quant.act_bits`` rule (``resolve_act_bits``): a 32-bit (float) layer counts
32 x 32, a 16-bit layer 16 x 16 (an fp16 kernel), an integer layer its weight bits x the rule's activation
bits (an activation rule of 32 leaves the input in float: x 32).

Counted: Conv2d (grouped and depthwise included) and Linear, the layers that hold nearly all of a CNN's
MACs and the ones the search quantizes. Not counted, as in HAWQ-V3: BatchNorm (folded into the conv at
export), activations, pooling and residual adds. Biases are not multiply-accumulates. GBOPs = 10^9 BOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .bitconfig import ActRule, BitConfig, LayerInfo, check_act_rule, layer_inventory, resolve_act_bits
from .layers import is_quant_layer

GIGA = 1e9


def operand_act_bits(weight_bits: int, act_bits: ActRule) -> int:
    """The activation width a layer with ``weight_bits`` weights multiplies with: None (float input) is 32."""
    resolved = resolve_act_bits(int(weight_bits), act_bits)
    return 32 if resolved is None else int(resolved)


def layer_bops(macs: int, weight_bits: int, act_bits: ActRule) -> int:
    """BOPs of one layer: MACs x b_w x b_a (an exact integer)."""
    return int(macs) * int(weight_bits) * operand_act_bits(weight_bits, act_bits)


@dataclass(frozen=True)
class LayerBops:
    name: str
    macs: int
    weight_bits: int
    act_bits: int  # the operand width, 32 for a float input
    bops: int


@dataclass(frozen=True)
class BopsReport:
    layers: tuple[LayerBops, ...]

    @property
    def total_bops(self) -> int:
        return sum(layer.bops for layer in self.layers)

    @property
    def gbops(self) -> float:
        return self.total_bops / GIGA

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


def bops_costs(inventory: Sequence[LayerInfo], bits_by_layer: Mapping[str, Iterable[int]],
               act_bits: ActRule = 8) -> dict[tuple[str, int], int]:
    """{(layer, bits): BOPs} for the given choices: the table the search's BOPs constraint and the solver add up."""
    check_act_rule(act_bits)
    macs = {info.name: info.macs for info in inventory}
    unknown = sorted(set(bits_by_layer) - set(macs))
    if unknown:
        raise ValueError(f"bops_costs: unknown layer(s) {unknown}")
    return {(n, int(b)): layer_bops(macs[n], int(b), act_bits) for n, bits in bits_by_layer.items() for b in bits}


def model_bops(model: nn.Module, bit_config: Mapping[str, int] | None = None, *, act_bits: ActRule = 8,
               input_size: Sequence[int] = (3, 32, 32)) -> BopsReport:
    """BOPs of ``model`` on one input of ``input_size`` (the data's image shape, C x H x W).

    Float model: ``bit_config`` (default: all 32) and ``act_bits`` say how it would be quantized.
    Quantized model: the widths its modules run with (a ``bit_config``, if given, must agree).
    """
    inventory = layer_inventory(model, input_size=input_size)
    modules = dict(model.named_modules())
    if any(is_quant_layer(modules[info.name]) for info in inventory):
        widths = {}
        for info in inventory:
            m = modules[info.name]
            wb = int(m.weight_bits) if is_quant_layer(m) else 32  # type: ignore[union-attr]
            ab = getattr(m, "act_bits", None) if is_quant_layer(m) else None
            widths[info.name] = (wb, 32 if ab is None else int(ab))
        if bit_config is not None and dict(bit_config) != {n: w[0] for n, w in widths.items()}:
            raise ValueError("model_bops: bit_config differs from the bits the quantized model runs with")
    else:
        check_act_rule(act_bits)
        cfg = BitConfig.uniform(inventory, 32) if bit_config is None else BitConfig.from_dict(dict(bit_config))
        cfg = cfg.validate(inventory)
        widths = {n: (cfg[n], operand_act_bits(cfg[n], act_bits)) for n in cfg}
    return BopsReport(tuple(LayerBops(info.name, info.macs, *widths[info.name],
                                      info.macs * widths[info.name][0] * widths[info.name][1]) for info in inventory))


def gbops_function(model: nn.Module, act_bits: ActRule = 8,
                   input_size: Sequence[int] = (3, 32, 32)) -> Callable[[Mapping[str, int] | None], float]:
    """GBOPs of ``model`` at any bit config (None, or a layer left out: 32-bit), from one forward pass: for a
    table of many configurations of one model (the report's rows)."""
    check_act_rule(act_bits)
    inventory = layer_inventory(model, input_size=input_size)

    def gbops(bit_config: Mapping[str, int] | None) -> float:
        cfg = bit_config or {}
        return sum(layer_bops(i.macs, int(cfg.get(i.name, 32)), act_bits) for i in inventory) / GIGA

    return gbops
