"""Search quality and overhead of kdsearch's Ray Tune + Optuna bit-width search.

Quality: on a small CPU problem (synthetic CIFAR-shaped data, a resnet8 KD student, 1-epoch QAT+KD trials),
at an equal number of launched trials, the hypervolume of (accuracy, size) reached by
  * TPE + all priors: multivariate TPE + the sensitivity priors (solver warm starts, exclusions of (layer, bits)
    with KL > EXCLUDE_ABOVE) + the uniform 8/4/2 warm starts: the full sensitivity-guided search
  * TPE + sensitivity and uniform warm starts: the same without exclusions
  * TPE + uniform warm starts: no sensitivity at all, only the uniform baselines as warm starts
  * plain TPE: multivariate TPE, no warm starts, no priors
  * random: Optuna's RandomSampler, no warm starts, no priors
for several sampler seeds (the data, teachers, student and trial training are the same for all).
Reference point: (0 %, 1.1 x budget); the budget is the size of uniform 4-bit with the pins.

Overhead: per-trial seconds of zero-work trials (one report, no training) through
  * the full stack (BudgetSearch + trial records + per-epoch checkpoints + result tables),
  * bare Tune (a function trainable reporting once, Tune's own random search), and
  * the searcher alone (suggest + complete, no Tune), which is pure Optuna + bookkeeping.

    PYTHONPATH=. python benchmarks/search_quality.py [--seeds 0 1 2] [--trials 12] [--overhead-trials 24]
Writes benchmarks/results/search_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXCLUDE_ABOVE = 0.5  # KL threshold of the guided variant's exclusions (sensitivity.exclude_above)


def _bare_trial(config: dict[str, Any]) -> None:
    from ray import tune

    tune.report({"acc": float(config["x"])})


def _full(n: int, d: Path) -> float:
    import shutil

    from kdsearch.search import run_search
    from kdsearch.search.synthetic import SyntheticPayload, synthetic_trial, toy_space
    from kdsearch.spec import SearchConfig

    shutil.rmtree(d, ignore_errors=True)
    space = toy_space(layers=8, budget_fraction=0.6)
    cfg = SearchConfig(budgets_mb=(space.budget_mb,), num_trials=n, trial_epochs=1, asha=False, max_concurrent=2)
    t0 = time.perf_counter()
    run_search(space, cfg, out_dir=d, trainable=synthetic_trial, seed=0,
               payload=SyntheticPayload(str(d / "trials"), space, epochs=1, epoch_s=0.0))
    return (time.perf_counter() - t0) / n


def _bare(n: int, d: Path) -> float:
    import shutil

    from ray import tune

    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    tune.Tuner(_bare_trial, param_space={"x": tune.choice(list(range(100)))},
               tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=2, reuse_actors=True),
               run_config=tune.RunConfig(name="bare", storage_path=str(d), verbose=0)).fit()
    return (time.perf_counter() - t0) / n


def overhead(n: int, out: Path, repeats: int = 2) -> dict[str, float]:
    """Seconds per zero-work trial: best of `repeats` interleaved runs of each (after one warm-up run)."""
    from kdsearch.search import BudgetSearch, make_sampler
    from kdsearch.search.synthetic import toy_space

    _bare(4, out / "overhead_warmup")  # start the worker processes once
    full, bare = [], []
    for _ in range(repeats):
        full.append(_full(n, out / "overhead_full"))
        bare.append(_bare(n, out / "overhead_bare"))
    res: dict[str, float] = {"full_stack_s_per_trial": min(full), "bare_tune_s_per_trial": min(bare)}
    space = toy_space(layers=8, budget_fraction=0.6)
    search = BudgetSearch(space, sampler=make_sampler("tpe", 0, n), trial_epochs=1)
    t0 = time.perf_counter()
    for i in range(n):
        cfg_i = search.suggest(f"t{i}")
        search.on_trial_complete(f"t{i}", {"epoch": 1, "acc": 50.0, "size_mb": space.size_mb(cfg_i["bits"])})
    res["searcher_only_s_per_trial"] = (time.perf_counter() - t0) / n
    res["searcher_infeasible_samples"] = search.skipped["infeasible"]
    return res


def bench_spec(trials: int, budget_mb: float | None = None):
    from kdsearch.spec import load_spec

    over = {"name": "bench_search", "student.arch": "resnet8", "student.train.epochs": 6,
            "teachers.models": ["resnet8"], "teachers.train.epochs": 6,
            "search.num_trials": trials, "search.trial_epochs": 1, "search.asha": False, "search.max_concurrent": 2,
            "sensitivity.exclude_above": EXCLUDE_ABOVE, "sensitivity.hutchinson_samples": 4}
    if budget_mb is not None:
        over["search.budgets_mb"] = [budget_mb]
    return load_spec("smoke", over)


def prepare(run_dir: Path, trials: int):
    """Teachers, KD student and sensitivity table of the benchmark problem (each skipped when current)."""
    from kdsearch.context import RunContext
    from kdsearch.models import create_model
    from kdsearch.quant import BitConfig, model_size
    from kdsearch.raycluster import ensure_ray
    from kdsearch.sensitivity import sensitivity_stage
    from kdsearch.stages.baselines import train_kd_student
    from kdsearch.stages.train_models import teacher_path, train_float_model

    ctx = RunContext.create(run_dir, device="cpu", progress=False)
    ensure_ray(None, num_cpus=2)
    spec = bench_spec(trials)
    m = create_model(spec.student.arch, num_classes=10)
    budget = model_size(m, BitConfig.uniform(m, 4, pin=dict(spec.quant.pin)), act_bits=spec.quant.act_bits).total_mb
    spec = bench_spec(trials, round(budget, 6))
    for t in spec.teachers.models:  # one small teacher: in-process
        train_float_model(spec, t.arch, spec.teachers.train, teacher_path(ctx.run_dir, t.arch), device=ctx.device)
    kd = train_kd_student(spec, ctx)
    sensitivity_stage(spec, ctx)
    return spec, ctx, kd


METHODS = {  # name -> (sampler, warm_start, use_priors, sensitivity.exclude_above)
    "TPE + all priors (warm starts, exclusions)": ("tpe", True, True, EXCLUDE_ABOVE),
    "TPE + sensitivity and uniform warm starts": ("tpe", True, True, None),
    "TPE + uniform warm starts": ("tpe", True, False, None),
    "plain TPE": ("tpe", False, False, None),
    "random": ("random", False, False, None),
}


def quality(run_dir: Path, trials: int, seeds: list[int]) -> dict[str, Any]:
    from kdsearch.search import read_results, search_stage
    from kdsearch.spec import parse_spec

    from kdsearch.sensitivity import sensitivity_stage

    spec, ctx, kd = prepare(run_dir, trials)
    out: dict[str, Any] = {"budget_mb": spec.search.budgets_mb[0], "kd_student_acc": kd["test_acc"],
                           "exclude_above": EXCLUDE_ABOVE, "runs": {}}
    for name, (sampler, warm, priors, exclude) in METHODS.items():
        d = spec.to_dict()
        s = parse_spec(d | {"search": d["search"] | {"sampler": sampler, "warm_start": warm},
                            "sensitivity": d["sensitivity"] | {"exclude_above": exclude}})
        if priors:  # rewrite priors.json for this variant (the measured table is reused: milliseconds)
            sensitivity_stage(s, ctx)
        for seed in seeds:
            d = run_dir / "bench" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}-s{seed}"
            t0 = time.perf_counter()
            summary = search_stage(s, ctx, out_dir=d, use_priors=priors, sampler_seed=seed)
            df = read_results(d)
            done = df[df["status"] == "completed"]
            out["runs"][f"{name}|{seed}"] = {
                "hypervolume": summary["hypervolume"], "launched": summary["launched"], "front": summary["front"],
                "best_acc": float(done["acc"].max()) if len(done) else None,
                "min_size_mb": float(done["size_mb"].min()) if len(done) else None,
                "infeasible": summary["counts"]["infeasible"], "duplicates": summary["counts"]["duplicate"],
                "seconds": time.perf_counter() - t0}
    return out


def table(q: dict[str, Any] | None, o: dict[str, float] | None) -> str:
    lines = []
    if q:
        lines += [f"budget {q['budget_mb']:.6f} MB; float KD student {q['kd_student_acc']:.2f} %", "",
                  "| method | hypervolume (mean ± sd) | best acc % (mean) | smallest trained MB (mean) "
                  "| infeasible samples (mean) | runs |",
                  "|---|---|---|---|---|---|"]
        for name in METHODS:
            rs = [r for k, r in q["runs"].items() if k.split("|")[0] == name]
            hv = [r["hypervolume"] for r in rs]
            acc = [r["best_acc"] for r in rs if r["best_acc"] is not None]
            sd = statistics.stdev(hv) if len(hv) > 1 else 0.0
            lines.append(f"| {name} | {statistics.mean(hv):.4f} ± {sd:.4f} | "
                         f"{statistics.mean(acc) if acc else float('nan'):.2f} | "
                         f"{statistics.mean(r['min_size_mb'] for r in rs if r['min_size_mb']):.4f} | "
                         f"{statistics.mean(r['infeasible'] for r in rs):.1f} | {len(rs)} |")
    if o:
        lines += ["", "| zero-work trials | seconds per trial |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in o.items() if k.endswith("_per_trial")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--overhead-trials", type=int, default=24)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench_search")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_quality.json")
    a = ap.parse_args()
    import ray

    from kdsearch.context import setup_logging
    from kdsearch.io import atomic_write_json

    setup_logging()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    o = None if a.skip_overhead else overhead(a.overhead_trials, a.run_dir)
    q = None if a.skip_quality else quality(a.run_dir, a.trials, a.seeds)
    result = {"machine": {"platform": platform.platform(), "host": platform.node(), "ray_cpus": 2},
              "trials": a.trials, "seeds": a.seeds, "overhead": o, "quality": q}
    atomic_write_json(a.out, result)
    print(table(q, o))


if __name__ == "__main__":
    main()
