"""Exact per-layer byte costs, derived from the size model so that every budget check agrees.

``kdsearch.quant.model_size`` is the one definition of a model's size (what the exported file holds).
It is additive over layers: a layer's weight bits change only that layer's own entries (packed
weights, per-channel scales, activation step). So the size of any configuration is

    model_size(cfg) = fixed_bytes + sum_l cost(l, cfg[l])

with ``cost(l, b)`` measured as a difference of two ``model_size`` calls. ``check_costs`` verifies the
identity on a given configuration; the sensitivity stage runs it on every warm start it writes.

One term is shared, not per layer: the quantized residual adds' steps (``residual_add_bytes``), which the file
holds when at least one layer is integer. ``fixed_bytes`` includes them; a configuration with no integer layer
at all (every layer 16 or 32 bits) is ``residual_add_bytes`` smaller than the sum (``SearchSpace.size_bytes``
subtracts it; elsewhere the sum is a bound, 8 bytes per add over).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..quant import BitConfig, layer_inventory, model_size, storage_plan
from ..quant.bitconfig import ActRule, resolve_act_bits


def layer_names(model: nn.Module) -> list[str]:
    """The quantizable layers in the quant module's stable order."""
    return [info.name for info in layer_inventory(model)]


def resolve_pins(names: Sequence[str], pin: Mapping[str, int] | None) -> dict[str, int]:
    """Spec pins ("first", "last" or layer names) -> {layer name: bits}, as ``BitConfig.uniform`` reads them."""
    out: dict[str, int] = {}
    for key, bits in (pin or {}).items():
        target = names[0] if key == "first" else names[-1] if key == "last" else key
        if target not in names:
            raise ValueError(f"quant.pin: {key!r} is neither 'first', 'last' nor a quantizable layer ({list(names)})")
        out[target] = int(bits)
    return out


def is_integer_width(bits: int, act_bits: ActRule) -> bool:
    """A layer at ``bits`` under the activation rule runs integer (integer weights and integer input)."""
    ab = resolve_act_bits(int(bits), act_bits)
    return int(bits) <= 8 and ab is not None and ab <= 8


def residual_add_bytes(model: nn.Module, act_bits: ActRule = 8) -> int:
    """Bytes of the quantized residual adds' steps: what a configuration with an integer layer holds for them."""
    cfg = BitConfig.uniform(model, 8)
    return sum(t.nbytes for t in storage_plan(model, cfg, act_bits) if t.role == "add_step")


def layer_byte_costs(
    model: nn.Module, bits_by_layer: Mapping[str, Sequence[int]], act_bits: ActRule = 8
) -> tuple[int, dict[tuple[str, int], int]]:
    """(fixed_bytes, {(layer, bits): bytes}) such that model_size = fixed + sum of the chosen costs.

    A layer's cost is its weight storage at ``bits`` plus whatever the size model adds for it at that
    width (per-channel scales, activation step); BN, biases and every other tensor are in ``fixed_bytes``.
    """
    names = layer_names(model)
    base_cfg = BitConfig.uniform(model, 32)
    base = model_size(model, base_cfg, act_bits=act_bits).total_bytes
    w32 = {n: model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in names}
    adds = residual_add_bytes(model, act_bits)
    fixed = base - sum(w32.values()) + adds
    costs: dict[tuple[str, int], int] = {}
    for name, bits in bits_by_layer.items():
        if name not in w32:
            raise ValueError(f"layer {name!r} is not a quantizable layer of the model")
        for b in bits:
            size = model_size(model, base_cfg.updated({name: int(b)}), act_bits=act_bits).total_bytes
            costs[(name, int(b))] = size - base + w32[name] - (adds if is_integer_width(b, act_bits) else 0)
    return fixed, costs


def check_costs(
    model: nn.Module, cfg: BitConfig, fixed_bytes: int, costs: Mapping[tuple[str, int], int], act_bits: ActRule = 8
) -> int:
    """Return model_size(cfg).total_bytes after checking it equals fixed + sum of the per-layer costs."""
    actual = model_size(model, cfg, act_bits=act_bits).total_bytes
    predicted = int(fixed_bytes) + sum(int(costs[(n, int(b))]) for n, b in cfg.items())
    if not any(is_integer_width(b, act_bits) for b in cfg.values()):
        predicted -= residual_add_bytes(model, act_bits)
    if actual != predicted:
        raise RuntimeError(
            f"size model is not additive over layers for {cfg.to_dict()}: model_size says {actual} bytes, "
            f"fixed + per-layer costs say {predicted}"
        )
    return actual
