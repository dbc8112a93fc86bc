"""Stage `finalize`: the longer QAT(+KD) of the search's best configurations and the seed's uniform baselines,
each exported as a packed file and measured.

What gets finalized (one model per distinct configuration; a configuration chosen for several reasons is
trained once and carries every role):

* the search's Pareto front, its ``finalize.top_k`` most accurate configurations;
* for each of ``search.budgets_mb``, the most accurate completed trial within that budget (the search runs
  under the first budget; a smaller one may have no trial, and then the sensitivity solver's configuration
  for that budget, from ``priors.json``, stands in);
* the most accurate completed trial that mixes exactly widths within {16, 8} and within {8, 4}: the seed's
  "QAT Layer+KD Mixed 16/8-bit" and "Mixed 8/4-bit" rows, when the spec's bit choices allow them;
* the seed's uniform baselines: QAT Scratch and QAT KD at 16 and 8 bits (``qat_scratch_16``, ...).
  Pins act as floors here (a pinned layer keeps max(pin, b) bits), so "16-bit" means every layer at 16.

Scratch baselines start from students/scratch.pt and train with cross-entropy only; every other model starts
from the KD student (students/kd.pt), as the search's trials do, and trains with the ensemble KD loss. All use
``quant.qat`` (the finalize-length QAT settings).

Outputs in runs/<name>/final/: ``<id>.kdq`` (``export_quantized``), ``<id>.json`` (metrics, bit configuration,
provenance), ``final.parquet`` (one row per model) and ``progress.json`` (what is training now, for
``kdsearch status`` and the progress view). Each export is verified: reloaded with ``load_quantized`` and
evaluated on the test split; the accuracy must equal the fake-quant model's up to one test image.

Resume: a model whose ``<id>.json`` was made from the same inputs is skipped; the one in progress continues
from its per-epoch checkpoint (``<id>.<key>.ckpt``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ..checkpoints import CheckpointError, load_model, read_model_file
from ..context import RunContext
from ..io import atomic_to_parquet, atomic_write_json, stable_hash
from ..pareto import ACC, SIZE, pareto_front
from ..qat import qat_finetune
from ..spec import Spec

log = logging.getLogger("kdsearch.stages.finalize")

UNIFORM_BASELINES: tuple[tuple[str, str, int], ...] = (
    ("qat_scratch_16", "scratch", 16), ("qat_kd_16", "kd", 16), ("qat_scratch_8", "scratch", 8), ("qat_kd_8", "kd", 8),
)
MIXED_SETS: tuple[tuple[int, ...], ...] = ((16, 8), (8, 4))  # the seed's "Mixed 16/8-bit" and "Mixed 8/4-bit"
KINDS = ("uniform", "searched", "solver")


@dataclass(frozen=True)
class Candidate:
    """One model to finalize: where its QAT starts, whether it distils, its bits and why it was chosen."""

    id: str
    start: str  # "kd" (students/kd.pt) or "scratch" (students/scratch.pt)
    kd: bool  # QAT with the ensemble KD loss, or cross-entropy only
    bits: Mapping[str, int]
    kind: str  # "uniform", "searched" (a trial's configuration) or "solver" (priors.json warm start)
    roles: tuple[str, ...] = ()
    trial_number: int | None = None
    search_acc: float | None = None  # the trial's accuracy after the search's short QAT
    label: str = field(default="")

    def __post_init__(self) -> None:
        if self.start not in ("kd", "scratch"):
            raise ValueError(f"Candidate.start must be 'kd' or 'scratch' (got {self.start!r})")
        if self.kind not in KINDS:
            raise ValueError(f"Candidate.kind must be one of {KINDS} (got {self.kind!r})")
        if not self.bits:
            raise ValueError("Candidate.bits must name every quantizable layer")


def final_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "final"


def bits_used(bits: Mapping[str, int]) -> tuple[int, ...]:
    """The distinct widths of a configuration, widest first: (8, 4) for an 8/4 mix."""
    return tuple(sorted({int(b) for b in bits.values()}, reverse=True))


def bits_label(bits: Mapping[str, int]) -> str:
    """'Uniform 8-bit' or 'Mixed 8/4-bit': the seed's naming, from the widths actually used."""
    used = bits_used(bits)
    return f"Uniform {used[0]}-bit" if len(used) == 1 else "Mixed " + "/".join(map(str, used)) + "-bit"


