"""Non-dominated sets and the hypervolume indicator, for the accuracy-vs-cost trade-off of the search.

Objectives are given as columns of a [N, M] array with a per-column direction (maximize or not).
Internally everything is turned into minimisation (maximised columns negated), the convention of
Deb et al. (2002, NSGA-II) for Pareto dominance and of Zitzler & Thiele (1999) for the hypervolume:
the Lebesgue measure of the objective-space region dominated by a set and bounded by a reference point.

The search reports the hypervolume of (accuracy %, cost) with the reference point (0 %, 1.1 x budget),
the cost being size in MB (a size budget is given) or BOPs in GBOPs (only a BOPs budget is given): every
feasible trial is inside it, and a trial sitting exactly on the budget still adds volume (the 1.1 x nadir
margin Optuna uses for its own reference points).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

ACC, SIZE = "val_acc", "size_mb"  # the search chooses on validation accuracy, never on test
BOPS = "gbops"  # 10^9 bit operations (kdsearch/quant/bops.py)
COST_COLUMNS = {"size": SIZE, "bops": BOPS}  # a cost's name -> its results column
COST_LABELS = {SIZE: "model size (MB = 10^6 bytes)", BOPS: "GBOPs (10^9 x MACs x weight bits x activation bits)"}
COST_UNITS = {SIZE: "MB", BOPS: "GBOPs"}
DIRECTIONS = (True, False)  # accuracy: maximise; size: minimise


def _as_min(points: np.ndarray | Sequence[Sequence[float]], maximize: Sequence[bool]) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"points must be a 2-d array [N, M] (got shape {pts.shape})")
    if pts.shape[1] != len(maximize):
        raise ValueError(f"points have {pts.shape[1]} objectives but {len(maximize)} directions were given")
    if not np.isfinite(pts).all():
        raise ValueError("points must be finite (drop unfinished trials first)")
    return pts * np.where(np.asarray(maximize, dtype=bool), -1.0, 1.0)


def non_dominated_mask(points: np.ndarray | Sequence[Sequence[float]],
                       maximize: Sequence[bool] = DIRECTIONS) -> np.ndarray:
    """Boolean mask of the points no other point dominates (<= in every objective, < in one).

    Duplicated points are all kept (neither dominates the other). O(N^2 M), fine for thousands of trials.
    """
    p = _as_min(points, maximize)
    if len(p) == 0:
        return np.zeros(0, dtype=bool)
    le = (p[:, None, :] <= p[None, :, :]).all(-1)  # le[j, i]: j is no worse than i everywhere
    lt = (p[:, None, :] < p[None, :, :]).any(-1)
    return ~(le & lt).any(0)


def hypervolume(points: np.ndarray | Sequence[Sequence[float]], reference: Sequence[float],
                maximize: Sequence[bool] = DIRECTIONS) -> float:
    """Hypervolume of two-objective `points` w.r.t. `reference` (given in the objectives' own directions).

    Points that do not strictly dominate the reference contribute nothing. Exact, O(N log N): sweep the
    front in increasing first (minimised) objective and add one rectangle per step.
    """
    if len(maximize) != 2:
        raise ValueError("hypervolume is implemented for two objectives (accuracy, size)")
    ref = _as_min(np.asarray([reference], dtype=np.float64), maximize)[0]
    p = _as_min(points, maximize) if len(points) else np.zeros((0, 2))
    p = p[(p < ref).all(1)]
    if len(p) == 0:
        return 0.0
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    volume, best_y = 0.0, ref[1]
    for x, y in p:
        if y < best_y:  # this point adds the slab [x, ref_x] x [y, best_y) that no earlier point covers
            volume += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(volume)


def hypervolume_history(points: np.ndarray | Sequence[Sequence[float]], reference: Sequence[float],
                        maximize: Sequence[bool] = DIRECTIONS) -> list[float]:
    """Hypervolume after each prefix of `points` (the order in which trials completed)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, len(maximize))
    return [hypervolume(pts[: k + 1], reference, maximize) for k in range(len(pts))]


def reference_point(budget: float) -> tuple[float, float]:
    """(accuracy 0 %, 1.1 x budget, in the cost's unit): the search's hypervolume reference."""
    return 0.0, 1.1 * float(budget)


def pareto_front(df: pd.DataFrame, acc: str = ACC, size: str = SIZE) -> pd.DataFrame:
    """The rows of `df` on the accuracy-max / cost-min front, sorted by cost (rows with NaN are skipped); `size` is the
    cost column (`SIZE`, or `BOPS` for the front in bit operations)."""
    ok = df[[acc, size]].notna().all(1)
    sub = df[ok]
    if sub.empty:
        return sub.copy()
    mask = non_dominated_mask(sub[[acc, size]].to_numpy(), DIRECTIONS)
    return sub[mask].sort_values([size, acc], ascending=[True, False]).reset_index(drop=True)
