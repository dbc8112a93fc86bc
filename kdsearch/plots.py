"""Plots of search results (matplotlib, Agg backend: no display needed, safe in Ray workers and CI).

`plot_pareto`: size (MB) vs accuracy of every trained trial, the non-dominated front highlighted, the size
budget drawn, and reference points marked (uniform-precision baselines, the float KD student).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .io import atomic_path
from .pareto import ACC, SIZE, pareto_front


@dataclass(frozen=True)
class Marker:
    """A reference point on the plot; `acc` None draws a vertical tick at `size_mb` (accuracy not measured)."""

    label: str
    size_mb: float
    acc: float | None = None

    def __post_init__(self) -> None:
        if not (self.size_mb > 0 and math.isfinite(self.size_mb)):
            raise ValueError(f"Marker.size_mb must be a positive number (got {self.size_mb})")


def plot_pareto(results: pd.DataFrame, path: str | Path, *, budget_mb: float | None = None,
                markers: Sequence[Marker] = (), title: str | None = None) -> Path:
    """Write `path` (PNG): completed trials, pruned trials (their last accuracy), the front, budget, markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = results[results["status"] == "completed"]
    pruned = results[results["status"] == "pruned"]
    front = pareto_front(done)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    if len(pruned):
        ax.scatter(pruned[SIZE], pruned[ACC], marker="x", s=18, color="0.6", label=f"stopped early ({len(pruned)})")
    if len(done):
        ax.scatter(done[SIZE], done[ACC], s=22, color="tab:blue", alpha=0.6, label=f"trials ({len(done)})")
    if len(front):
        ax.step(front[SIZE], front[ACC], where="post", color="tab:red", lw=1.2)
        ax.scatter(front[SIZE], front[ACC], s=46, color="tab:red", zorder=3, label=f"Pareto front ({len(front)})")
    if budget_mb is not None:
        ax.axvline(budget_mb, color="k", ls="--", lw=1, label=f"budget {budget_mb:g} MB")
    accs = [float(a) for a in results[ACC].dropna()] + [m.acc for m in markers if m.acc is not None]
    for i, m in enumerate(markers):
        color = plt.cm.Dark2(i % 8)
        if m.acc is None:
            ax.axvline(m.size_mb, color=color, ls=":", lw=1.2, label=f"{m.label} (not trained)")
        else:
            ax.scatter([m.size_mb], [m.acc], marker="D", s=50, color=color, zorder=4, label=m.label)
    sizes = [float(s) for s in results[SIZE].dropna()] + [m.size_mb for m in markers]
    if budget_mb is not None:
        sizes.append(budget_mb)
    if sizes and max(sizes) / max(min(sizes), 1e-12) > 8:
        ax.set_xscale("log")
    if accs:
        lo, hi = min(accs), max(accs)
        pad = max(0.5, 0.05 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("model size (MB = 10^6 bytes)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "Bit-width search: accuracy vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