# ---- which configurations -----------------------------------------------------------------------------------

def uniform_candidates(model: nn.Module, pin: Mapping[str, int]) -> list[Candidate]:
    from ..quant import BitConfig

    out = []
    for cid, start, b in UNIFORM_BASELINES:
        floors = {k: v for k, v in pin.items() if v > b}  # a pin keeps a layer *at least* that wide
        cfg = BitConfig.uniform(model, b, pin=floors).to_dict()
        name = f"QAT {'Scratch' if start == 'scratch' else 'KD'} {b}-bit"
        out.append(Candidate(cid, start, start == "kd", cfg, "uniform", (name,), label=name))
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

    front = pareto_front(done).sort_values([ACC, SIZE], ascending=[False, True])
    for i, (_, row) in enumerate(front.head(top_k).iterrows(), start=1):
        add(row, f"front top-{i}")
    missing: list[float] = []
    solver: dict[str, Candidate] = {}
    for budget in budgets_mb:
        fit_in = done[done[SIZE] <= budget]
        if len(fit_in):
            add(fit_in.sort_values([ACC, SIZE], ascending=[False, True]).iloc[0], f"best <= {budget:g} MB")
            continue
        start = _solver_start(priors, budget)
        if start is None:
            missing.append(budget)
            continue
        cid = f"solver_{budget:g}mb".replace(".", "p")
        solver[cid] = Candidate(cid, "kd", True, start, "solver", (f"solver <= {budget:g} MB",),
                                label=bits_label(start))
    if len(done):
        used = done.apply(lambda r: bits_used(_row_bits(r)), axis=1)
        for allowed in MIXED_SETS:
            mixed = done[used.apply(lambda u: len(u) > 1 and set(u) <= set(allowed))]
            if len(mixed):
                add(mixed.sort_values([ACC, SIZE], ascending=[False, True]).iloc[0],
                    "best mixed " + "/".join(map(str, allowed)))
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


# ---- the one QAT(+KD) fine-tune ----------------------------------------------------------------------------

# ---- one finalized model ------------------------------------------------------------------------------------

