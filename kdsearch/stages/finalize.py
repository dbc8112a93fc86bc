"""Stage `finalize`: the longer QAT(+KD) of the chosen configurations, once per seed, each exported and measured.

Which configurations: `kdsearch.selection` (chosen on validation accuracy). Every (configuration, seed) is one
Ray task with the student's resources, so a cluster trains them all at once. Scratch baselines start from the
scratch student of the same seed and train with cross-entropy only; every other model starts from that seed's
KD student and trains with the ensemble KD loss on fresh views every epoch (the seed's logit cache covers every
QAT epoch, or the live teacher pool answers), the same views the scratch QAT run sees. All use ``quant.qat``.

Each export is verified where it was made: the packed file is reloaded (`load_quantized`) and must reproduce the
trained model's validation accuracy up to one image; then the reloaded file, which is what ships, is measured
once on the test split. That number is the one the report shows.

Outputs in runs/<name>/final/: ``<id>.s<seed>.kdq`` and ``.json`` (metrics, bits, the node it ran on),
``final.parquet`` (one row per model and seed) and ``progress.json`` (what is done and running, for
``kdsearch status``). Resume: a (model, seed) whose json was made from the same inputs is skipped; one in
progress continues from its per-epoch checkpoint when every input is unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from ..context import RunContext
from ..io import atomic_to_parquet, atomic_write_json, stable_hash
from ..rundir import RunDir
from ..selection import (
    Candidate, allocation_candidates, bits_used, merge_candidates, searched_candidates, uniform_candidates,
)
from ..spec import Spec
from .tasks import Resources, Unit, gather, submit

log = logging.getLogger("kdsearch.stages.finalize")


def _file_key(path: Path) -> str:
    from ..checkpoints import read_model_file
    from ..io import file_digest

    return read_model_file(path).get("meta", {}).get("inputs_key") or file_digest(path)


def model_key(spec: Spec, rd: RunDir, cand: Candidate, seed: int) -> str:
    """Every input of one finalized model: its start model, bits, QAT, KD, teachers, data, pins, seed."""
    from ..distill import teachers_key
    from ..qat import recipe_key
    from ..recipes import data_key, kd_settings

    kd = ({"distill": kd_settings(spec, spec.distill.strategy), "teachers": teachers_key(spec, rd.root),
           "source": spec.distill.source} if cand.kd else None)
    return stable_hash({"student": _file_key(rd.student(cand.start, seed)), "bits": dict(cand.bits), "kd": kd,
                        "qat": spec.quant.qat.model_dump(mode="json") if cand.trains else None,
                        "recipe": recipe_key(spec), "trains": cand.trains, "act_bits": spec.quant.act_bits,
                        "pin": spec.quant.pin, "data": data_key(spec), "seed": seed})


def _finalize_task(spec_dict: dict[str, Any], run_dir: str, cand: dict[str, Any], seed: int,
                   pool_tag: str | None, *_deps: Any) -> dict[str, Any]:
    """Body of one Ray task: QAT(+KD) one configuration under one seed, export, verify, measure test once."""
    from ..context import setup_logging
    from ..data import EvalLoader, Normalizer, load_data
    from ..distill import teacher_source
    from ..qat import qat_finetune
    from ..quant import dead_channels, export_quantized, load_quantized, model_bops, model_size
    from ..raycluster import task_device, where
    from ..runtime import set_cpu_threads
    from ..spec import parse_spec
    from ..train import evaluate

    setup_logging()
    spec = parse_spec(spec_dict)
    set_cpu_threads(spec.student.cpus)
    device = task_device(spec.device)
    c = Candidate(**{**cand, "roles": tuple(cand["roles"])})
    rd = RunDir(run_dir)
    key = model_key(spec, rd, c, seed)
    js, kdq = rd.final_model(c.id, seed, ".json"), rd.final_model(c.id, seed)
    if js.is_file() and kdq.is_file():
        old = json.loads(js.read_text())
        if old.get("inputs_key") == key:
            log.info("finalize: %s seed %d is done (same inputs); skipping", c.id, seed)
            return {**old, "roles": list(c.roles), "reused": True}
    ckpt = rd.final_model(c.id, seed, ".ckpt")
    attempts = _record_attempt(rd.final_model(c.id, seed, ".attempts.json"), key, ckpt)
    t0 = time.perf_counter()
    bundle = load_data(spec.data)
    teacher = None
    if c.kd and c.trains:
        teacher = teacher_source(spec, rd.root, spec.distill.source, bundle=bundle, device=device, seed=seed,
                                 pool_tag=pool_tag)
    cfg = spec.quant.qat
    if c.trains:
        log.info("finalize: %s seed %d (%s; %s), %d epochs of QAT%s from the %s student", c.id, seed, c.label,
                 ", ".join(c.roles), cfg.epochs, "+KD" if c.kd else "", c.start)
    else:
        log.info("finalize: %s seed %d (%s): post-training quantization of the %s student, no training", c.id,
                 seed, c.label, c.start)
    model, m = qat_finetune(spec, rd.student(c.start, seed), c.bits, cfg, device=device, seed=seed, teacher=teacher,
                            ckpt_path=ckpt, bundle=bundle, desc=f"finalize {c.id} s{seed}", resume_key=key,
                            train=c.trains)
    size = model_size(model)
    gbops = model_bops(model, input_size=bundle.image_shape).gbops  # the widths its modules run with
    dead = dead_channels(model)  # export refuses any; recorded so that the table can say it counted them
    file_bytes = export_quantized(model, kdq, arch=spec.student.arch, num_classes=bundle.num_classes,
                                  input_shape=bundle.image_shape,
                                  metadata={"id": c.id, "seed": seed, "spec": spec.name, "data_version": bundle.version,
                                            "kwargs": spec.model_kwargs(spec.student.arch)})
    norm = Normalizer.from_bundle(bundle)
    reloaded = load_quantized(kdq).to(device)
    val = EvalLoader(bundle.val, batch_size=spec.data.eval_batch_size, device=device)
    export_val = evaluate(reloaded, val, norm, device, cfg)["acc"]
    ok = abs(export_val - m["val_acc"]) <= 100.0 / max(1, len(bundle.val)) + 1e-9  # one validation image
    if not ok:
        log.error("finalize: %s seed %d reloads at %.3f%% but trained at %.3f%% (validation): the export does not "
                  "reproduce the model", c.id, seed, export_val, m["val_acc"])
    test = EvalLoader(bundle.test, batch_size=spec.data.eval_batch_size, device=device)
    test_acc = evaluate(reloaded, test, norm, device, cfg)["acc"]  # the one read of test: the shipped file
    metrics = {
        **asdict(c), "roles": list(c.roles), "bits": None, "seed": seed, "arch": spec.student.arch,
        "bit_config": dict(c.bits), "bits_used": list(bits_used(c.bits)), "val_acc": m["val_acc"],
        "export_val_acc": export_val, "export_ok": ok, "test_acc": test_acc, "size_mb": size.total_mb, "gbops": gbops,
        "total_bytes": size.total_bytes, "file_bytes": file_bytes, "avg_bits": size.avg_bits, "fp32_mb": size.fp32_mb,
        "compression": size.compression, "epochs": cfg.epochs if c.trains else 0, "file": kdq.name,
        "dead_channels": len(dead), "bn_reestimated": m.get("bn_reestimated", 0),
        "val_acc_before_bn": m.get("val_acc_before_bn"),
        "source": spec.distill.source if c.kd else None, "seconds": time.perf_counter() - t0,
        "data_version": bundle.version, "inputs_key": key, "device": str(device), "node": where(),
        "attempts": attempts, "epochs_run": m["epochs_run"], "history": m["history"],
    }
    atomic_write_json(js, metrics)
    ckpt.unlink(missing_ok=True)
    log.info("finalize: %s seed %d: val %.2f%% (reloaded %.2f%%), test %.2f%%, %.4f MB (%d bytes on disk)", c.id, seed,
             m["val_acc"], export_val, test_acc, size.total_mb, file_bytes)
    return metrics


def _record_attempt(path: Path, key: str, ckpt: Path) -> list[dict[str, Any]]:
    """Append this attempt (the epoch its checkpoint lets it start from, the node) to `path`; return them all.

    A task retried after its node died shows up as a second attempt that starts where the first one's last
    per-epoch checkpoint left off: the record that no configuration is trained twice.
    """
    import torch

    from ..raycluster import where

    old = json.loads(path.read_text()) if path.is_file() else {}
    attempts = old.get("attempts", []) if old.get("inputs_key") == key else []
    start = 0
    if ckpt.is_file():
        start = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", 0))
    attempts.append({"start_epoch": start, "node": where()})
    atomic_write_json(path, {"inputs_key": key, "attempts": attempts})
    return attempts


def _cache_deps(spec: Spec, rd: RunDir, res: Resources) -> dict[int, list[Any]]:
    """Per seed, a task that grows the logit cache to cover every QAT epoch before that seed's KD models run."""
    from .baselines import _cache_task

    if spec.distill.source != "cache":
        return {s: [] for s in spec.seeds}
    return {s: [submit(Unit(f"logit cache s{s}", _cache_task, (spec.to_dict(), str(rd.root), s), resources=res))]
            for s in spec.seeds}


