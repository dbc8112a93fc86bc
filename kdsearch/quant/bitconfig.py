"""The layer inventory and ``BitConfig``: which layers can be quantized, and at how many bits.

A ``BitConfig`` maps quantizable layer names (``model.named_modules()`` names, in registration order) to
weight bit-widths, so a configuration found by the search is a plain dict that plugs straight into
``quantize`` (torchao's config-driven module swap), survives JSON, and flattens into one table row.
The activation rule is not part of it: it is the ``act_bits`` argument of ``quantize`` (see
``resolve_act_bits``).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import nn

from .layers import bypass_quantization
from .quantizers import INTEGER_BITS

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 16, 32)
ACT_RULES: tuple[Any, ...] = (*INTEGER_BITS, 16, 32, "same")
ActRule = Union[int, Literal["same"]]
PIN_ALIASES = ("first", "last")


def check_act_rule(act_bits: ActRule) -> None:
    if isinstance(act_bits, bool) or act_bits not in ACT_RULES:
        raise ValueError(f"act_bits must be one of {ACT_RULES}, got {act_bits!r}")


def resolve_act_bits(weight_bits: int, act_bits: ActRule) -> int | None:
    """Input quantization of a layer with ``weight_bits`` weights under the activation rule ``act_bits``.

    32-bit layers get none (None); 16-bit layers get an fp16 cast (16), modelling an fp16 kernel;
    integer layers get the rule's bits ("same" = the layer's weight bits; 16 = fp16 cast; 32 = none).
    """
    check_act_rule(act_bits)
    if weight_bits == 32:
        return None
    if weight_bits == 16:
        return 16
    bits = weight_bits if act_bits == "same" else int(act_bits)
    return None if bits == 32 else bits


def _quantizable(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """(name, module) of every Conv2d/Linear (float or quantized), in registration order."""
    return [(n, m) for n, m in model.named_modules() if n and _quantizable(m)]


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer. ``macs``: multiply-accumulates for one input of the inventory's size."""

    name: str
    kind: Literal["conv", "dwconv", "linear"]
    params: int
    macs: int
    out_channels: int

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "dwconv", "linear"):
            raise ValueError(f"LayerInfo.kind must be 'conv', 'dwconv' or 'linear', got {self.kind!r}")
        if self.params < 1 or self.out_channels < 1 or self.macs < 0:
            raise ValueError(f"LayerInfo {self.name!r}: params/out_channels must be >= 1 and macs >= 0")


def _kind(m: nn.Module) -> Literal["conv", "dwconv", "linear"]:
    if isinstance(m, nn.Linear):
        return "linear"
    return "dwconv" if m.groups > 1 and m.groups == m.in_channels else "conv"


