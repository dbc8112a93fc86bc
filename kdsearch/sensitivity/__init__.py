"""Layer-wise sensitivity analysis and the priors it gives the bit-width search.

    table, timings = sensitivity_table(model, images, labels, {layer: [8, 4, 2], ...})   # measure
    fixed, costs = layer_byte_costs(model, {layer: [8, 4, 2], ...})                       # exact bytes
    sensitivity_stage(spec, ctx)   # runs/<name>/sensitivity/{sensitivity.parquet, priors.json, sensitivity.png}
"""

from .costs import check_costs, layer_byte_costs, layer_names, resolve_pins
from .measure import fake_quant_weight, hutchinson_mean_traces, omega_kl, sensitivity_table
from .priors import METRIC_COLUMNS, budget_grid, excluded_choices, layer_choices, metric_column, warm_starts
from .stage import (
    build_priors,
    calibration_indices,
    float_student_path,
    load_priors,
    plot_sensitivity,
    sensitivity_dir,
    sensitivity_stage,
)

__all__ = [
    "METRIC_COLUMNS",
    "budget_grid",
    "build_priors",
    "calibration_indices",
    "check_costs",
    "excluded_choices",
    "fake_quant_weight",
    "float_student_path",
    "hutchinson_mean_traces",
    "layer_byte_costs",
    "layer_choices",
    "layer_names",
    "load_priors",
    "metric_column",
    "omega_kl",
    "plot_sensitivity",
    "resolve_pins",
    "sensitivity_dir",
    "sensitivity_stage",
    "sensitivity_table",
    "warm_starts",
]
