"""Which configurations finalize trains, and which finalized model a report or an export names: the policy.

Every choice here reads validation accuracy only (the search's `val_acc`, a finalized model's mean `val_acc`
over its seeds); ties break toward the smaller model. The test split is reported, never read to choose.

What gets finalized (one model per distinct configuration; a configuration chosen for several reasons is
trained once and carries every role):

* the search's Pareto front, its ``finalize.top_k`` most accurate configurations;
* for each of ``search.budgets_mb`` and ``search.budgets_gbops``, the most accurate completed trial within that
  budget (the search runs under the first budget of each kind; a smaller one may have no trial, and then the
  sensitivity solver's configuration for that budget, from ``priors.json``, stands in);
* the most accurate completed trial that mixes exactly widths within {16, 8} and within {8, 4}: the seed's
  "QAT Layer+KD Mixed 16/8-bit" and "Mixed 8/4-bit" rows, when the spec's bit choices allow them;
* the seed's uniform baselines: QAT Scratch and QAT KD at ``finalize.uniform_bits`` (16 and 8 by default:
  ``qat_scratch_16``, ...). Pins act as floors here (a pinned layer keeps max(pin, b) bits), so "16-bit"
  means every layer at 16;
* the two baselines a compressed model is judged against (as HAWQ-V3 and the QAT literature report them):
  **PTQ 8-bit** (``ptq_kd_8``: the FP32 KD student quantized to uniform 8 bits and calibrated, no training:
  what did QAT add?) and, for each budget, **allocation only** (``alloc_<budget>mb`` / ``alloc_<budget>gbops``:
  the sensitivity solver's own configuration for that budget, trained with finalize's QAT+KD recipe and no
  search: what did the search add?).

A size budget and a BOPs budget are two caps on two columns (``size_mb``, ``gbops``) of the same tables; `Budget`
is one of them, so every rule above is written once for both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .pareto import ACC, BOPS, SIZE, pareto_front

MIXED_SETS: tuple[tuple[int, ...], ...] = ((16, 8), (8, 4))  # the seed's "Mixed 16/8-bit" and "Mixed 8/4-bit"
KINDS = ("uniform", "searched", "solver", "ptq")
PTQ_ID, PTQ_BITS = "ptq_kd_8", 8
ALLOCATION_ROLE = "allocation only"


@dataclass(frozen=True)
class Candidate:
    """One model to finalize: where its QAT starts, whether it distils, its bits and why it was chosen."""

    id: str
    start: str  # "kd" or "scratch": the float student of the same seed it starts from
    kd: bool  # QAT with the ensemble KD loss, or cross-entropy only
    bits: Mapping[str, int]
    kind: str  # "uniform", "searched" (a trial's configuration) or "solver" (priors.json warm start)
    roles: tuple[str, ...] = ()
    trial_number: int | None = None
    search_acc: float | None = None  # the trial's validation accuracy after the search's short QAT
    label: str = field(default="")

    @property
    def trains(self) -> bool:
        """False for post-training quantization: quantize and calibrate, no QAT."""
        return self.kind != "ptq"

    def __post_init__(self) -> None:
        if self.start not in ("kd", "scratch"):
            raise ValueError(f"Candidate.start must be 'kd' or 'scratch' (got {self.start!r})")
        if self.kind not in KINDS:
            raise ValueError(f"Candidate.kind must be one of {KINDS} (got {self.kind!r})")
        if not self.bits:
            raise ValueError("Candidate.bits must name every quantizable layer")


@dataclass(frozen=True)
class Budget:
    """One spec budget: ``value`` caps the ``column`` (``size_mb`` or ``gbops``) of a trial or finalized model."""

    column: str
    value: float

    @property
    def unit(self) -> str:
        return "MB" if self.column == SIZE else "GBOPs"

    def __str__(self) -> str:
        return f"{self.value:g} {self.unit}"

    @property
    def alloc_id(self) -> str:
        """The allocation-only candidate's id: ``alloc_0p5mb``, ``alloc_1p2gbops``."""
        return f"alloc_{self.value:g}{self.unit.lower()}".replace(".", "p")

    def solver_start(self, priors: Mapping[str, Any] | None) -> dict[str, int] | None:
        """The sensitivity solver's configuration for exactly this budget (``priors.json``), if it found one."""
        key, base = ("warm_starts", "base_budget_mb") if self.column == SIZE else ("warm_starts_bops",
                                                                                 "base_budget_gbops")
        for rec in (priors or {}).get(key, []):
            if rec.get("multiple") == 1.0 and abs(float(rec.get(base, -1)) - self.value) < 1e-12 \
                    and rec.get("feasible") and rec.get("bit_config"):
                return {k: int(v) for k, v in rec["bit_config"].items()}
        return None