TABLE_COLUMNS = ["id", "seed", "kind", "label", "roles", "start", "kd", "source", "bits_used", "val_acc",
                 "export_val_acc", "export_ok", "test_acc", "size_mb", "gbops", "total_bytes", "file_bytes", "avg_bits",
                 "compression", "epochs", "trial_number", "search_acc", "bits", "file", "node", "dead_channels"]


def final_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """final.parquet: one row per (model, seed), lists flattened to strings ('8/4', 'conv1=8,...')."""
    flat = []
    for r in rows:
        flat.append({**{c: r.get(c) for c in TABLE_COLUMNS}, "roles": "; ".join(r["roles"]),
                     "bits_used": "/".join(map(str, r["bits_used"])),
                     "bits": ",".join(f"{k}={v}" for k, v in r["bit_config"].items()),
                     "node": (r.get("node") or {}).get("ip")})
    df = pd.DataFrame(flat, columns=TABLE_COLUMNS)
    return df.astype({"trial_number": "Int64", "search_acc": "float64"})


def select_candidates(spec: Spec, run_dir: Path) -> tuple[list[Candidate], list[str]]:
    """Uniform baselines + the search's picks (on validation accuracy), one per distinct (start, kd, bits)."""
    from ..checkpoints import load_model
    from ..search.results import read_results

    rd = RunDir(run_dir)
    try:
        results = read_results(run_dir)
    except FileNotFoundError:
        from ..pareto import ACC, SIZE

        log.warning("finalize: no search results in %s; finalizing the uniform baselines (and solver configs)",
                    rd.search_dir)
        results = pd.DataFrame(columns=["number", "status", ACC, SIZE])
    priors = json.loads(rd.priors_file.read_text()) if rd.priors_file.is_file() else None
    model, _ = load_model(rd.student("kd", spec.seed))
    mb, gbops = spec.search.budgets_mb, spec.search.budgets_gbops
    searched, missing = searched_candidates(results, mb, spec.finalize.top_k, priors, gbops)
    # allocation-only last: when the search's pick is the solver's own configuration (its warm start), that one
    # model carries both roles under its trial id, and "searched minus allocation only" is 0 by construction
    return merge_candidates(uniform_candidates(model, spec.quant.pin, spec.finalize.uniform_bits) + searched
                            + allocation_candidates(mb, priors, gbops)), missing


