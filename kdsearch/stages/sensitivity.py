"""Stage `sensitivity`: the layer-wise sensitivity table of the KD student of seeds[0], its priors and plot.

Measured in one Ray task with the student's resources (a GPU on a cluster), on a seeded calibration subset of
the training split; the table is reused while the model file and the calibration settings are unchanged, and
the priors (budgets, metric, exclusion threshold) are recomputed on every call, which costs milliseconds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..context import RunContext
from ..rundir import RunDir
from ..spec import Spec
from .tasks import Resources, Unit, gather, submit

log = logging.getLogger("kdsearch.stages.sensitivity")


def float_student_path(rd: RunDir, seed: int) -> Path:
    """The KD student when the baselines stage made one, else the scratch student."""
    kd = rd.student("kd", seed)
    return kd if kd.is_file() else rd.student("scratch", seed)


def _sensitivity_task(spec_dict: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import pandas as pd

    from ..checkpoints import CheckpointError, load_model
    from ..context import setup_logging
    from ..data import image_shape
    from ..io import atomic_to_parquet, atomic_write_json, file_digest
    from ..quant import float_parts
    from ..raycluster import task_device, where
    from ..runtime import set_cpu_threads
    from ..sensitivity import build_priors, compute_table, plot_sensitivity, table_key
    from ..spec import parse_spec

    setup_logging()
    spec = parse_spec(spec_dict)
    set_cpu_threads(spec.student.cpus)
    device = task_device(spec.device)
    rd = RunDir(run_dir)
    out_dir = rd.sensitivity_dir
    model_path = float_student_path(rd, spec.seed)
    if not model_path.is_file():
        raise CheckpointError(f"no float student at {model_path}; run `kdsearch train {spec.name} --model student` "
                              "(or the baselines stage) first")
    model, _ = load_model(model_path)
    key = table_key(spec, file_digest(model_path))
    table_path, meta_path = out_dir / "sensitivity.parquet", out_dir / "sensitivity.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if table_path.is_file() and meta_path.is_file() else {}
    if meta.get("inputs_key") == key:
        log.info("sensitivity: table for %s is current; reusing %s", model_path.name, table_path)
        table, reused = pd.read_parquet(table_path), True
    else:
        log.info("sensitivity: measuring %s on %d calibration images (%s, node %s)", model_path.name,
                 spec.sensitivity.calib_size, device, where()["ip"])
        table, meta = compute_table(spec, model.to(device), device)
        meta.update(inputs_key=key, model=str(model_path), arch=spec.student.arch, node=where())
        atomic_to_parquet(table, table_path)
        atomic_write_json(meta_path, meta)
        reused = False
        log.info("sensitivity: %d rows in %.1f s (%s)", len(table), meta["seconds"]["total"], meta["seconds"])
    model = model.cpu()
    shape = image_shape(spec.data) if spec.search.budgets_gbops else (3, 32, 32)  # BOPs starts need the real one
    priors = build_priors(spec, table, int(meta["fixed_bytes"]), model, input_size=shape)
    priors["float"] = [asdict(p) for p in float_parts(model)]  # what stays in float, and why (the report lists it)
    atomic_write_json(rd.priors_file, priors)
    plot_sensitivity(table, out_dir / "sensitivity.png")
    return {"table": str(table_path), "rows": len(table), "reused": reused, "model": model_path.name,
            "seconds": meta.get("seconds", {}), "metric": priors["metric"], "node": meta.get("node") or where(),
            "warm_starts": sum(r["feasible"] for r in priors["warm_starts"]),
            "excluded": sum(len(v) for v in priors["excluded"].values())}


def sensitivity_stage(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Compute (or reuse) the table for the float student in a Ray task, then its priors and plot."""
    from ..raycluster import ensure_ray

    ensure_ray(ctx.address, py_modules=ctx.py_modules)
    res = Resources.for_spec(spec.device, spec.student.cpus, spec.student.gpus)
    ref = submit(Unit("sensitivity table", _sensitivity_task, (spec.to_dict(), str(Path(ctx.run_dir).resolve())),
                      resources=res))
    return gather("sensitivity", {"sensitivity": ref})["sensitivity"]