def spec_budgets(budgets_mb: Sequence[float] = (), budgets_gbops: Sequence[float] = ()) -> list[Budget]:
    """The spec's budgets, sizes first, each kind in the spec's order."""
    return [Budget(SIZE, float(b)) for b in budgets_mb] + [Budget(BOPS, float(b)) for b in budgets_gbops]


def within(df: pd.DataFrame, budgets: Sequence[Budget]) -> pd.DataFrame:
    """The rows of ``df`` within every one of ``budgets`` (a row without the budget's column fits none)."""
    keep = pd.Series(True, index=df.index)
    for b in budgets:
        keep &= (df[b.column] <= b.value) if b.column in df.columns else False
    return df[keep]


def bits_used(bits: Mapping[str, int]) -> tuple[int, ...]:
    """The distinct widths of a configuration, widest first: (8, 4) for an 8/4 mix."""
    return tuple(sorted({int(b) for b in bits.values()}, reverse=True))


def bits_label(bits: Mapping[str, int]) -> str:
    """'Uniform 8-bit' or 'Mixed 8/4-bit': the seed's naming, from the widths actually used."""
    used = bits_used(bits)
    return f"Uniform {used[0]}-bit" if len(used) == 1 else "Mixed " + "/".join(map(str, used)) + "-bit"


# ---- which configurations -----------------------------------------------------------------------------------

def _uniform_bits(model: Any, pin: Mapping[str, int], b: int) -> dict[str, int]:
    from .quant import BitConfig

    floors = {k: v for k, v in pin.items() if v > b}  # a pin keeps a layer *at least* that wide
    return BitConfig.uniform(model, b, pin=floors).to_dict()


def uniform_candidates(model: Any, pin: Mapping[str, int], bits: tuple[int, ...] = (16, 8)) -> list[Candidate]:
    """The uniform QAT Scratch / QAT KD baselines at each of ``bits``, then PTQ 8-bit of the KD student."""
    out = []
    for b in bits:
        for start in ("scratch", "kd"):
            name = f"QAT {'Scratch' if start == 'scratch' else 'KD'} {b}-bit"
            out.append(Candidate(f"qat_{start}_{b}", start, start == "kd", _uniform_bits(model, pin, b), "uniform",
                                 (name,), label=name))
    name = f"PTQ {PTQ_BITS}-bit"
    out.append(Candidate(PTQ_ID, "kd", False, _uniform_bits(model, pin, PTQ_BITS), "ptq", (name,), label=name))
    return out


def allocation_candidates(budgets_mb: Sequence[float], priors: Mapping[str, Any] | None,
                          budgets_gbops: Sequence[float] = ()) -> list[Candidate]:
    """Per budget, the sensitivity solver's configuration (``priors.json``), QAT+KD-trained without a search."""
    out = []
    for budget in spec_budgets(budgets_mb, budgets_gbops):
        bits = budget.solver_start(priors)
        if bits is not None:
            out.append(Candidate(budget.alloc_id, "kd", True, bits, "solver", (f"{ALLOCATION_ROLE} <= {budget}",),
                                 label=bits_label(bits)))
    return out


def _row_bits(row: pd.Series) -> dict[str, int]:
    return {c[len("bits."):]: int(row[c]) for c in row.index if c.startswith("bits.") and int(row[c]) > 0}


