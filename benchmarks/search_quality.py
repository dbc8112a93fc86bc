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

Overhead: seconds per zero-work trial (one epoch, one report, no training) over a 24-layer space, through
  * the full stack (BudgetSearch with its journal-backed study + trial records + per-epoch checkpoints +
    result tables), and
  * bare Tune (a function trainable reporting once, Tune's own random search),
run side by side in one Ray (interleaved, best of `--overhead-repeats`), each measured two ways:
  * steady: the interval between trial starts (stamped in the workers) once running, from the 5th trial
    to the last: what each further trial costs, the orchestration overhead proper;
  * end_to_end: wall time of the whole run / trials: the steady cost plus the run's fixed start-up and
    teardown (Tune's set-up, the trial actors' processes and imports) spread over the trials;
and the searcher alone (suggest + result + complete + a snapshot every 10 trials, no Tune): pure Optuna
plus bookkeeping. `--overhead-label before|after` stores a run under its label (the others are kept), so
the numbers of two versions of the code sit side by side in the JSON; each entry names its commit.

    PYTHONPATH=. python benchmarks/search_quality.py [--seeds 0 1 2] [--trials 12] [--overhead-trials 64]
    PYTHONPATH=. python benchmarks/search_quality.py --skip-quality --overhead-label after
Writes benchmarks/results/search_quality.json (keeping the sections it did not run) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXCLUDE_ABOVE = 0.5  # KL threshold of the guided variant's exclusions (sensitivity.exclude_above)


OVERHEAD_LAYERS = 24
STEADY_FROM = 4  # trial starts before this one are the warm-up (the second actor starting, first imports)


def _stamp(path: str) -> None:
    """Append this moment to `path` (one short O_APPEND write: atomic between the trial processes)."""
    with open(path, "a") as f:
        f.write(f"{time.time()!r}\n")


def _bare_trial(config: dict[str, Any]) -> None:
    from ray import tune

    _stamp(config["stamps"])
    tune.report({"acc": float(config["x"])})


def _full_trial(config: dict[str, Any], payload: tuple[str, Any]) -> None:
    from kdsearch.search.synthetic import synthetic_trial

    stamps, inner = payload
    _stamp(stamps)
    synthetic_trial(config, inner)


def _timings(seconds: float, n: int, stamps: Path) -> dict[str, float]:
    starts = sorted(float(x) for x in stamps.read_text().split())
    if len(starts) != n or n <= STEADY_FROM + 1:
        raise RuntimeError(f"{stamps}: {len(starts)} trial starts for {n} trials")
    return {"steady": (starts[-1] - starts[STEADY_FROM]) / (n - 1 - STEADY_FROM), "end_to_end": seconds / n}


def _full(n: int, d: Path) -> dict[str, float]:
    import shutil

    from kdsearch.search import run_search
    from kdsearch.search.synthetic import SyntheticPayload, toy_space
    from kdsearch.spec import SearchConfig

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    space = toy_space(layers=OVERHEAD_LAYERS, budget_fraction=0.6)
    cfg = SearchConfig(budgets_mb=(space.budget_mb,), num_trials=n, trial_epochs=1, asha=False, max_concurrent=2)
    t0 = time.perf_counter()
    run_search(space, cfg, out_dir=d, trainable=_full_trial, seed=0,
               payload=(str(d / "starts"), SyntheticPayload(str(d / "trials"), space, epochs=1, epoch_s=0.0)))
    return _timings(time.perf_counter() - t0, n, d / "starts")


def _bare(n: int, d: Path) -> dict[str, float]:
    import shutil

    from ray import tune

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    tune.Tuner(_bare_trial, param_space={"x": tune.choice(list(range(100))), "stamps": str(d / "starts")},
               tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=2, reuse_actors=True),
               run_config=tune.RunConfig(name="bare", storage_path=str(d), verbose=0)).fit()
    return _timings(time.perf_counter() - t0, n, d / "starts")


