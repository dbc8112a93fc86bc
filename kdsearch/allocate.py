"""The exact bit-allocation solver: minimise summed layer sensitivity subject to a size (or BOPs) budget.

Choosing one bit-width per layer so that the total size stays under a budget while the summed
sensitivity (HAWQ-V2, Dong et al. 2020, sec. 3.2: Omega = sum_l Omega_l(b_l)) is smallest is a
*multiple-choice knapsack*: one item per group (layer), integer weights (bytes), real values.

Why an exact Pareto dynamic programme and not a greedy or an ILP:

* a greedy "downgrade the least sensitive byte first" is not optimal on discrete choices, and the
  exact answer is cheap here (tens of layers, a handful of bit-widths);
* a dense DP over every byte of capacity needs O(layers x budget bytes) memory (hundreds of MB for a
  ResNet-18 budget); a MILP solver is exact only up to its tolerances, which matter when sensitivities
  at high bit-widths are ~1e-7;
* the sparse DP keeps, layer after layer, only the non-dominated (bytes, sensitivity) partial
  allocations -- at most one per distinct byte count, usually far fewer -- and answers *every* budget
  from one pass (the warm starts ask for several budgets around the spec's).

Byte costs must be exact integers taken from the size model (``kdsearch.quant.model_size``, see
``kdsearch.sensitivity.costs``) so that ``fixed_bytes + sum(cost) <= budget`` here is the same
inequality that the search and the export check. Any other additive integer cost solves the same way:
``cost="bops"`` reads a table column of exact per-(layer, bits) BOPs (``kdsearch.quant.bops``, fixed 0).
One cost per solve: with a size and a BOPs budget together, the search drops a warm start solved for one
that breaks the other (``kdsearch.search.space.warm_start_points``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .quant import BitConfig


class AllocationInfeasible(ValueError):
    """The budget is below the smallest size any allowed allocation reaches."""


@dataclass(frozen=True)
class ParetoFront:
    """All non-dominated allocations: ``cost`` ascending, ``value`` strictly descending.

    ``choice(i)`` recovers allocation i (one choice index per group) through the stored back-pointers.
    """

    cost: np.ndarray  # int64 [F]
    value: np.ndarray  # float64 [F]
    _parents: tuple[np.ndarray, ...]  # per group: index of the previous group's state
    _choices: tuple[np.ndarray, ...]  # per group: the choice taken in this group

    def __len__(self) -> int:
        return int(self.cost.shape[0])

    def best_within(self, capacity: int) -> int | None:
        """Index of the lowest-value allocation with cost <= capacity (None if there is none)."""
        i = int(np.searchsorted(self.cost, capacity, side="right")) - 1
        return i if i >= 0 else None

    def choice(self, index: int) -> list[int]:
        out = [0] * len(self._choices)
        for g in range(len(self._choices) - 1, -1, -1):
            out[g] = int(self._choices[g][index])
            index = int(self._parents[g][index])
        return out


def pareto_front(
    costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int | None = None
) -> ParetoFront:
    """Exact multiple-choice knapsack front (one choice per group) over integer ``costs``.

    States that cannot fit ``capacity`` even with the cheapest choices in every remaining group are
    dropped early (exact: they can never become feasible). Ties in value keep the cheaper state.
    """
    if len(costs) != len(values) or not costs:
        raise ValueError("costs and values must be non-empty and have one entry per group")
    cs = [np.asarray(c, dtype=np.int64) for c in costs]
    vs = [np.asarray(v, dtype=np.float64) for v in values]
    for g, (c, v) in enumerate(zip(cs, vs)):
        if c.ndim != 1 or c.shape != v.shape or c.size == 0:
            raise ValueError(f"group {g}: costs and values must be equal-length, non-empty 1-d lists")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"group {g}: values must be finite (got {v.tolist()})")
    rest_min = np.concatenate([np.cumsum([c.min() for c in cs][::-1])[::-1], [0]])
    cap = np.iinfo(np.int64).max if capacity is None else int(capacity)

    cost, value = np.zeros(1, np.int64), np.zeros(1, np.float64)
    parents, choices = [], []
    for g, (c, v) in enumerate(zip(cs, vs)):
        k = c.size
        cand_cost = (cost[:, None] + c[None, :]).ravel()
        cand_val = (value[:, None] + v[None, :]).ravel()
        parent = np.repeat(np.arange(cost.size), k)
        choice = np.tile(np.arange(k), cost.size)
        fits = cand_cost + rest_min[g + 1] <= cap
        cand_cost, cand_val, parent, choice = cand_cost[fits], cand_val[fits], parent[fits], choice[fits]
        order = np.lexsort((cand_val, cand_cost))  # by cost, then value
        cand_cost, cand_val, parent, choice = cand_cost[order], cand_val[order], parent[order], choice[order]
        if cand_cost.size:
            best_before = np.minimum.accumulate(cand_val)
            keep = np.ones(cand_cost.size, dtype=bool)
            keep[1:] = cand_val[1:] < best_before[:-1]  # strictly better than everything cheaper or equal
            cand_cost, cand_val, parent, choice = cand_cost[keep], cand_val[keep], parent[keep], choice[keep]
        cost, value = cand_cost, cand_val
        parents.append(parent.astype(np.int64))
        choices.append(choice.astype(np.int16))
    return ParetoFront(cost, value, tuple(parents), tuple(choices))


def solve_choices(
    costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int
) -> tuple[list[int], int, float] | None:
    """One choice index per group minimising the summed value with summed cost <= capacity.

    Returns (choices, cost, value), or None when even the cheapest choices exceed ``capacity``.
    """
    front = pareto_front(costs, values, capacity)
    i = front.best_within(capacity)
    if i is None:
        return None
    return front.choice(i), int(front.cost[i]), float(front.value[i])


@dataclass(frozen=True)
class Allocation:
    """A solved allocation: the full ``BitConfig`` (pinned layers included) and its accounting."""

    bit_config: BitConfig
    budget_bytes: int  # (BOPs when solved with cost="bops")
    total_bytes: int  # fixed_bytes + the chosen layers' bytes (pinned layers included), or BOPs
    objective: float  # summed sensitivity of the chosen (layer, bits), pinned layers included


REQUIRED_COLUMNS = ("layer", "bits", "bytes")


def _groups(
    table: pd.DataFrame,
    metric: str,
    pinned: Mapping[str, int] | None,
    excluded: Mapping[str, Sequence[int]] | None,
    cost: str = "bytes",
) -> tuple[list[str], list[list[int]], list[list[int]], list[list[float]]]:
    """Per layer (table order): the allowed bit-widths, their `cost` column's costs and their sensitivities."""
    missing = [c for c in (*REQUIRED_COLUMNS, cost, metric) if c not in table.columns]
    if missing:
        raise ValueError(f"sensitivity table lacks column(s) {missing}")
    pinned = dict(pinned or {})
    excluded = {k: set(int(b) for b in v) for k, v in (excluded or {}).items()}
    layers = list(dict.fromkeys(table["layer"]))
    unknown = [n for n in pinned if n not in layers]
    if unknown:
        raise ValueError(f"pinned layer(s) {unknown} are not in the sensitivity table")
    bits_g, costs_g, values_g = [], [], []
    for name, rows in table.groupby("layer", sort=False):
        rows = rows.sort_values("bits", ascending=False)
        if name in pinned:
            rows = rows[rows["bits"] == pinned[name]]
            if rows.empty:
                raise ValueError(f"layer {name!r} is pinned to {pinned[name]} bits but the table has no such row")
        else:
            rows = rows[~rows["bits"].isin(excluded.get(name, set()))]
            if rows.empty:
                raise ValueError(f"layer {name!r}: every bit-width is excluded; raise sensitivity.exclude_above")
        if rows["bits"].duplicated().any():
            raise ValueError(f"layer {name!r} has duplicate rows for one bit-width")
        bits_g.append([int(b) for b in rows["bits"]])
        costs_g.append([int(c) for c in rows[cost]])
        values_g.append([float(v) for v in rows[metric]])
    return layers, bits_g, costs_g, values_g  # groupby(sort=False) keeps first-appearance (table) order


