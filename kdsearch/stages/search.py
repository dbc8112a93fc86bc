"""Stage `search`: the bit-width search of a spec, from the float KD student and the sensitivity priors.

Inputs (from earlier stages): runs/<name>/students/s<seeds[0]>/kd.pt, the trained teachers (for the logit cache or the
actor pool), runs/<name>/sensitivity/priors.json (optional: without it the search has no exclusions and
only the uniform warm starts). Outputs: runs/<name>/search/ (see `results`), plus pareto.png.

Rerunning continues the experiment (`run_search` restores it). If the inputs changed (another budget,
other bit-widths, a retrained student, ...), the old search folder is kept under search.stale-<time>/
and a new search starts: restoring a Tune experiment over a different space would mix two searches.

Multi-node clusters: Tune's checkpoints and the trial records live under runs/<name>/search/, so the run
directory must be on a file system every node sees (NFS, ...), as Ray Tune requires of its storage_path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..context import RunContext
from ..io import atomic_write_json, file_digest, stable_hash
from ..pareto import ACC
from ..spec import Spec
from ..search.results import read_results, read_summary, search_dir

log = logging.getLogger("kdsearch.search")

KEY_FILE = "search_key.json"


def search_key(spec: Spec, student: Path, priors: dict[str, Any] | None) -> str:
    """What a search depends on; a restored experiment must have been started from the same."""
    from ..qat import recipe_key

    d = spec.key_dict()  # the sensitivity settings act through `priors` (None when the search ignores them)
    return stable_hash({k: d[k] for k in ("seed", "data", "distill", "quant", "search")}
                       | {"student": file_digest(student), "priors": priors, "recipe": recipe_key(spec)})


def _claim_dir(out: Path, key: str) -> None:
    """Keep `out` when it belongs to this key, else move it aside; then record the key."""
    kf = out / KEY_FILE
    if out.is_dir() and any(out.iterdir()):
        import json

        old = json.loads(kf.read_text()).get("key") if kf.is_file() else None
        if old != key:
            stale = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("search: inputs changed since %s was started; moving it to %s", out, stale)
            out.rename(stale)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(kf, {"key": key})


def _load_priors(spec: Spec, run_dir: Path) -> dict[str, Any] | None:
    from ..checkpoints import CheckpointError
    from ..sensitivity import load_priors

    try:
        return load_priors(run_dir)
    except CheckpointError as err:
        log.warning("search: %s; searching without sensitivity priors (uniform warm starts only)", err)
        return None


def search_stage(spec: Spec, ctx: RunContext, *, out_dir: Path | None = None, use_priors: bool = True,
                 sampler_seed: int | None = None) -> dict[str, Any]:
    """Run (or resume) the search of `spec` in `ctx.run_dir`; write the tables and pareto.png; return a summary.

    `out_dir` (default runs/<name>/search), `use_priors=False` (ignore the sensitivity priors) and
    `sampler_seed` (default spec.seed; the data and model seeds stay) are for benchmarks and ablations.
    """
    from ..checkpoints import CheckpointError, load_model, read_model_file
    from ..data import image_shape, load_data
    from ..distill import logit_cache_dir, make_pool
    from ..capacity import cluster_view, gpus_for
    from ..raycluster import ensure_ray
    from ..rundir import RunDir
    from ..search.runner import run_search
    from ..search.space import build_space, prior_candidates, uniform_configs
    from ..search.trial import QatPayload, qat_trial

    run_dir = ctx.run_dir.resolve()
    student = RunDir(run_dir).student("kd", spec.seed)
    if not student.is_file():
        raise CheckpointError(f"no KD student at {student}; run the baselines stage (`kdsearch run {spec.name}`) first")
    model, _ = load_model(student)
    priors = _load_priors(spec, run_dir) if use_priors else None
    starts, excluded = prior_candidates(priors)
    shape = image_shape(spec.data)
    space = build_space(model, spec.quant, _first(spec.search.budgets_mb), excluded,
                        budget_gbops=_first(spec.search.budgets_gbops), input_size=shape)
    warm = (starts + uniform_configs(space, spec.quant.bits)) if spec.search.warm_start else []

    out = Path(out_dir).resolve() if out_dir is not None else search_dir(run_dir)
    seed = spec.seed if sampler_seed is None else int(sampler_seed)
    key = search_key(spec, student, priors) + (f"-s{seed}" if seed != spec.seed else "")
    _claim_dir(out, key)
    ensure_ray(ctx.address, py_modules=ctx.py_modules)
    use_gpu = gpus_for(spec.device, spec.search.gpus_per_trial, cluster_view()) > 0
    teachers: Any = None
    reserved = 0.0
    try:
        if spec.distill.source == "cache":
            cache_dir = logit_cache_dir(run_dir, spec.seed)
            if not (cache_dir / "meta.json").is_file():  # made by the baselines stage; rebuilt (as a task) if lost
                from .baselines import _cache_task
                from .tasks import Resources, Unit, gather, submit

                res = Resources.for_spec(spec.device, spec.student.cpus, spec.student.gpus)
                gather("search", {f"logit cache s{spec.seed}": submit(
                    Unit(f"logit cache s{spec.seed}", _cache_task, (spec.to_dict(), str(run_dir), spec.seed),
                         resources=res))})
            payload = QatPayload(spec.to_dict(), str(out / "trials"), str(student), space, "cache",
                                 cache_dir=str(cache_dir), cpus=spec.search.cpus_per_trial, key=key)
        else:  # one actor pool, started here and shared by every trial
            teachers = make_pool(spec, run_dir, load_data(spec.data), use_gpu=use_gpu)
            reserved = 0.0 if use_gpu else spec.teachers.cpus * len(spec.teachers.models)
            payload = QatPayload(spec.to_dict(), str(out / "trials"), str(student), space, "live",
                                 pool_tag=teachers.tag, teachers=tuple(teachers.teachers),
                                 cpus=spec.search.cpus_per_trial, key=key)
        summary = run_search(space, spec.search, out_dir=out, trainable=qat_trial, payload=payload, seed=seed,
                             warm_starts=warm, use_gpu=use_gpu, reserved_cpus=reserved)
    finally:
        if teachers is not None:
            teachers.shutdown()
    kd_acc = read_model_file(student).get("metrics", {}).get("val_acc")
    plot = write_pareto_plot(spec, out, model, kd_acc, shape)
    summary = read_summary(out) | {"seconds": summary.get("seconds"), "tune_errors": summary.get("tune_errors")}
    log.info("search: %d trials launched (%s), hypervolume %.4g, front of %d; tables in %s",
             summary.get("launched", 0), summary.get("counts"), summary.get("hypervolume", 0.0),
             summary.get("front", 0), out)
    return {**summary, "results": str(out / "results.parquet"), "pareto": str(out / "pareto.parquet"),
            "plot": str(plot)}


def _first(budgets: tuple[float, ...]) -> float | None:
    return budgets[0] if budgets else None


def write_pareto_plot(spec: Spec, out: Path, model: Any, kd_acc: float | None,
                      shape: tuple[int, ...] | None = None) -> Path:
    """out/pareto.png: the trials, the front, the budgets, uniform 16/8/4 (pins kept) and the float KD student,
    against size and against BOPs (on `shape`, default the data's image shape)."""
    from ..data import image_shape
    from ..plots import Marker, plot_pareto
    from ..quant import BitConfig, model_bops, model_size

    df = read_results(out)
    trained = df[df["status"] == "completed"]
    bit_cols = [c for c in df.columns if c.startswith("bits.")]
    markers = []
    shape = shape or image_shape(spec.data)
    for b in (16, 8, 4):
        cfg = BitConfig.uniform(model, b, pin=dict(spec.quant.pin))
        size = model_size(model, cfg, act_bits=spec.quant.act_bits).total_mb
        row = {f"bits.{n}": v for n, v in cfg.items()}
        hit = trained[(trained[bit_cols] == _as_series(row, bit_cols)).all(axis=1)] if len(trained) else trained
        gbops = model_bops(model, cfg, act_bits=spec.quant.act_bits, input_size=shape).gbops
        markers.append(Marker(f"uniform {b}-bit", size, float(hit[ACC].iloc[0]) if len(hit) else None, gbops))
    markers.append(Marker("float KD student (val)", model_size(model).total_mb, kd_acc,
                          model_bops(model, input_size=shape).gbops))
    path = out / "pareto.png"
    return plot_pareto(df, path, budget_mb=_first(spec.search.budgets_mb), markers=markers,
                       budget_gbops=_first(spec.search.budgets_gbops),
                       title=f"{spec.name}: {spec.student.arch}, {spec.search.sampler} search")


def _as_series(row: dict[str, int], cols: list[str]) -> Any:
    import pandas as pd

    return pd.Series({c: row.get(c, -1) for c in cols})
