"""Ray Tune + Optuna search over per-layer bit-widths under a size and/or BOPs budget, with Pareto fronts.

    run_search(space, cfg, out_dir=..., trainable=..., payload=...)   # Tune + Optuna (the stage: stages/search.py)
    pareto_table(run_dir, cost="size")       # the current front, against size or "bops" (works while it runs)

Pieces: `space` (bit-width choices and their exact byte and BOPs costs), `searcher` (OptunaSearch that skips
over-budget samples and tells Optuna about ASHA-stopped trials), `trial` (resumable QAT+KD trial),
`results` (tables from the study), `runner` (Tune, restore), `storage` (the study's journal file), `dashboard`,
`synthetic` (network-free trials for tests and benchmarks). The pipeline stage is `kdsearch.stages.search`.

Names are imported on first use (PEP 562), so `kdsearch pareto RUN_DIR` reads a table without importing
Ray Tune, and `python -m kdsearch.search.synthetic` runs without a half-imported module.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "results": ("LAUNCHED", "STATUSES", "pareto_table", "read_results", "read_summary", "search_dir"),
    "runner": ("make_scheduler", "max_concurrent_trials", "run_search"),
    "searcher": ("BudgetSearch", "make_sampler"),
    "space": ("SearchSpace", "build_space", "define_space", "uniform_configs", "warm_start_points"),
    "trial": ("QatPayload", "TrialRecord", "qat_trial", "run_trial"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