def _searcher_only(n: int, d: Path) -> dict[str, float]:
    """suggest + result + complete per trial and a snapshot (save) every 10 trials, without Tune."""
    import shutil

    from kdsearch.pareto import ACC, SIZE
    from kdsearch.search import BudgetSearch, make_sampler
    from kdsearch.search.results import ResultsWriter
    from kdsearch.search.synthetic import synthetic_accuracy, toy_space

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    space = toy_space(layers=OVERHEAD_LAYERS, budget_fraction=0.6)
    kwargs: dict[str, Any] = {"writer": ResultsWriter(d, space.layers, space.budget_mb)}
    try:  # the journal-backed study where this version of the searcher has one
        search = BudgetSearch(space, sampler=make_sampler("tpe", 0, n), trial_epochs=1, journal=d / "journal", **kwargs)
    except TypeError:
        search = BudgetSearch(space, sampler=make_sampler("tpe", 0, n), trial_epochs=1, **kwargs)
    t0 = time.perf_counter()
    for i in range(n):
        bits = search.suggest(f"t{i}")["bits"]
        res = {"epoch": 1, ACC: synthetic_accuracy(bits, 1, 1), SIZE: space.size_mb(bits)}
        search.on_trial_result(f"t{i}", res)
        search.on_trial_complete(f"t{i}", res)
        if i % 10 == 9:
            search.save(str(d / "searcher-state.pkl"))
    return {"steady": (time.perf_counter() - t0) / n, "infeasible_samples": search.skipped["infeasible"]}


