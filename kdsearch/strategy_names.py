"""The names of the registered ensemble strategies, known without importing torch.

Why a static list: a spec's `distill.strategy` and `kdsearch train --distill` are checked before anything else,
and the registry (`kdsearch.distill.strategies`) needs torch. `tests/test_distill.py::
test_the_spec_offers_exactly_the_registered_strategies` keeps this list equal to `list_strategies()`: add a new
strategy's name here when you register it. The first name is the default (the measured best on real images,
benchmarks/results/kd_ablation.md).
"""

from __future__ import annotations

STRATEGY_NAMES: tuple[str, ...] = ("average", "vote", "dynamic", "entropy", "dynamic_ka")
DEFAULT_STRATEGY = STRATEGY_NAMES[0]
