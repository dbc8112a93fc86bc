"""Spec checks that need the student architecture (cheap: the model is built, never run).

`kdsearch.spec` validates the YAML on its own; these rules also need the layer inventory and the size
model, e.g. a size or BOPs budget below the smallest size or BOPs the student can reach with the allowed
bit-widths. They run before any compute, and fail as a `SpecError` naming the field. The BOPs of an image
folder's images depend on their shape, which only decoding tells: that check waits for the search stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .spec import Spec, SpecError


def _student_and_pins(spec: Spec) -> tuple[Any, dict[str, int]]:
    from .models import create_model
    from .sensitivity.costs import layer_names, resolve_pins

    model = create_model(spec.student.arch, num_classes=spec.data.classes or 10)
    try:
        return model, resolve_pins(layer_names(model), spec.quant.pin)
    except ValueError as err:
        raise SpecError("quant.pin", str(err).removeprefix("quant.pin: ")) from None


def smallest_size_bytes(spec: Spec) -> int:
    """model_size of the student with every free layer at the lowest allowed bits and pins applied."""
    from .quant import BitConfig, model_size

    model, pins = _student_and_pins(spec)
    cfg = BitConfig.uniform(model, min(spec.quant.bits)).updated(pins)
    return model_size(model, cfg, act_bits=spec.quant.act_bits).total_bytes


def smallest_bops(spec: Spec, input_size: Sequence[int]) -> int:
    """model_bops of the same configuration: BOPs grow with a layer's weight bits under every activation rule."""
    from .quant import BitConfig, model_bops

    model, pins = _student_and_pins(spec)
    cfg = BitConfig.uniform(model, min(spec.quant.bits)).updated(pins)
    return model_bops(model, cfg, act_bits=spec.quant.act_bits, input_size=input_size).total_bops


def _below(field: str, what: str, spec: Spec, cost: str, smallest: str) -> SpecError:
    return SpecError(field, f"{what} is below the smallest {cost} {spec.student.arch} can reach with bits "
                            f"{list(spec.quant.bits)} and pins {spec.quant.pin} ({smallest}); raise the budget, "
                            "allow fewer bits or pin fewer layers")


def check_spec(spec: Spec) -> None:
    from .data_checks import known_image_shape

    if spec.search.budgets_mb:
        smallest = smallest_size_bytes(spec)
        for i, budget in enumerate(spec.search.budgets_mb):
            if budget * 1e6 < smallest:
                raise _below(f"search.budgets_mb[{i}]", f"{budget} MB", spec, "size", f"{smallest / 1e6:.4g} MB")
    shape = known_image_shape(spec.data)
    if spec.search.budgets_gbops and shape is not None:
        least = smallest_bops(spec, shape)
        for i, budget in enumerate(spec.search.budgets_gbops):
            if budget * 1e9 < least:
                raise _below(f"search.budgets_gbops[{i}]", f"{budget} GBOPs", spec, "BOPs",
                             f"{least / 1e9:.4g} GBOPs on {'x'.join(map(str, shape))} images")