def finalize_stage(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Finalize every candidate under every seed (resumably, in parallel), write final/final.parquet."""
    from ..checkpoints import CheckpointError
    from ..raycluster import ensure_ray

    rd = RunDir(ctx.run_dir.resolve())
    for s in spec.seeds:
        for kind in ("kd", "scratch"):
            if not rd.student(kind, s).is_file():
                raise CheckpointError(f"no {kind} student for seed {s} at {rd.student(kind, s)}; run the baselines "
                                      f"stage (`kdsearch run {spec.name}`) before finalize")
    cands, missing = select_candidates(spec, rd.root)
    for b in missing:
        log.warning("finalize: no completed trial and no solver configuration fits %g MB; nothing finalized for "
                    "that budget", b)
    ensure_ray(ctx.address, py_modules=ctx.py_modules)
    res = Resources.for_spec(spec.device, spec.student.cpus, spec.student.gpus)
    pool = None
    if spec.distill.source == "live":
        from ..data import load_data
        from ..distill import make_pool

        use_gpu = Resources.for_spec(spec.device, spec.teachers.cpus, spec.teachers.gpus).gpus > 0
        pool = make_pool(spec, rd.root, load_data(spec.data), use_gpu=use_gpu)
    deps = _cache_deps(spec, rd, res)
    refs = {}
    for c in cands:
        cd = {**asdict(c), "bits": dict(c.bits), "roles": list(c.roles)}
        for s in spec.seeds:
            unit = Unit(f"finalize {c.id} s{s}", _finalize_task,
                        (spec.to_dict(), str(rd.root), cd, s, pool.tag if pool else None), resources=res)
            refs[f"{c.id} s{s}"] = submit(unit, *(deps[s] if c.kd and c.trains else []))
    total = len(refs)
    atomic_write_json(rd.final_dir / "progress.json", {"total": total, "done": 0, "running": sorted(refs),
                                                         "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        out = gather("finalize", refs, on_done=lambda done, pending: atomic_write_json(
            rd.final_dir / "progress.json", {"total": total, "done": len(done), "running": sorted(pending),
                                             "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    finally:
        if pool is not None:
            pool.shutdown()
    rows = [out[k] for k in refs]  # candidate order, seeds within
    atomic_to_parquet(final_table(rows), rd.final_table)
    bad = [f"{r['id']} s{r['seed']}" for r in rows if not r["export_ok"]]
    return {"models": {f"{r['id']} s{r['seed']}": {"val_acc": round(r["val_acc"], 4), "test_acc": round(r["test_acc"], 4),
                                                   "size_mb": r["size_mb"], "file_bytes": r["file_bytes"],
                                                   "label": r["label"]} for r in rows},
            "table": str(rd.final_table), "budgets_without_config": missing, "export_mismatch": bad,
            "reused": sum(bool(r.get("reused")) for r in rows)}
