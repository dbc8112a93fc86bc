"""The priors the sensitivity table gives the bit-width search.

(a) Warm starts: the exact minimum-sensitivity allocation (``kdsearch.allocate``) for each of the spec's
    budgets and for a few budgets around each (``sensitivity.budgets_around`` multiples), so the sampler
    starts from configurations that already respect the table. Size budgets solve on the table's bytes,
    BOPs budgets (``warm_starts_bops``) on its BOPs.
(b) Exclusions: (layer, bits) pairs whose sensitivity exceeds ``sensitivity.exclude_above`` are never
    offered to that layer. A layer always keeps its least sensitive choice, so the space stays non-empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..allocate import min_total_bytes, solve_allocations

METRIC_COLUMNS = {"kl": "omega_kl", "hessian": "omega_hessian"}


def metric_column(metric: str) -> str:
    """The table column of a spec's ``sensitivity.metric`` ("kl" -> "omega_kl", ...)."""
    try:
        return METRIC_COLUMNS[metric]
    except KeyError:
        raise ValueError(f"sensitivity.metric must be one of {sorted(METRIC_COLUMNS)}, got {metric!r}") from None


def excluded_choices(
    table: pd.DataFrame, threshold: float | None, metric: str = "omega_kl", pinned: Mapping[str, int] | None = None
) -> dict[str, list[int]]:
    """{layer: [bits whose ``metric`` > threshold]}; never the layer's least sensitive width, never pinned layers.

    ``metric`` is a table column ("omega_kl"/"omega_hessian") or a spec metric name ("kl"/"hessian").
    """
    if threshold is None:
        return {}
    col = METRIC_COLUMNS.get(metric, metric)
    out: dict[str, list[int]] = {}
    for name, rows in table.groupby("layer", sort=False):
        if name in (pinned or {}):
            continue
        safest = int(rows.sort_values([col, "bits"], ascending=[True, False])["bits"].iloc[0])
        bad = sorted((int(b) for b, v in zip(rows["bits"], rows[col]) if v > threshold and int(b) != safest),
                     reverse=True)
        if bad:
            out[str(name)] = bad
    return out


def layer_choices(
    names: Sequence[str], bits: Sequence[int], pinned: Mapping[str, int], excluded: Mapping[str, Sequence[int]]
) -> dict[str, list[int]]:
    """The search space per layer: its pinned width, or the spec's widths minus the excluded ones."""
    return {n: [pinned[n]] if n in pinned else [b for b in bits if b not in set(excluded.get(n, ()))] for n in names}


def _mb_to_bytes(mb: float, scale: float = 1e6) -> int:
    return int(round(mb * scale, 6))  # MB = 1e6 bytes (GBOPs = 1e9 BOPs); round off float noise


def budget_grid(budgets_mb: Sequence[float], around: Sequence[float], scale: float = 1e6) -> list[dict[str, float]]:
    """Each spec budget (multiple 1.0) followed by its ``around`` multiples, in that order (``budget_bytes`` =
    budget x ``scale``: 1e9 turns GBOPs budgets into BOPs).

    Every distinct spec budget keeps its own multiple-1.0 row, even when its size coincides with another
    budget or with another budget's multiple: that row is where the report and finalize look up the
    budget's solver start (by ``base_budget_mb`` and ``multiple == 1.0``). Only ``around`` rows whose size
    is already in the grid (a spec budget's, or an earlier row's) are dropped: they would add nothing.
    """
    bases = list(dict.fromkeys(float(b) for b in budgets_mb))
    out, seen = [], {_mb_to_bytes(b, scale) for b in bases}
    for base in bases:
        out.append({"base_budget_mb": base, "multiple": 1.0, "budget_bytes": _mb_to_bytes(base, scale)})
        for mult in around:
            budget_bytes = _mb_to_bytes(base * mult, scale)
            if budget_bytes not in seen:
                seen.add(budget_bytes)
                out.append({"base_budget_mb": base, "multiple": float(mult), "budget_bytes": budget_bytes})
    return out


# Record keys per cost: spec budget, budget in the cost's integer unit and in the spec's unit, the total likewise.
_KEYS = {"bytes": ("base_budget_mb", "budget_bytes", "budget_mb", "total_bytes", "total_mb", 1e6),
         "bops": ("base_budget_gbops", "budget_bops", "budget_gbops", "total_bops", "gbops", 1e9)}


def _solve_grid(table: pd.DataFrame, fixed: int, budgets: Sequence[float], around: Sequence[float], metric: str,
                pinned: Mapping[str, int] | None, excluded: Mapping[str, Sequence[int]] | None,
                cost: str) -> list[dict[str, Any]]:
    base, budget, budget_u, total, total_u, scale = _KEYS[cost]
    col = METRIC_COLUMNS.get(metric, metric)
    grid = [{base: g["base_budget_mb"], "multiple": g["multiple"], budget: g["budget_bytes"]}
            for g in budget_grid(budgets, around, scale)]
    allocs = solve_allocations(table, [g[budget] for g in grid], fixed, pinned, metric=col, excluded=excluded,
                               cost=cost)
    smallest = min_total_bytes(table, fixed, pinned, excluded, cost=cost)
    out = []
    for g, alloc in zip(grid, allocs):
        rec: dict[str, Any] = {**g, budget_u: g[budget] / scale, "metric": col}
        if alloc is None:
            rec.update({"feasible": False, "bit_config": None, total: None, "objective": None,
                        "reason": f"smallest allowed allocation is {smallest} {'BOPs' if cost == 'bops' else cost}"})
        else:
            rec.update({"feasible": True, "bit_config": alloc.bit_config.to_dict(), total: alloc.total_bytes,
                        total_u: alloc.total_bytes / scale, "objective": alloc.objective})
        out.append(rec)
    return out


def warm_starts(
    table: pd.DataFrame,
    fixed_bytes: int,
    budgets_mb: Sequence[float],
    around: Sequence[float] = (),
    *,
    metric: str = "omega_kl",
    pinned: Mapping[str, int] | None = None,
    excluded: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """One record per budget: the solver's ``bit_config`` (a dict, or None when infeasible) and its size."""
    return _solve_grid(table, fixed_bytes, budgets_mb, around, metric, pinned, excluded, "bytes")


def warm_starts_bops(
    table: pd.DataFrame,
    budgets_gbops: Sequence[float],
    around: Sequence[float] = (),
    *,
    metric: str = "omega_kl",
    pinned: Mapping[str, int] | None = None,
    excluded: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """``warm_starts`` for BOPs budgets (GBOPs): the same exact solver on the table's ``bops`` column (BOPs have
    no fixed part). Records name ``base_budget_gbops`` and ``budget_bops``, ``total_bops``, ``gbops``."""
    return _solve_grid(table, 0, budgets_gbops, around, metric, pinned, excluded, "bops")