def overhead(n: int, out: Path, repeats: int = 2) -> dict[str, Any]:
    """Seconds per zero-work trial, full stack and bare Tune side by side (best of `repeats` interleaved runs)."""
    from kdsearch.io import git_commit

    _bare(STEADY_FROM + 4, out / "overhead_warmup")  # Ray's worker pool and imports, once
    runs: dict[str, list[dict[str, float]]] = {"full_stack": [], "bare_tune": []}
    for _ in range(repeats):
        runs["bare_tune"].append(_bare(n, out / "overhead_bare"))
        runs["full_stack"].append(_full(n, out / "overhead_full"))
    res: dict[str, Any] = {"trials": n, "layers": OVERHEAD_LAYERS, "concurrent": 2, "repeats": repeats,
                           "commit": git_commit(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    for name, rs in runs.items():
        for how in ("steady", "end_to_end"):
            res[f"{name}_{how}_s_per_trial"] = min(r[how] for r in rs)
            res[f"{name}_{how}_all"] = [round(r[how], 4) for r in rs]
    for how in ("steady", "end_to_end"):
        res[f"full_over_bare_{how}"] = res[f"full_stack_{how}_s_per_trial"] / res[f"bare_tune_{how}_s_per_trial"]
        res[f"full_over_bare_{how}_per_repeat"] = [round(f[how] / b[how], 2)  # each pair ran back to back
                                                   for f, b in zip(runs["full_stack"], runs["bare_tune"])]
    only = _searcher_only(n, out / "overhead_searcher")
    res["searcher_only_s_per_trial"], res["searcher_infeasible_samples"] = only["steady"], only["infeasible_samples"]
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
    from kdsearch.fp32 import train_float_model, train_kd_student
    from kdsearch.raycluster import ensure_ray
    from kdsearch.rundir import RunDir
    from kdsearch.stages.sensitivity import sensitivity_stage

    ctx = RunContext.create(run_dir, device="cpu", progress=False)
    rd = RunDir(run_dir)
    ensure_ray(None, num_cpus=2)
    spec = bench_spec(trials)
    m = create_model(spec.student.arch, num_classes=10)
    budget = model_size(m, BitConfig.uniform(m, 4, pin=dict(spec.quant.pin)), act_bits=spec.quant.act_bits).total_mb
    spec = bench_spec(trials, round(budget, 6))
    for t in spec.teachers.models:  # one small teacher: in-process
        train_float_model(spec, t.arch, spec.teachers.train, rd.teacher(t.arch), seed=spec.seed, device=ctx.device)
    kd = train_kd_student(spec, run_dir, rd.student("kd", spec.seed), seed=spec.seed,
                          strategy=spec.distill.strategy, source=spec.distill.source, device=ctx.device)
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
    from kdsearch.pareto import ACC
    from kdsearch.search import read_results
    from kdsearch.spec import parse_spec
    from kdsearch.stages.search import search_stage
    from kdsearch.stages.sensitivity import sensitivity_stage

    spec, ctx, kd = prepare(run_dir, trials)
    out: dict[str, Any] = {"budget_mb": spec.search.budgets_mb[0], "kd_student_val_acc": kd["val_acc"],
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
                "best_val_acc": float(done[ACC].max()) if len(done) else None,
                "min_size_mb": float(done["size_mb"].min()) if len(done) else None,
                "infeasible": summary["counts"]["infeasible"], "duplicates": summary["counts"]["duplicate"],
                "seconds": time.perf_counter() - t0}
    return out


def table(q: dict[str, Any] | None, o: dict[str, float] | None) -> str:
    lines = []
    if q:
        lines += [f"budget {q['budget_mb']:.6f} MB; float KD student {q['kd_student_val_acc']:.2f} % (val)", "",
                  "| method | hypervolume (mean ± sd) | best val acc % (mean) | smallest trained MB (mean) "
                  "| infeasible samples (mean) | runs |",
                  "|---|---|---|---|---|---|"]
        for name in METHODS:
            rs = [r for k, r in q["runs"].items() if k.split("|")[0] == name]
            hv = [r["hypervolume"] for r in rs]
            acc = [r["best_val_acc"] for r in rs if r["best_val_acc"] is not None]
            sd = statistics.stdev(hv) if len(hv) > 1 else 0.0
            lines.append(f"| {name} | {statistics.mean(hv):.4f} ± {sd:.4f} | "
                         f"{statistics.mean(acc) if acc else float('nan'):.2f} | "
                         f"{statistics.mean(r['min_size_mb'] for r in rs if r['min_size_mb']):.4f} | "
                         f"{statistics.mean(r['infeasible'] for r in rs):.1f} | {len(rs)} |")
    for label, r in (o or {}).items():
        lines += ["", f"zero-work trials, {r['layers']} layers, {r['trials']} trials, {r['concurrent']} concurrent "
                      f"({label}, commit {str(r.get('commit'))[:10]})",
                  "| seconds per trial | steady | end to end |", "|---|---|---|"]
        for name in ("full_stack", "bare_tune"):
            lines.append(f"| {name} | {r[f'{name}_steady_s_per_trial']:.4f} | {r[f'{name}_end_to_end_s_per_trial']:.4f} |")
        lines.append(f"| full / bare | {r['full_over_bare_steady']:.2f} | {r['full_over_bare_end_to_end']:.2f} |")
        lines.append(f"| searcher only | {r['searcher_only_s_per_trial']:.4f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--overhead-trials", type=int, default=64)
    ap.add_argument("--overhead-repeats", type=int, default=2)
    ap.add_argument("--overhead-label", default="after", help="store the overhead numbers under this label")
    ap.add_argument("--overhead-commit", help="the commit measured, when the kdsearch on PYTHONPATH is no checkout")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "bench_search")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_quality.json")
    a = ap.parse_args()
    import ray

    from kdsearch.context import setup_logging
    from kdsearch.io import atomic_write_json

    setup_logging()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    result = json.loads(a.out.read_text()) if a.out.is_file() else {}  # keep the sections not rerun
    old = result.get("overhead")  # labelled runs; the earlier flat layout (one unlabelled run) is dropped
    result["overhead"] = old if isinstance(old, dict) and all(isinstance(v, dict) for v in old.values()) else {}
    if not a.skip_overhead:
        o = overhead(a.overhead_trials, a.run_dir, a.overhead_repeats)
        result["overhead"][a.overhead_label] = o | ({"commit": a.overhead_commit} if a.overhead_commit else {})
    if not a.skip_quality:
        result.update(trials=a.trials, seeds=a.seeds, quality=quality(a.run_dir, a.trials, a.seeds))
    result["machine"] = {"platform": platform.platform(), "host": platform.node(), "ray_cpus": 2,
                         "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    atomic_write_json(a.out, result)
    print(table(result.get("quality"), result["overhead"]))


if __name__ == "__main__":
    main()