class _Finalizer:
    """Shared state of one finalize run: data, the student files' keys, a teacher source built on first need."""

    def __init__(self, spec: Spec, ctx: RunContext) -> None:
        from ..stages.baselines import kd_student_path
        from ..stages.train_models import scratch_student_path

        self.spec, self.ctx = spec, ctx
        self.out = final_dir(ctx.run_dir)
        self.students = {"kd": kd_student_path(spec, ctx.run_dir), "scratch": scratch_student_path(ctx.run_dir)}
        for kind, p in self.students.items():
            if not p.is_file():
                raise CheckpointError(f"no {kind} student at {p}; run the baselines stage (`kdsearch run "
                                      f"{spec.name}`) before finalize")
        self.student_keys = {k: read_model_file(p).get("meta", {}).get("inputs_key") or
                             f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for k, p in self.students.items()}
        self._bundle: Any = None
        self._teachers: Any = None
        self._teachers_key: str | None = None

    @property
    def bundle(self) -> Any:
        """The data, loaded on first need (a rerun where every model is done never loads it)."""
        from ..data import load_data

        if self._bundle is None:
            self._bundle = load_data(self.spec.data, seed=self.spec.seed)
        return self._bundle

    def teachers_key(self) -> str:
        from ..distill import teachers_key

        if self._teachers_key is None:
            self._teachers_key = teachers_key(self.spec, self.ctx.run_dir)
        return self._teachers_key

    def teachers(self) -> Any:
        from ..distill import teacher_source
        from ..stages.baselines import default_source

        if self._teachers is None:
            self._teachers = teacher_source(self.spec, self.ctx, default_source(self.spec), bundle=self.bundle)
        return self._teachers

    def close(self) -> None:
        if self._teachers is not None and hasattr(self._teachers, "shutdown"):
            self._teachers.shutdown()

    def inputs_key(self, cand: Candidate) -> str:
        spec = self.spec
        kd = {"distill": spec.distill.model_dump(mode="json"), "teachers": self.teachers_key()} if cand.kd else None
        return stable_hash({"student": self.student_keys[cand.start], "bits": dict(cand.bits), "kd": kd,
                            "qat": spec.quant.qat.model_dump(mode="json"), "act_bits": spec.quant.act_bits,
                            "data": spec.data.model_dump(mode="json"), "seed": spec.seed})

    def progress(self, **state: Any) -> None:
        atomic_write_json(self.out / "progress.json", {**state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def run(self, cand: Candidate, index: int, total: int) -> dict[str, Any]:
        import json

        from ..data import EvalLoader, Normalizer
        from ..quant import export_quantized, load_quantized, model_size
        from ..train import evaluate

        spec, ctx, cfg = self.spec, self.ctx, self.spec.quant.qat
        key = self.inputs_key(cand)
        js, kdq = self.out / f"{cand.id}.json", self.out / f"{cand.id}.kdq"
        if js.is_file() and kdq.is_file():
            old = json.loads(js.read_text())
            if old.get("inputs_key") == key:
                log.info("finalize: %s is done (same inputs); skipping", cand.id)
                return {**old, "roles": list(cand.roles)}
        for stale in self.out.glob(f"{cand.id}.*.ckpt"):
            if stale.name != f"{cand.id}.{key}.ckpt":
                stale.unlink()
        t0 = time.perf_counter()
        what = f"QAT{'+KD' if cand.kd else ''} from the {cand.start} student"
        log.info("finalize: %s (%s, %s; %s), %d epochs", cand.id, cand.label, ", ".join(cand.roles), what, cfg.epochs)
        state = {"total": total, "index": index, "current": cand.id, "label": cand.label, "epochs": cfg.epochs}
        self.progress(**state, epoch=0)
        model, m = qat_finetune(spec, self.students[cand.start], cand.bits, cfg, device=ctx.device,
                                teacher=self.teachers() if cand.kd else None,
                                ckpt_path=self.out / f"{cand.id}.{key}.ckpt", bundle=self.bundle,
                                progress=ctx.progress, desc=f"finalize {cand.id}",
                                on_epoch=lambda e: self.progress(**state, epoch=int(e["epoch"])))
        arch = spec.student.arch
        size = model_size(model)
        file_bytes = export_quantized(model, kdq, arch=arch, num_classes=self.bundle.num_classes,
                                      metadata={"id": cand.id, "spec": spec.name, "data_version": self.bundle.version})
        norm = Normalizer.from_bundle(self.bundle)
        test = EvalLoader(self.bundle.test, batch_size=spec.data.eval_batch_size, device=ctx.device)
        reloaded = load_quantized(kdq).to(ctx.device)
        export_acc = evaluate(reloaded, test, norm, ctx.device, cfg)["acc"]
        tol = 100.0 / max(1, len(self.bundle.test)) + 1e-9  # one test image
        ok = abs(export_acc - m["acc"]) <= tol
        if not ok:
            log.error("finalize: %s reloads at %.3f%% but trained at %.3f%%: the export does not reproduce the "
                      "model", cand.id, export_acc, m["acc"])
        metrics = {
            "id": cand.id, "kind": cand.kind, "label": cand.label, "roles": list(cand.roles), "arch": arch,
            "start": cand.start, "kd": cand.kd, "bit_config": dict(cand.bits), "bits_used": list(bits_used(cand.bits)),
            "acc": m["acc"], "export_acc": export_acc, "export_ok": ok, "size_mb": size.total_mb,
            "total_bytes": size.total_bytes, "file_bytes": file_bytes, "avg_bits": size.avg_bits,
            "fp32_mb": size.fp32_mb, "compression": size.compression, "epochs": cfg.epochs,
            "trial_number": cand.trial_number, "search_acc": cand.search_acc, "file": kdq.name,
            "seconds": time.perf_counter() - t0, "data_version": self.bundle.version, "inputs_key": key,
            "device": str(ctx.device), "history": m["history"],
        }
        atomic_write_json(js, metrics)
        (self.out / f"{cand.id}.{key}.ckpt").unlink(missing_ok=True)
        log.info("finalize: %s: %.2f%% (reloaded %.2f%%), %.4f MB (%d bytes on disk), %.2f avg bits", cand.id,
                 m["acc"], export_acc, size.total_mb, file_bytes, size.avg_bits)
        return metrics


TABLE_COLUMNS = ["id", "kind", "label", "roles", "start", "kd", "bits_used", "acc", "export_acc", "export_ok",
                 "size_mb", "total_bytes", "file_bytes", "avg_bits", "compression", "epochs", "trial_number",
                 "search_acc", "bits", "file"]


def final_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """final.parquet: one row per finalized model, lists flattened to strings ('8/4', 'conv1=8,...')."""
    flat = []
    for r in rows:
        flat.append({**{c: r.get(c) for c in TABLE_COLUMNS}, "roles": "; ".join(r["roles"]),
                     "bits_used": "/".join(map(str, r["bits_used"])),
                     "bits": ",".join(f"{k}={v}" for k, v in r["bit_config"].items())})
    df = pd.DataFrame(flat, columns=TABLE_COLUMNS)
    return df.astype({"trial_number": "Int64", "search_acc": "float64"})


def select_candidates(spec: Spec, run_dir: Path, model: nn.Module) -> tuple[list[Candidate], list[float]]:
    """Uniform baselines + the search's picks, one per distinct (start, kd, bits)."""
    from ..search.results import read_results
    from ..sensitivity import sensitivity_dir

    try:
        results = read_results(run_dir)
    except FileNotFoundError:
        log.warning("finalize: no search results in %s; finalizing the uniform baselines (and solver configs)",
                    run_dir / "search")
        results = pd.DataFrame(columns=["number", "status", ACC, SIZE])
    priors_path = sensitivity_dir(run_dir) / "priors.json"
    priors = None
    if priors_path.is_file():
        import json

        priors = json.loads(priors_path.read_text())
    searched, missing = searched_candidates(results, spec.search.budgets_mb, spec.finalize.top_k, priors)
    out, seen = [], {}
    for c in uniform_candidates(model, spec.quant.pin) + searched:
        sig = (c.start, c.kd, tuple(sorted(c.bits.items())))
        if sig in seen:  # e.g. a uniform 8-bit trial on the front: train it once, keep both roles
            i = seen[sig]
            a = out[i]
            out[i] = Candidate(a.id, a.start, a.kd, a.bits, a.kind, a.roles + c.roles,
                               c.trial_number if a.trial_number is None else a.trial_number,
                               c.search_acc if a.search_acc is None else a.search_acc, a.label)
            continue
        seen[sig] = len(out)
        out.append(c)
    return out, missing


def finalize_stage(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Finalize every candidate (resumably), write final/final.parquet; return a summary for the manifest."""
    fin = _Finalizer(spec, ctx)
    model, _ = load_model(fin.students["kd"])
    cands, missing = select_candidates(spec, ctx.run_dir, model)
    for b in missing:
        log.warning("finalize: no completed trial and no solver configuration fits %g MB; nothing finalized for "
                    "that budget", b)
    rows = []
    try:
        for i, cand in enumerate(cands):
            rows.append(fin.run(cand, i, len(cands)))
    finally:
        fin.close()
    fin.progress(total=len(cands), index=len(cands), current=None, label=None, epochs=0, epoch=0)
    atomic_to_parquet(final_table(rows), fin.out / "final.parquet")
    bad = [r["id"] for r in rows if not r["export_ok"]]
    return {"models": {r["id"]: {"acc": round(r["acc"], 4), "size_mb": r["size_mb"], "file_bytes": r["file_bytes"],
                                 "label": r["label"]} for r in rows},
            "table": str(fin.out / "final.parquet"), "budgets_without_config": missing, "export_mismatch": bad}
