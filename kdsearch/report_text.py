"""The words and numbers both reports share: accuracies as text, mean ± std over seeds, paired differences.

Why one module: report.md, report.html and the evidence scripts (benchmarks/evidence/) state the same comparisons;
a difference is "inside its spread" by one rule, everywhere.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

NOT_RUN = "not run yet"  # what a part of a report reads before its stage has run


def pct(v: Any) -> str:
    """An accuracy as '73.45', '-' for none."""
    return f"{float(v):.2f}" if v is not None and v == v else "-"


def mean_std(values: list[float] | pd.Series) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), n) of accuracies; NaN mean for none."""
    v = [float(x) for x in values if x is not None and x == x]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd, len(v)


def fmt_ms(values: list[float] | pd.Series) -> str:
    """'73.45 ± 0.31' (mean ± sample std over seeds), '73.45' for one seed, '-' for none."""
    m, sd, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{m:.2f} ± {sd:.2f}" if n > 1 else f"{m:.2f}"


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean ± std of a[s] - b[s] over the seeds both have (a paired comparison: same seed, same views)."""
    common = sorted(set(a) & set(b))
    return mean_std([a[s] - b[s] for s in common])


def difference_line(what: str, a: dict[int, float], b: dict[int, float]) -> str:
    """One line: the paired difference, and whether it is inside the seed-to-seed spread."""
    m, sd, n = paired_difference(a, b)
    if n == 0:
        return f"* {what}: {NOT_RUN}"
    if n == 1:
        return f"* {what}: {m:+.2f} points (one seed: no spread to compare it with; set `seeds: [0, 1, 2]` in the spec for one)"
    verdict = "larger than" if abs(m) > sd else "inside"
    return f"* {what}: {m:+.2f} ± {sd:.2f} points (paired over n={n} seeds; the difference is {verdict} its spread)"


def by_seed(rows: list[dict[str, Any]] | pd.DataFrame, col: str = "test_acc") -> dict[int, float]:
    if isinstance(rows, pd.DataFrame):
        return {int(s): float(v) for s, v in zip(rows["seed"], rows[col])}
    return {int(m["seed"]): float(m[col]) for m in rows if m.get(col) is not None}
