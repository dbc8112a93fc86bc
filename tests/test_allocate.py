"""The exact bit-allocation solver against brute force, and its budget accounting."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsearch.allocate import (
    AllocationInfeasible,
    min_total_bytes,
    pareto_front,
    solve_allocation,
    solve_allocations,
    solve_choices,
)


def brute_force(costs, values, capacity):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[g][i] for g, i in enumerate(combo))
        value = sum(values[g][i] for g, i in enumerate(combo))
        if cost <= capacity and (best is None or value < best[1]):
            best = (cost, value)
    return best


@st.composite
def instances(draw):
    groups = draw(st.integers(1, 5))
    costs, values = [], []
    for _ in range(groups):
        k = draw(st.integers(1, 4))
        costs.append(draw(st.lists(st.integers(0, 60), min_size=k, max_size=k)))
        values.append(draw(st.lists(st.floats(-5, 50, allow_nan=False, width=32), min_size=k, max_size=k)))
    capacity = draw(st.integers(-5, 250))
    return costs, values, capacity


@settings(max_examples=300, deadline=None, derandomize=True)
@given(instances())
def test_solver_matches_brute_force(inst):
    costs, values, capacity = inst
    got = solve_choices(costs, values, capacity)
    want = brute_force(costs, values, capacity)
    assert (got is None) == (want is None)
    if got is not None:
        choices, cost, value = got
        assert cost == sum(costs[g][i] for g, i in enumerate(choices)) <= capacity  # budget respected exactly
        assert value == pytest.approx(sum(values[g][i] for g, i in enumerate(choices)), abs=1e-9)
        assert value == pytest.approx(want[1], abs=1e-6)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(instances())
def test_front_answers_every_budget(inst):
    costs, values, _ = inst
    front = pareto_front(costs, values)
    assert list(front.cost) == sorted(front.cost)
    assert all(a > b for a, b in zip(front.value, front.value[1:]))  # strictly improving with more bytes
    for capacity in range(0, 250, 17):
        want = brute_force(costs, values, capacity)
        i = front.best_within(capacity)
        assert (i is None) == (want is None)
        if i is not None:
            assert front.value[i] == pytest.approx(want[1], abs=1e-6)


def _table():
    # three layers; bits 8/4/2; bytes grow with bits; layer b is very sensitive at 2 bits
    rows = []
    spec = {"a": (100, [0.0, 0.1, 0.5]), "b": (40, [0.0, 0.2, 9.0]), "c": (10, [0.0, 0.3, 0.4])}
    for layer, (numel, omegas) in spec.items():
        for bits, om in zip((8, 4, 2), omegas):
            rows.append({"layer": layer, "bits": bits, "bytes": numel * bits // 8 + 4, "omega_kl": om,
                         "omega_hessian": -om})
    return pd.DataFrame(rows)


def test_solve_allocation_budget_pins_and_exclusions():
    t = _table()
    fixed = 1000
    # all 8-bit: 104 + 44 + 14 = 162 bytes of layers
    assert dict(solve_allocation(t, fixed + 162, fixed)) == {"a": 8, "b": 8, "c": 8}
    cfg = solve_allocation(t, fixed + 100, fixed)
    cost = {(r.layer, r.bits): r.bytes for r in t.itertuples()}
    assert fixed + sum(cost[(n, b)] for n, b in cfg.items()) <= fixed + 100
    # exact optimum by brute force over the same table
    best = min(
        (combo for combo in itertools.product((8, 4, 2), repeat=3)
         if sum(cost[(n, b)] for n, b in zip("abc", combo)) <= 100),
        key=lambda combo: sum(t.set_index(["layer", "bits"]).loc[(n, b), "omega_kl"] for n, b in zip("abc", combo)),
    )
    assert tuple(cfg.values()) == best
    assert list(cfg) == ["a", "b", "c"]  # table order
    # pinned layer keeps its bits even when dropping it would be cheaper
    pinned = solve_allocation(t, fixed + 130, fixed, {"a": 8})  # a at 8 (104) leaves 26 for b and c
    assert pinned["a"] == 8
    # excluded choices are never taken
    ex = solve_allocation(t, fixed + 60, fixed, excluded={"b": [2]})
    assert ex["b"] != 2
    # another metric column
    hes = solve_allocation(t, fixed + 162, fixed, metric="omega_hessian")
    assert dict(hes) == {"a": 2, "b": 2, "c": 2}  # negative "sensitivity" rewards the fewest bits


def test_infeasible_budget_is_a_clear_error():
    t = _table()
    smallest = min_total_bytes(t, 1000)
    assert smallest == 1000 + (25 + 4) + (10 + 4) + (2 + 4)
    assert dict(solve_allocation(t, smallest, 1000)) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(AllocationInfeasible, match="infeasible.*smallest allowed allocation takes 1049 bytes"):
        solve_allocation(t, smallest - 1, 1000)
    allocs = solve_allocations(t, [smallest - 1, smallest, 2000], 1000)
    assert allocs[0] is None and allocs[1].total_bytes == smallest and allocs[2].total_bytes == 1162


def test_bad_tables_are_rejected():
    t = _table()
    with pytest.raises(ValueError, match="lacks column"):
        solve_allocation(t.drop(columns="bytes"), 2000, 0)
    with pytest.raises(ValueError, match="pinned to 16 bits"):
        solve_allocation(t, 2000, 0, {"a": 16})
    with pytest.raises(ValueError, match="every bit-width is excluded"):
        solve_allocation(t, 2000, 0, excluded={"c": [8, 4, 2]})
    with pytest.raises(ValueError, match="finite"):
        solve_choices([[1, 2]], [[0.0, float("nan")]], 5)
