"""Layer-wise sensitivity analysis and the priors it gives the bit-width search.

    table, timings = sensitivity_table(model, images, labels, {layer: [8, 4, 2], ...})   # measure
    fixed, costs = layer_byte_costs(model, {layer: [8, 4, 2], ...})                       # exact bytes
    compute_table(spec, model, device); build_priors(...)   # what the sensitivity stage writes
"""

from .costs import check_costs, layer_byte_costs, layer_names, resolve_pins
from .measure import fake_quant_weight, hutchinson_mean_traces, omega_kl, sensitivity_table
from .priors import METRIC_COLUMNS, budget_grid, excluded_choices, layer_choices, metric_column, warm_starts
from .analysis import build_priors, calibration_indices, compute_table, load_priors, plot_sensitivity, table_key

__all__ = [
    "METRIC_COLUMNS",
    "budget_grid",
    "build_priors",
    "calibration_indices",
    "check_costs",
    "compute_table",
    "excluded_choices",
    "fake_quant_weight",
    "hutchinson_mean_traces",
    "layer_byte_costs",
    "layer_choices",
    "layer_names",
    "load_priors",
    "metric_column",
    "omega_kl",
    "plot_sensitivity",
    "resolve_pins",
    "sensitivity_table",
    "table_key",
    "warm_starts",
]
