"""The search's tables, rebuilt from the Optuna study (at most once a second, and at every experiment snapshot),
and read back by `kdsearch pareto`.

The study is the one record of the search: every sample the sampler made (trained or not) is an Optuna
trial, and the searcher stores what Tune reported on it as user attributes. Because the study a restore
reads is the one of the snapshot Tune restores (`storage`), the tables rebuilt from it after a restore hold
exactly the restored search (no stale rows from work lost in a crash).

Files in runs/<name>/search/ (all written atomically, readable while the search runs):
  results.parquet  one row per sample: number, trial_id, status, bits.<layer>..., size_mb, gbops, avg_bits,
                   acc, epochs, wall_s, epoch_s, hypervolume (after this trial completed, else NaN)
  pareto.parquet   the completed trials on the accuracy-max / cost-min front (the search's cost: size when a
                   size budget is given, else BOPs; `pareto_table(..., cost=)` gives the other front)
  summary.json     counts per status, the hypervolume, the cost, the budgets and the reference point

Statuses: running (launched, not finished), completed (all trial epochs), pruned (stopped early by
ASHA; told to Optuna as PRUNED), error (failed after its retries), infeasible (over the size budget,
never launched), duplicate (a configuration already evaluated; told the known result, never launched),
retried (an error that a restore resumed: its outcome is the row whose `retry_of` names it).
`search.num_trials` counts launched trials: running + completed + pruned + error (a retried error
counts once, as its resumed copy).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_to_parquet, atomic_write_json
from ..pareto import ACC, BOPS, COST_COLUMNS, SIZE, hypervolume, pareto_front, reference_point

LAUNCHED = ("running", "completed", "pruned", "error")
STATUSES = (*LAUNCHED, "infeasible", "duplicate", "retried")
BASE_COLUMNS = ["number", "trial_id", "status", SIZE, BOPS, "avg_bits", ACC, "epochs", "wall_s", "epoch_s",
                "finished_seq", "retry_of"]


class CostUnavailable(LookupError):
    """The results hold no column for the asked cost (a search from before BOPs were recorded)."""


def search_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "search"


class HypervolumeHistory:
    """`hypervolume_history` that remembers: trials complete in `finished_seq` order and only ever append to that
    sequence, so the history of the points it saw last time is kept and only new prefixes are computed (a table
    rebuild costs O(n) hypervolumes of new points instead of n of them: 0.45 s at 1,000 completed trials)."""

    def __init__(self, reference: tuple[float, float]) -> None:
        self.reference = reference
        self._points = np.zeros((0, 2))
        self._values: list[float] = []

    def __call__(self, points: np.ndarray) -> list[float]:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        k = len(self._points)
        if k > len(pts) or not np.array_equal(pts[:k], self._points):  # not an extension: start over
            k, self._values = 0, []
        self._values = self._values[:k] + [hypervolume(pts[: i + 1], self.reference) for i in range(k, len(pts))]
        self._points = pts.copy()
        return list(self._values)


def study_frame(study: Any, layers: list[str] | tuple[str, ...], budget: float,
                history: HypervolumeHistory | None = None, cost: str = SIZE) -> pd.DataFrame:
    """One row per Optuna trial of `study`, in sample order, with the hypervolume of (accuracy, `cost` column)
    after each completion (`budget` in the cost's unit; `history`: a HypervolumeHistory kept between rebuilds
    of the same study)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":  # an enqueued warm start not sampled yet
            continue
        a = t.user_attrs
        status = a.get("status") or ("running" if t.state.name == "RUNNING" else t.state.name.lower())
        row: dict[str, Any] = {
            "number": t.number, "trial_id": a.get("trial_id", ""), "status": status,
            SIZE: a.get(SIZE, math.nan), BOPS: a.get(BOPS, math.nan), "avg_bits": a.get("avg_bits", math.nan),
            ACC: a.get(ACC, math.nan),
            "epochs": int(a.get("epoch", 0)), "wall_s": a.get("wall_s", math.nan),
            "epoch_s": a.get("epoch_s", math.nan), "finished_seq": a.get("finished_seq", -1),
            "retry_of": a.get("retry_of", -1),
        }
        bits = a.get("bits", {})
        row.update({f"bits.{n}": bits.get(n, -1) for n in layers})
        rows.append(row)
    retried = {t.user_attrs["retry_of"] for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}
    for row in rows:  # an errored trial resumed by a restore: its outcome is on the copy that names it
        if row["number"] in retried:
            row["status"] = "retried"
    df = pd.DataFrame(rows, columns=BASE_COLUMNS + [f"bits.{n}" for n in layers])
    df = df.astype({"number": "int64", "epochs": "int64", "finished_seq": "int64", "retry_of": "int64",
                    **{f"bits.{n}": "int64" for n in layers}})
    df["hypervolume"] = np.nan
    done = df[df["status"] == "completed"].sort_values("finished_seq")
    if len(done):
        history = history or HypervolumeHistory(reference_point(budget))
        df.loc[done.index, "hypervolume"] = history(done[[ACC, cost]].to_numpy())
    return df


