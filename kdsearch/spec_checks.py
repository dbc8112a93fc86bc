"""Spec checks that need the student architecture (cheap: the model is built, never run).

`kdsearch.spec` validates the YAML on its own; these rules also need the layer inventory and the size
model, e.g. a size budget below the smallest size the student can reach with the allowed bit-widths.
They run before any compute, and fail as a `SpecError` naming the field.
"""

from __future__ import annotations

from .spec import Spec, SpecError


def smallest_size_bytes(spec: Spec) -> int:
    """model_size of the student with every free layer at the lowest allowed bits and pins applied."""
    from .models import create_model
    from .quant import BitConfig, model_size
    from .sensitivity.costs import layer_names, resolve_pins

    model = create_model(spec.student.arch, num_classes=spec.data.classes or 10)
    try:
        pins = resolve_pins(layer_names(model), spec.quant.pin)
    except ValueError as err:
        raise SpecError("quant.pin", str(err).removeprefix("quant.pin: ")) from None
    cfg = BitConfig.uniform(model, min(spec.quant.bits)).updated(pins)
    return model_size(model, cfg, act_bits=spec.quant.act_bits).total_bytes


def check_spec(spec: Spec) -> None:
    smallest = smallest_size_bytes(spec)
    for i, budget in enumerate(spec.search.budgets_mb):
        if budget * 1e6 < smallest:
            raise SpecError(
                f"search.budgets_mb[{i}]",
                f"{budget} MB is below the smallest size {spec.student.arch} can reach with bits "
                f"{list(spec.quant.bits)} and pins {spec.quant.pin} ({smallest / 1e6:.4g} MB); raise the budget, "
                "allow fewer bits or pin fewer layers",
            )
