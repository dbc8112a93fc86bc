"""Which configurations finalize trains, and which finalized model a report or an export names: the policy.

Every choice here reads validation accuracy only (the search's `val_acc`, a finalized model's mean `val_acc`
over its seeds); ties break toward the smaller model. The test split is reported, never read to choose.

What gets finalized (one model per distinct configuration; a configuration chosen for several reasons is
trained once and carries every role):

* the search's Pareto front, its ``finalize.top_k`` most accurate configurations;
* for each of ``search.budgets_mb``, the most accurate completed trial within that budget (the search runs
  under the first budget; a smaller one may have no trial, and then the sensitivity solver's configuration
  for that budget, from ``priors.json``, stands in);
* the most accurate completed trial that mixes exactly widths within {16, 8} and within {8, 4}: the seed's
  "QAT Layer+KD Mixed 16/8-bit" and "Mixed 8/4-bit" rows, when the spec's bit choices allow them;
* the seed's uniform baselines: QAT Scratch and QAT KD at ``finalize.uniform_bits`` (16 and 8 by default:
  ``qat_scratch_16``, ...). Pins act as floors here (a pinned layer keeps max(pin, b) bits), so "16-bit"
  means every layer at 16;
* the two baselines a compressed model is judged against (as HAWQ-V3 and the QAT literature report them):
  **PTQ 8-bit** (``ptq_kd_8``: the FP32 KD student quantized to uniform 8 bits and calibrated, no training:
  what did QAT add?) and, for each budget, **allocation only** (``alloc_<budget>mb``: the sensitivity
  solver's own configuration, trained with finalize's QAT+KD recipe and no search: what did the search add?).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .pareto import ACC, SIZE, pareto_front

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


def allocation_candidates(budgets_mb: tuple[float, ...], priors: Mapping[str, Any] | None) -> list[Candidate]:
    """Per budget, the sensitivity solver's configuration (``priors.json``), QAT+KD-trained without a search."""
    out = []
    for budget in budgets_mb:
        bits = _solver_start(priors, budget)
        if bits is not None:
            cid = f"alloc_{budget:g}mb".replace(".", "p")
            out.append(Candidate(cid, "kd", True, bits, "solver", (f"{ALLOCATION_ROLE} <= {budget:g} MB",),
                                 label=bits_label(bits)))
    return out


def _row_bits(row: pd.Series) -> dict[str, int]:
    return {c[len("bits."):]: int(row[c]) for c in row.index if c.startswith("bits.") and int(row[c]) > 0}


def searched_candidates(results: pd.DataFrame, budgets_mb: tuple[float, ...], top_k: int,
                        priors: Mapping[str, Any] | None = None) -> tuple[list[Candidate], list[float]]:
    """The search's configurations to finalize (deduplicated, roles merged) and the budgets left without one."""
    done = results[results["status"] == "completed"].dropna(subset=[ACC, SIZE])
    picks: dict[str, dict[str, Any]] = {}  # id -> {row or bits, roles}

    def add(row: pd.Series, role: str) -> None:
        cid = f"trial_{int(row['number']):05d}"
        picks.setdefault(cid, {"row": row, "roles": []})["roles"].append(role)

    front = best_first(pareto_front(done))
    for i, (_, row) in enumerate(front.head(top_k).iterrows(), start=1):
        add(row, f"front top-{i}")
    missing: list[float] = []
    solver: dict[str, Candidate] = {}
    for budget in budgets_mb:
        fit_in = done[done[SIZE] <= budget]
        if len(fit_in):
            add(best_first(fit_in).iloc[0], f"best <= {budget:g} MB")
            continue
        start = _solver_start(priors, budget)
        if start is None:
            missing.append(budget)
            continue
        cid = f"alloc_{budget:g}mb".replace(".", "p")  # the allocation-only candidate stands in (merged)
        solver[cid] = Candidate(cid, "kd", True, start, "solver", (f"solver <= {budget:g} MB",),
                                label=bits_label(start))
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


def _solver_start(priors: Mapping[str, Any] | None, budget: float) -> dict[str, int] | None:
    for rec in (priors or {}).get("warm_starts", []):
        if rec.get("multiple") == 1.0 and abs(float(rec.get("base_budget_mb", -1)) - budget) < 1e-12 \
                and rec.get("feasible") and rec.get("bit_config"):
            return {k: int(v) for k, v in rec["bit_config"].items()}
    return None



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


def export_default(final: pd.DataFrame, budgets_mb: list[float]) -> pd.Series | None:
    """The model `kdsearch export` ships without --model: the best (mean validation accuracy, then smaller)
    within the first budget, else the best overall."""
    models = model_means(final)
    if not len(models):
        return None
    if budgets_mb:
        fits = models[models["size_mb"] <= budgets_mb[0]]
        if len(fits):
            return best_first(fits).iloc[0]
    return best_first(models).iloc[0]