def solve_allocations(
    table: pd.DataFrame,
    budgets_bytes: Sequence[int],
    fixed_bytes: int,
    pinned: Mapping[str, int] | None = None,
    *,
    metric: str = "omega_kl",
    excluded: Mapping[str, Sequence[int]] | None = None,
    cost: str = "bytes",
) -> list[Allocation | None]:
    """The exact optimum for each budget from one DP pass; None where a budget is infeasible.

    ``table``: one row per (layer, bits) with columns layer, bits, bytes (the layer's exact bytes at
    that width) and ``metric``; layers in table order. ``fixed_bytes``: everything that does not depend
    on the choices (BN, biases, ...). Pinned layers keep their bits; ``excluded`` bit-widths are never
    chosen for their layer. ``cost="bops"``: budgets, ``fixed_bytes`` and the ``Allocation``'s totals are
    BOPs read from the table's ``bops`` column instead of bytes.
    """
    if not budgets_bytes:
        return []
    layers, bits_g, costs_g, values_g = _groups(table, metric, pinned, excluded, cost)
    front = pareto_front(costs_g, values_g, max(int(b) for b in budgets_bytes) - int(fixed_bytes))
    out: list[Allocation | None] = []
    for budget in budgets_bytes:
        i = front.best_within(int(budget) - int(fixed_bytes))
        if i is None:
            out.append(None)
            continue
        picks = front.choice(i)
        cfg = BitConfig({n: bits_g[g][picks[g]] for g, n in enumerate(layers)})
        out.append(Allocation(cfg, int(budget), int(fixed_bytes) + int(front.cost[i]), float(front.value[i])))
    return out


def min_total_bytes(
    table: pd.DataFrame,
    fixed_bytes: int,
    pinned: Mapping[str, int] | None = None,
    excluded: Mapping[str, Sequence[int]] | None = None,
    cost: str = "bytes",
) -> int:
    """The smallest reachable size (or `cost`): every free layer at its cheapest allowed width, pinned layers as
    pinned."""
    _, _, costs_g, _ = _groups(table, cost, pinned, excluded, cost)
    return int(fixed_bytes) + sum(min(c) for c in costs_g)


def solve_allocation(
    table: pd.DataFrame,
    budget_bytes: int,
    fixed_bytes: int,
    pinned: Mapping[str, int] | None = None,
    *,
    metric: str = "omega_kl",
    excluded: Mapping[str, Sequence[int]] | None = None,
) -> BitConfig:
    """The ``BitConfig`` minimising summed ``metric`` with total size <= ``budget_bytes`` (exact).

    Raises ``AllocationInfeasible`` (naming the smallest reachable size) when no allocation fits.
    """
    (alloc,) = solve_allocations(table, [budget_bytes], fixed_bytes, pinned, metric=metric, excluded=excluded)
    if alloc is None:
        smallest = min_total_bytes(table, fixed_bytes, pinned, excluded)
        raise AllocationInfeasible(
            f"budget of {budget_bytes} bytes ({budget_bytes / 1e6:.6f} MB) is infeasible: the smallest allowed "
            f"allocation takes {smallest} bytes ({smallest / 1e6:.6f} MB); raise the budget, allow lower "
            "bit-widths or pin fewer layers"
        )
    return alloc.bit_config
