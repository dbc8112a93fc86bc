"""The names of the registered ensemble strategies, known without importing torch.

Why a static list: a spec's `distill.strategy` and `kdsearch train --distill` are checked before anything else,
and the registry (`kdsearch.distill.strategies`) needs torch. `tests/test_distill.py::
test_the_spec_offers_exactly_the_registered_strategies` keeps this list equal to `list_strategies()`: add a new
strategy's name here when you register it. The first name is the default: the seed's dynamic weighting. On
real images (benchmarks/results/kd_ablation.md) validation cannot tell the KD strategies apart (every paired
difference is inside its spread), so the ablation gives no validation-chosen reason to change it.
"""

from __future__ import annotations

STRATEGY_NAMES: tuple[str, ...] = ("dynamic", "average", "vote", "entropy", "dynamic_ka")
DEFAULT_STRATEGY = STRATEGY_NAMES[0]