@torch.no_grad()
def layer_inventory(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> list[LayerInfo]:
    """The quantizable layers in a stable order (registration order) with parameters and MACs.

    MACs come from forward hooks on a zero batch of one ``input_size`` sample, run in eval mode with
    quantizers bypassed (so BN statistics and activation calibration are untouched).
    """
    layers = quantizable_layers(model)
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if isinstance(m, nn.Linear):
                macs[name] = out.numel() * m.in_features
            else:
                kh, kw = m.kernel_size
                macs[name] = out.numel() * (m.in_channels // m.groups) * kh * kw

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        p = next(model.parameters())
        model.eval()
        with bypass_quantization(model):
            model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return [
        LayerInfo(n, _kind(m), m.weight.numel(), macs.get(n, 0),
                  m.out_features if isinstance(m, nn.Linear) else m.out_channels)  # fmt: skip
        for n, m in layers
    ]


Inventoryish = Union[nn.Module, Sequence[LayerInfo]]


def _layer_names(model_or_inventory: Inventoryish) -> list[str]:
    if isinstance(model_or_inventory, nn.Module):
        return [n for n, _ in quantizable_layers(model_or_inventory)]
    return [info.name for info in model_or_inventory]


def _as_bits(value: Any, where: str) -> int:
    """Accept ints (and integral floats/NumPy ints, as a pandas row holds them); reject bools and the rest."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits must be one of {SUPPORTED_BITS}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BitConfig(Mapping[str, int]):
    """Ordered, immutable map: quantizable layer name -> weight bits (one of ``SUPPORTED_BITS``).

    ``BitConfig({"conv1": 8, "fc": 8})`` or ``BitConfig.uniform(model, 4, pin={"first": 8, "last": 8})``.
    """

    bits: Mapping[str, int] | tuple[tuple[str, int], ...] = field(default=())

    def __post_init__(self) -> None:
        items = tuple(self.bits.items()) if isinstance(self.bits, Mapping) else tuple(self.bits)
        seen: set[str] = set()
        clean = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"BitConfig.bits: expected (layer name, bits) pairs, got {item!r}")
            name, value = item
            if not isinstance(name, str) or not name:
                raise ValueError(f"BitConfig.bits: layer names must be non-empty strings, got {name!r}")
            if name in seen:
                raise ValueError(f"BitConfig.bits: layer {name!r} appears twice")
            seen.add(name)
            clean.append((name, _as_bits(value, f"BitConfig.bits[{name!r}]")))
        object.__setattr__(self, "bits", tuple(clean))

    # Mapping protocol
    def __getitem__(self, name: str) -> int:
        for n, b in self.bits:  # type: ignore[misc]
            if n == name:
                return b
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self.bits)  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.bits)

    def __repr__(self) -> str:
        return f"BitConfig({self.to_dict()!r})"

    # construction
    @classmethod
    def uniform(cls, model_or_inventory: Inventoryish, bits: int, pin: Mapping[str, int] | None = None) -> BitConfig:
        """Every quantizable layer at ``bits``, except the ``pin``-ned ones (names or "first"/"last")."""
        names = _layer_names(model_or_inventory)
        if not names:
            raise ValueError("BitConfig.uniform: the model has no Conv2d/Linear layer to quantize")
        mapping = {n: bits for n in names}
        for key, b in (pin or {}).items():
            target = names[0] if key == "first" else names[-1] if key == "last" else key
            if target not in mapping:
                raise ValueError(
                    f"BitConfig.uniform: pin key {key!r} is neither a quantizable layer nor one of {PIN_ALIASES}"
                )
            mapping[target] = b
        return cls(mapping)

    def updated(self, changes: Mapping[str, int]) -> BitConfig:
        """A copy with some layers' bits changed (every name must already be in the config)."""
        unknown = [n for n in changes if n not in self]
        if unknown:
            raise ValueError(f"BitConfig.updated: unknown layer(s) {unknown}")
        return BitConfig({n: changes.get(n, b) for n, b in self.items()})

    # conversions
    def to_dict(self) -> dict[str, int]:
        return dict(self.bits)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BitConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"BitConfig.from_dict: expected a mapping, got {type(d).__name__}")
        return cls(dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> BitConfig:
        return cls.from_dict(json.loads(text))

    def to_row(self, prefix: str = "bits.") -> dict[str, int]:
        """Flat ``{prefix + layer: bits}`` row, e.g. one row of a pandas DataFrame of trials."""
        return {prefix + n: b for n, b in self.items()}

    @classmethod
    def from_row(cls, row: Mapping[str, Any], prefix: str = "bits.") -> BitConfig:
        """Inverse of ``to_row``; other columns are ignored, NaN cells (layer absent) skipped."""
        items = {}
        for key in row.keys():
            if isinstance(key, str) and key.startswith(prefix):
                value = row[key]
                if isinstance(value, float) and math.isnan(value):
                    continue
                items[key[len(prefix):]] = value.item() if hasattr(value, "item") else value
        if not items:
            raise ValueError(f"BitConfig.from_row: no column starts with {prefix!r}")
        return cls(items)

    def validate(self, model_or_inventory: Inventoryish) -> BitConfig:
        """Check that the config names exactly the model's quantizable layers.

        Returns the config in the model's layer order (``self`` when already in that order).
        """
        names = _layer_names(model_or_inventory)
        unknown = [n for n in self if n not in set(names)]
        if unknown:
            raise ValueError(f"BitConfig: unknown layer(s) {unknown}; the model's quantizable layers are {names}")
        missing = [n for n in names if n not in self]
        if missing:
            raise ValueError(f"BitConfig: missing layer(s) {missing}; every quantizable layer needs bits")
        return self if list(self) == names else BitConfig({n: self[n] for n in names})
