"""Stage `teachers`: the ensemble, one Ray task per teacher (a GPU each on a cluster), trained or imported.

Teachers are trained once per run, under spec.seeds[0]; each resumes from its own per-epoch checkpoint, and a
finished file made from the same inputs is reused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..context import RunContext
from ..rundir import RunDir
from ..spec import Spec
from .tasks import Resources, Unit, gather, submit

log = logging.getLogger("kdsearch.stages.teachers")


def _teacher_task(spec_dict: dict[str, Any], arch: str, run_dir: str) -> dict[str, Any]:
    """Body of one Ray task: a worker trains (or imports) one teacher on the device Ray gave it."""
    from ..context import setup_logging
    from ..fp32 import import_teacher, train_float_model
    from ..raycluster import task_device
    from ..runtime import set_cpu_threads
    from ..spec import parse_spec

    setup_logging()
    spec = parse_spec(spec_dict)
    set_cpu_threads(spec.teachers.cpus)
    device = task_device(spec.device)
    tcfg = next(t for t in spec.teachers.models if t.arch == arch)
    out = RunDir(run_dir).teacher(arch)
    if tcfg.checkpoint:
        return import_teacher(spec, arch, tcfg.checkpoint, out, device=device)
    return train_float_model(spec, arch, spec.teachers.train, out, seed=spec.seed, device=device)


def train_teachers(spec: Spec, ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Train every teacher of the spec at once, one Ray task each; {arch: metrics}."""
    from ..raycluster import ensure_ray

    ensure_ray(ctx.address, py_modules=ctx.py_modules)
    res = Resources.for_spec(spec.device, spec.teachers.cpus, spec.teachers.gpus)
    run_dir = str(Path(ctx.run_dir).resolve())
    refs = {t.arch: submit(Unit(f"teacher {t.arch}", _teacher_task, (spec.to_dict(), t.arch, run_dir), resources=res))
            for t in spec.teachers.models}
    results = gather("teachers", refs)
    for arch, m in results.items():
        log.info("teacher %s: val %.2f%%, test %.2f%% (node %s)", arch, m["val_acc"], m["test_acc"],
                 (m.get("node") or {}).get("ip"))
    return results
