"""Plots of search results (matplotlib, Agg backend: no display needed, safe in Ray workers and CI).

`plot_pareto`: size (MB) vs accuracy of every trained trial, the non-dominated front highlighted, the size
budget drawn, and reference points marked (uniform-precision baselines, the float KD student); beside it the
same against BOPs (GBOPs), with the BOPs budget, when the results carry BOPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .io import atomic_path
from .pareto import ACC, BOPS, COST_LABELS, COST_UNITS, SIZE, pareto_front


@dataclass(frozen=True)
class Marker:
    """A reference point on the plot; `acc` None draws a vertical tick at its cost (accuracy not measured).
    `gbops` None: the marker is left out of the BOPs panel."""

    label: str
    size_mb: float
    acc: float | None = None
    gbops: float | None = None

    def __post_init__(self) -> None:
        for name in ("size_mb", "gbops"):
            v = getattr(self, name)
            if (v is not None or name == "size_mb") and not (v is not None and v > 0 and math.isfinite(v)):
                raise ValueError(f"Marker.{name} must be a positive number (got {v})")


def plot_pareto(results: pd.DataFrame, path: str | Path, *, budget_mb: float | None = None,
                markers: Sequence[Marker] = (), title: str | None = None, budget_gbops: float | None = None) -> Path:
    """Write `path` (PNG): completed trials, pruned trials (their last accuracy), the front, budget, markers;
    one panel against size and, when the results carry BOPs, a second against GBOPs (each with its own front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(SIZE, budget_mb)]
    if BOPS in results.columns and results[BOPS].notna().any():
        panels.append((BOPS, budget_gbops))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.0 * len(panels), 4.6), squeeze=False)
    for ax, (cost, budget) in zip(axes[0], panels):
        _panel(plt, ax, results, cost, budget, [m for m in markers if _at(m, cost) is not None])
    fig.suptitle(title or "Bit-width search: accuracy vs cost")
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def _at(m: Marker, cost: str) -> float | None:
    return m.size_mb if cost == SIZE else m.gbops


def _panel(plt: Any, ax: Any, results: pd.DataFrame, cost: str, budget: float | None,
           markers: Sequence[Marker]) -> None:
    done = results[results["status"] == "completed"]
    pruned = results[results["status"] == "pruned"]
    front = pareto_front(done, size=cost)
    if len(pruned):
        ax.scatter(pruned[cost], pruned[ACC], marker="x", s=18, color="0.6", label=f"stopped early ({len(pruned)})")
    if len(done):
        ax.scatter(done[cost], done[ACC], s=22, color="tab:blue", alpha=0.6, label=f"trials ({len(done)})")
    if len(front):
        ax.step(front[cost], front[ACC], where="post", color="tab:red", lw=1.2)
        ax.scatter(front[cost], front[ACC], s=46, color="tab:red", zorder=3, label=f"Pareto front ({len(front)})")
    if budget is not None:
        ax.axvline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g} {COST_UNITS[cost]}")
    accs = [float(a) for a in results[ACC].dropna()] + [m.acc for m in markers if m.acc is not None]
    for i, m in enumerate(markers):
        color = plt.cm.Dark2(i % 8)
        if m.acc is None:
            ax.axvline(_at(m, cost), color=color, ls=":", lw=1.2, label=f"{m.label} (not trained)")
        else:
            ax.scatter([_at(m, cost)], [m.acc], marker="D", s=50, color=color, zorder=4, label=m.label)
    xs = [float(s) for s in results[cost].dropna()] + [float(_at(m, cost)) for m in markers]  # type: ignore[arg-type]
    if budget is not None:
        xs.append(budget)
    if xs and max(xs) / max(min(xs), 1e-12) > 8:
        ax.set_xscale("log")
    if accs:
        lo, hi = min(accs), max(accs)
        pad = max(0.5, 0.05 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(COST_LABELS[cost])
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
