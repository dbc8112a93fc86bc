"""Stage `baselines`: the FP32 student from scratch and distilled from the ensemble, once per seed.

Per seed s, three Ray tasks with the student's resources: the scratch student, the teacher-logit cache of
seed s's augmentation stream (with `distill.source: cache`; it covers every epoch the KD student and the
finalize QAT+KD runs train, so each sees a fresh view per epoch, the same views as the scratch run), and the
KD student, which waits for its cache. Seeds are independent, so a cluster trains them all at once.

Outputs: students/s<seed>/scratch.pt and kd.pt (+ .json with val/test accuracy, the teacher source, the node),
cache/logits/s<seed>/. The search starts from the KD student of seeds[0].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..context import RunContext
from ..rundir import RunDir
from ..spec import Spec
from .tasks import Resources, Unit, gather, submit

log = logging.getLogger("kdsearch.stages.baselines")


def kd_kind(spec: Spec, strategy: str | None = None) -> str:
    """'kd' for the spec's strategy, 'kd_<strategy>' for any other (ablations)."""
    return "kd" if strategy in (None, spec.distill.strategy) else f"kd_{strategy}"


def _setup(spec_dict: dict[str, Any]) -> tuple[Spec, Any]:
    from ..context import setup_logging
    from ..raycluster import task_device
    from ..runtime import set_cpu_threads
    from ..spec import parse_spec

    setup_logging()
    spec = parse_spec(spec_dict)
    set_cpu_threads(spec.student.cpus)
    return spec, task_device(spec.device)


def _scratch_task(spec_dict: dict[str, Any], run_dir: str, seed: int) -> dict[str, Any]:
    from ..fp32 import import_student, train_float_model

    spec, device = _setup(spec_dict)
    if spec.student.checkpoint is not None:  # the user's trained student stands where the scratch one would
        return import_student(spec, RunDir(run_dir).student("scratch", seed), seed=seed, device=device)
    return train_float_model(spec, spec.student.arch, spec.student.train, RunDir(run_dir).student("scratch", seed),
                             seed=seed, device=device)


def _cache_task(spec_dict: dict[str, Any], run_dir: str, seed: int) -> dict[str, Any]:
    """Compute (or grow) seed `seed`'s logit cache with the teachers on this task's device."""
    from ..data import load_data
    from ..distill import ensure_logit_cache
    from ..raycluster import where

    spec, device = _setup(spec_dict)
    cache = ensure_logit_cache(spec, Path(run_dir), load_data(spec.data), seed, device=device)
    return {"seed": seed, "epochs": cache.epochs, "dir": str(cache.root), "node": where()}


def _kd_task(spec_dict: dict[str, Any], run_dir: str, seed: int, strategy: str, source: str,
             pool_tag: str | None, *_deps: Any) -> dict[str, Any]:
    from ..fp32 import train_kd_student

    spec, device = _setup(spec_dict)
    out = RunDir(run_dir).student(kd_kind(spec, strategy), seed)
    return train_kd_student(spec, Path(run_dir), out, seed=seed, strategy=strategy, source=source, device=device,
                            pool_tag=pool_tag)


def student_units(spec: Spec, run_dir: Path, *, strategies: tuple[str, ...] | None = None,
                  scratch: bool = True) -> tuple[dict[str, Any], Any]:
    """Submit every seed's scratch student, cache and KD students: ({label: ref}, the live teacher pool or
    None; shut it down once the refs are gathered). Needs a connected Ray."""
    res = Resources.for_spec(spec.device, spec.student.cpus, spec.student.gpus)
    strategies = (spec.distill.strategy,) if strategies is None else strategies
    d, rd = spec.to_dict(), str(Path(run_dir).resolve())
    pool = pool_tag = None
    if spec.distill.source == "live":
        from ..data import load_data
        from ..distill import make_pool

        use_gpu = Resources.for_spec(spec.device, spec.teachers.cpus, spec.teachers.gpus).gpus > 0
        pool = make_pool(spec, Path(rd), load_data(spec.data), use_gpu=use_gpu)
        pool_tag = pool.tag
    refs: dict[str, Any] = {}
    for s in spec.seeds:
        if scratch:
            refs[f"scratch s{s}"] = submit(Unit(f"scratch student s{s}", _scratch_task, (d, rd, s), resources=res))
        deps = []
        if spec.distill.source == "cache" and strategies:
            deps = [submit(Unit(f"logit cache s{s}", _cache_task, (d, rd, s), resources=res))]
        for strat in strategies:
            refs[f"{kd_kind(spec, strat)} s{s}"] = submit(
                Unit(f"KD-{strat} student s{s}", _kd_task, (d, rd, s, strat, spec.distill.source, pool_tag),
                     resources=res), *deps)
    return refs, pool


def train_baselines(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Every seed's scratch and KD students: {'scratch s0': metrics, 'kd s0': metrics, ...}."""
    from ..raycluster import ensure_ray

    ensure_ray(ctx.address, py_modules=ctx.py_modules)
    refs, pool = student_units(spec, ctx.run_dir)
    try:
        out = gather("baselines", refs)
    finally:
        if pool is not None:
            pool.shutdown()
    for label, m in sorted(out.items()):
        log.info("student %s (%s): val %.2f%%, test %.2f%% (node %s)", spec.student.arch, label, m["val_acc"],
                 m["test_acc"], (m.get("node") or {}).get("ip"))
    return out
