"""The stage graph and the run-directory manifest that makes `kdsearch run` resumable.

Each stage is a plain function `stage(spec, ctx) -> dict` that can also be called alone. A stage's
input key hashes the spec sections it reads plus the keys of the stages it depends on; the manifest
(runs/<name>/manifest.json, written atomically) records the key of every finished stage. A rerun
skips stages whose key is unchanged and redoes those whose inputs changed, saying which fields did.
Within a stage, work resumes from its own checkpoints (a half-trained teacher continues its epochs).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .context import RunContext
from .errors import StageFailed
from .io import atomic_write_json, stable_hash
from .progress import EtaReporter
from .spec import Spec

log = logging.getLogger("kdsearch.pipeline")

StageFn = Callable[[Spec, RunContext], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: StageFn
    reads: tuple[str, ...]  # top-level spec sections this stage depends on
    after: tuple[str, ...] = ()  # upstream stages


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"arch": m["arch"], "val_acc": m["val_acc"], "test_acc": m["test_acc"],
            "node": (m.get("node") or {}).get("ip")}


def _teachers(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from .stages.teachers import train_teachers

    return {"teachers": {a: _summary(m) for a, m in train_teachers(spec, ctx).items()}}


def _baselines(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from .stages.baselines import train_baselines

    return {k: _summary(m) for k, m in train_baselines(spec, ctx).items()}


def _sensitivity(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from .stages.sensitivity import sensitivity_stage

    return sensitivity_stage(spec, ctx)


def _search(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from .progress import ProgressReporter
    from .stages.search import search_stage

    with ProgressReporter(ctx.run_dir, total=spec.search.num_trials, concurrency=spec.search.max_concurrent,
                          live=ctx.progress):
        summary = search_stage(spec, ctx)
    counts = summary.get("counts", {})
    if not counts.get("completed") and counts.get("error"):
        raise StageFailed(f"search: all {counts['error']} launched trials failed; see the trial errors in "
                          f"{ctx.run_dir / 'search' / 'tune'}/*/error.txt, fix the cause and rerun to retry them")
    return summary


def _finalize(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from .progress import ProgressReporter
    from .stages.finalize import finalize_stage

    with ProgressReporter(ctx.run_dir, stage="finalize", live=ctx.progress):
        return finalize_stage(spec, ctx)


def _report(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from .stages.report import report_stage

    return report_stage(spec, ctx)


# "seed" is seeds[0] (the once-per-run stages); "seeds" the list the students and finalize train over. Within a
# stage each model keeps its own inputs key, so adding a seed trains only the new seed's models.
STAGES: tuple[Stage, ...] = (
    Stage("teachers", _teachers, reads=("seed", "data", "teachers")),
    Stage("baselines", _baselines, reads=("seeds", "data", "student", "distill"), after=("teachers",)),
    Stage("sensitivity", _sensitivity, reads=("seed", "data", "student", "quant", "sensitivity", "search"),
          after=("baselines",)),
    Stage("search", _search, reads=("seed", "data", "student", "distill", "quant", "search"),
          after=("baselines", "sensitivity")),
    Stage("finalize", _finalize, reads=("seeds", "data", "student", "distill", "quant", "search", "finalize"),
          after=("search",)),
    Stage("report", _report, reads=(), after=("finalize",)),
)


def manifest_path(run_dir: Path) -> Path:
    return run_dir / "manifest.json"


def read_manifest(run_dir: Path) -> dict[str, Any]:
    p = manifest_path(run_dir)
    return json.loads(p.read_text()) if p.is_file() else {"stages": {}}


def stage_key(spec: Spec, stage: Stage, keys: dict[str, str]) -> str:
    d = spec.key_dict()
    return stable_hash({"spec": {k: d[k] for k in stage.reads}, "after": {a: keys.get(a) for a in stage.after}})


def _changed_fields(old: dict[str, Any] | None, new: dict[str, Any], reads: tuple[str, ...]) -> list[str]:
    if not old:
        return []
    out = []
    for sec in reads:
        a, b = old.get(sec), new.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{sec}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(sec)
    return out


def _plan(spec: Spec, manifest: dict[str, Any], only: tuple[str, ...] | None) -> list[tuple[Stage, str]]:
    """The stages to visit, in order, each with its input key."""
    keys: dict[str, str] = {}
    plan = []
    for stage in STAGES:
        if only is not None and stage.name not in only:
            continue
        keys[stage.name] = stage_key(spec, stage, keys)
        plan.append((stage, keys[stage.name]))
    return plan


def _is_done(manifest: dict[str, Any], stage: Stage, key: str) -> bool:
    done = manifest["stages"].get(stage.name)
    return bool(done) and done.get("key") == key


def check_stages(spec: Spec, ctx: RunContext, stages: list[str]) -> Any:
    """Before anything runs: every resource request of the stages to run against what the cluster can ever offer
    (`kdsearch.capacity`). Returns the cluster's view, or None when no stage submits Ray work."""
    from .capacity import check_capacity, cluster_view, stage_sections
    from .raycluster import ensure_ray

    if not any(stage_sections(spec, s) for s in stages):
        return None
    ensure_ray(ctx.address, py_modules=ctx.py_modules)
    view = cluster_view()
    check_capacity(spec, stages, view)
    return view


def _waiting(spec: Spec, stage: str, view: Any) -> Any:
    """A `PendingWatch` over the stage's requests on a cluster that can grow; nothing otherwise."""
    import contextlib

    if view is None or not view.can_grow:
        return contextlib.nullcontext()
    from .capacity import PendingWatch, requests_for

    return PendingWatch(requests_for(spec, [stage], view))


def run_pipeline(spec: Spec, ctx: RunContext, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the stages that are not done yet, in order; return every stage's summary."""
    if ctx.address is not None:
        from .raycluster import check_device

        check_device(spec.device, ctx.address)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(ctx.run_dir)
    old_spec = manifest.get("spec")
    spec.save(ctx.run_dir / "spec.yaml")
    plan = _plan(spec, manifest, only)
    view = check_stages(spec, ctx, [s.name for s, k in plan if not _is_done(manifest, s, k)])
    summaries: dict[str, Any] = {}
    for stage, key in plan:
        done = manifest["stages"].get(stage.name)
        if _is_done(manifest, stage, key):
            log.info("stage %s: done, skipping", stage.name)
            summaries[stage.name] = done.get("summary", {})
            continue
        if done:
            old = {**old_spec, "seed": (old_spec.get("seeds") or [old_spec.get("seed")])[0]} if old_spec else None
            fields = _changed_fields(old, spec.key_dict(), stage.reads) or ["an upstream stage"]
            log.info("stage %s: inputs changed (%s); redoing", stage.name, ", ".join(fields))
        log.info("stage %s: running", stage.name)
        t0 = time.perf_counter()
        with _waiting(spec, stage.name, view), EtaReporter(ctx.run_dir, stage.name):
            summary = stage.fn(spec, ctx)
        manifest["stages"][stage.name] = {"key": key, "summary": summary, "seconds": round(time.perf_counter() - t0, 2),
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        manifest["spec"] = spec.to_dict()
        atomic_write_json(manifest_path(ctx.run_dir), manifest)
        summaries[stage.name] = summary
    return summaries