def searched_candidates(results: pd.DataFrame, budgets_mb: Sequence[float], top_k: int,
                        priors: Mapping[str, Any] | None = None,
                        budgets_gbops: Sequence[float] = ()) -> tuple[list[Candidate], list[str]]:
    """The search's configurations to finalize (deduplicated, roles merged) and the budgets left without one
    (as text: "0.5 MB", "1.2 GBOPs")."""
    done = results[results["status"] == "completed"].dropna(subset=[ACC, SIZE])
    picks: dict[str, dict[str, Any]] = {}  # id -> {row or bits, roles}

    def add(row: pd.Series, role: str) -> None:
        cid = f"trial_{int(row['number']):05d}"
        picks.setdefault(cid, {"row": row, "roles": []})["roles"].append(role)

    front = best_first(pareto_front(done))
    for i, (_, row) in enumerate(front.head(top_k).iterrows(), start=1):
        add(row, f"front top-{i}")
    missing: list[str] = []
    solver: dict[str, Candidate] = {}
    for budget in spec_budgets(budgets_mb, budgets_gbops):
        fit_in = within(done, [budget])
        if len(fit_in):
            add(best_first(fit_in).iloc[0], f"best <= {budget}")
            continue
        start = budget.solver_start(priors)
        if start is None:
            missing.append(str(budget))
            continue
        cid = budget.alloc_id  # the allocation-only candidate stands in (merged)
        solver[cid] = Candidate(cid, "kd", True, start, "solver", (f"solver <= {budget}",), label=bits_label(start))
    if len(done):
        used = done.apply(lambda r: bits_used(_row_bits(r)), axis=1)
        for allowed in MIXED_SETS:
            mixed = done[used.apply(lambda u: len(u) > 1 and set(u) <= set(allowed))]
            if len(mixed):
                add(best_first(mixed).iloc[0], "best mixed " + "/".join(map(str, allowed)))
    out = []
    for cid, p in picks.items():
        row, bits = p["row"], _row_bits(p["row"])
        out.append(Candidate(cid, "kd", True, bits, "searched", tuple(p["roles"]), int(row["number"]),
                             float(row[ACC]), label=bits_label(bits)))
    return out + list(solver.values()), missing


def best_first(df: pd.DataFrame, acc: str = ACC, size: str = SIZE) -> pd.DataFrame:
    """Rows by accuracy (highest first), ties toward the smaller model: the one ordering every choice uses."""
    return df.sort_values([acc, size], ascending=[False, True], kind="stable")


def merge_candidates(cands: list[Candidate]) -> list[Candidate]:
    """One candidate per distinct (start, kd, bits); a configuration chosen twice keeps both roles."""
    out: list[Candidate] = []
    seen: dict[tuple[Any, ...], int] = {}
    for c in cands:
        sig = (c.start, c.kd, c.trains, tuple(sorted(c.bits.items())))
        if sig in seen:  # e.g. a uniform 8-bit trial on the front: train it once, keep both roles
            i = seen[sig]
            a = out[i]
            out[i] = Candidate(a.id, a.start, a.kd, a.bits, a.kind, a.roles + c.roles,
                               c.trial_number if a.trial_number is None else a.trial_number,
                               c.search_acc if a.search_acc is None else a.search_acc, a.label)
            continue
        seen[sig] = len(out)
        out.append(c)
    return out


def model_means(final: pd.DataFrame) -> pd.DataFrame:
    """final.parquet (one row per model and seed) -> one row per model: mean/std/n of val and test accuracy."""
    if final is None or not len(final):
        return pd.DataFrame()
    g = final.groupby("id", sort=False)
    first = g.first().drop(columns=[c for c in ("seed", "val_acc", "test_acc") if c in final.columns])
    stats = g.agg(val_acc=("val_acc", "mean"), val_std=("val_acc", "std"), test_acc=("test_acc", "mean"),
                  test_std=("test_acc", "std"), n=("test_acc", "size"))
    return first.join(stats).reset_index()


def export_default(final: pd.DataFrame, budgets_mb: Sequence[float],
                   budgets_gbops: Sequence[float] = ()) -> pd.Series | None:
    """The model `kdsearch export` ships without --model: the best (mean validation accuracy, then smaller)
    within the first budget of each kind the spec gives (size and BOPs at once, when it gives both), else the
    best overall."""
    models = model_means(final)
    if not len(models):
        return None
    firsts = spec_budgets(list(budgets_mb)[:1], list(budgets_gbops)[:1])
    if firsts:
        fits = within(models, firsts)
        if len(fits):
            return best_first(fits).iloc[0]
    return best_first(models).iloc[0]