def summarize(df: pd.DataFrame, budget_mb: float | None, budget_gbops: float | None = None) -> dict[str, Any]:
    """The search's counts and hypervolume; its cost is size when `budget_mb` is given, else BOPs."""
    cost, budget = (SIZE, budget_mb) if budget_mb is not None else (BOPS, budget_gbops)
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES}
    done = df[df["status"] == "completed"]
    hv = hypervolume(done[[ACC, cost]].to_numpy(), reference_point(budget)) if len(done) else 0.0
    return {"samples": int(len(df)), "launched": int(sum(counts[s] for s in LAUNCHED)), "counts": counts,
            "hypervolume": hv, "cost": cost, "budget_mb": budget_mb, "budget_gbops": budget_gbops,
            "reference_point": list(reference_point(budget)),
            "front": int(len(pareto_front(done, size=cost))) if len(done) else 0,
            "best_acc": float(done[ACC].max()) if len(done) else None, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}


class ResultsWriter:
    """Rewrites results.parquet, pareto.parquet and summary.json from the study (driver side, atomic).

    Held by the searcher, so it is pickled into Tune's experiment snapshot: it keeps only plain data (the
    hypervolume history and the clocks are rebuilt after unpickling).

    Unforced writes are spaced by `min_interval_s`, or by `COST_RATIO` times what the last write took when
    that is longer: rebuilding grows with the study, and must not take over the driver of a long search.
    """

    COST_RATIO = 20.0  # unforced writes take at most ~5 % of the driver's time

    budget_gbops: float | None = None  # class default: a writer pickled before BOPs existed

    def __init__(self, out_dir: str | Path, layers: tuple[str, ...], budget_mb: float | None,
                 min_interval_s: float = 1.0, *, budget_gbops: float | None = None):
        if budget_mb is None and budget_gbops is None:
            raise ValueError("ResultsWriter: give budget_mb, budget_gbops or both")
        self.out_dir = str(out_dir)
        self.layers = tuple(layers)
        self.budget_mb = None if budget_mb is None else float(budget_mb)
        self.budget_gbops = None if budget_gbops is None else float(budget_gbops)
        self.min_interval_s = float(min_interval_s)
        self._fresh()

    @property
    def cost(self) -> str:
        """The search's cost column: size when a size budget is given, else BOPs (the searcher's rule)."""
        return SIZE if self.budget_mb is not None else BOPS

    @property
    def budget(self) -> float:
        return float(self.budget_mb if self.budget_mb is not None else self.budget_gbops)  # type: ignore[arg-type]

    def _fresh(self) -> None:
        self._last, self._cost = 0.0, 0.0
        self._history = HypervolumeHistory(reference_point(self.budget))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_last", "_cost", "_history")}

    def __setstate__(self, state: dict[str, Any]) -> None:  # restored in another process: clocks differ
        self.__dict__.update(state)
        self._fresh()

    def write(self, study: Any, force: bool = True) -> pd.DataFrame | None:
        """Rebuild the files; unforced (per-epoch results) only when the spacing above has passed."""
        now = time.monotonic()
        if not force and now - self._last < max(self.min_interval_s, self.COST_RATIO * self._cost):
            return None
        out = Path(self.out_dir)
        df = study_frame(study, self.layers, self.budget, self._history, self.cost)
        atomic_to_parquet(df, out / "results.parquet")
        atomic_to_parquet(pareto_front(df[df["status"] == "completed"], size=self.cost), out / "pareto.parquet")
        atomic_write_json(out / "summary.json", summarize(df, self.budget_mb, self.budget_gbops))
        self._last = time.monotonic()
        self._cost = self._last - now
        return df


def read_results(run_dir: str | Path) -> pd.DataFrame:
    """results.parquet of a run (the run dir or its search/ dir); raises FileNotFoundError if absent."""
    return pd.read_parquet(_find(run_dir, "results.parquet"))


def pareto_table(run_dir: str | Path, cost: str | None = None) -> pd.DataFrame:
    """The current front as a compact table (cost ascending): works while a search is running.

    `cost`: "size" (MB) or "bops" (GBOPs); default the search's own (summary.json), else size.
    """
    cost = cost or {v: k for k, v in COST_COLUMNS.items()}.get(read_summary(run_dir).get("cost"), "size")
    if cost not in COST_COLUMNS:
        raise ValueError(f"cost must be one of {sorted(COST_COLUMNS)} (got {cost!r})")
    df = read_results(run_dir)
    if BOPS not in df.columns:
        if cost == "bops":
            raise CostUnavailable(f"{_find(run_dir, 'results.parquet')} has no BOPs column (a search from before "
                                  "BOPs were recorded); show the front in size (--cost size)")
        df[BOPS] = math.nan
    front = pareto_front(df[df["status"] == "completed"], size=COST_COLUMNS[cost])
    bit_cols = [c for c in front.columns if c.startswith("bits.")]
    # one compact column: the bits of each layer in model order, e.g. "8/4/4/2/8"
    front["bits"] = front[bit_cols].astype(str).agg("/".join, axis=1) if len(front) else pd.Series(dtype=str)
    cols = ["number", "trial_id", ACC, SIZE, BOPS, "avg_bits", "epochs", "wall_s", "bits"]
    return front[cols].reset_index(drop=True)


def _find(run_dir: str | Path, name: str) -> Path:
    """`name` in a run dir's search/ folder, or in the given folder itself (a search dir)."""
    p = Path(run_dir)
    for cand in (p / "search" / name, p / name):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no {name} under {p} (expected {p / 'search' / name}); run `kdsearch search SPEC` first")


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json of a run (the run dir or its search/ dir); {} when there is none yet."""
    try:
        return json.loads(_find(run_dir, "summary.json").read_text())
    except FileNotFoundError:
        return {}
