"""Training float models from a spec: the teachers (in parallel, one Ray task each) and the scratch student.

Each model's training resumes from its own per-epoch checkpoint, and a finished model file is
reused when it was trained from the same inputs (same data, same training settings, same seed).
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import load_model, provenance, read_model_file, save_model
from ..context import RunContext, setup_logging
from ..data import EvalLoader, Normalizer, TrainLoader, load_data
from ..io import atomic_write_json, stable_hash
from ..models import create_model
from ..runtime import resolve_device, seed_everything, set_cpu_threads
from ..spec import Spec, TrainConfig
from ..train import evaluate, fit

log = logging.getLogger("kdsearch.stages.train")


def model_seed(spec: Spec, arch: str) -> int:
    """A per-architecture seed, stable across processes (Python's hash() is salted)."""
    return spec.seed * 1_000_003 + zlib.crc32(arch.encode()) % 1_000_003


def teacher_path(run_dir: Path, arch: str) -> Path:
    return run_dir / "teachers" / f"{arch}.pt"


def scratch_student_path(run_dir: Path) -> Path:
    return run_dir / "students" / "scratch.pt"


def inputs_key(spec: Spec, arch: str, cfg: TrainConfig, extra: Any = None) -> str:
    return stable_hash({"data": spec.data.model_dump(mode="json"), "arch": arch, "train": cfg.model_dump(mode="json"),
                        "seed": model_seed(spec, arch), "extra": extra})


def is_current(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    return read_model_file(path).get("meta", {}).get("inputs_key") == key


def train_float_model(
    spec: Spec, arch: str, cfg: TrainConfig, out: Path, *, device: torch.device, progress: bool = False
) -> dict[str, Any]:
    """Train `arch` from scratch per `cfg` and write `out` (+ `out.json` metrics); skip if already current."""
    key = inputs_key(spec, arch, cfg)
    if is_current(out, key):
        log.info("%s: %s is done (same inputs); skipping", arch, out)
        return dict(read_model_file(out)["metrics"])
    bundle = load_data(spec.data, seed=spec.seed)
    seed_everything(model_seed(spec, arch))
    model = create_model(arch, num_classes=bundle.num_classes)
    train = TrainLoader(bundle, spec.data, batch_size=cfg.batch_size, seed=model_seed(spec, arch), device=device)
    test = EvalLoader(bundle.test, batch_size=spec.data.eval_batch_size, device=device)
    result = fit(model, train, test, cfg, normalizer=Normalizer.from_bundle(bundle), device=device,
                 ckpt_path=out.with_suffix(".ckpt"), progress=progress, desc=arch)
    metrics = {"arch": arch, "test_acc": result.final["test_acc"], "epochs": cfg.epochs,
               "params": sum(p.numel() for p in model.parameters()), "history": result.history}
    save_model(out, model, arch=arch, num_classes=bundle.num_classes, metrics=metrics,
               meta=provenance(spec.to_dict(), inputs_key=key, data_version=bundle.version))
    atomic_write_json(out.with_suffix(".json"), metrics)
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    return metrics


def import_teacher(spec: Spec, arch: str, src: str, out: Path, *, device: torch.device) -> dict[str, Any]:
    """A teacher the user trained elsewhere: load weights-only, measure it on our test split, keep a copy."""
    key = inputs_key(spec, arch, TrainConfig(), extra={"checkpoint": str(src)})
    if is_current(out, key):
        return dict(read_model_file(out)["metrics"])
    bundle = load_data(spec.data, seed=spec.seed)
    model, _ = load_model(src, arch=arch, num_classes=bundle.num_classes)
    ev = evaluate(model.to(device), EvalLoader(bundle.test, batch_size=spec.data.eval_batch_size, device=device),
                  Normalizer.from_bundle(bundle).to(device), device)
    metrics = {"arch": arch, "test_acc": ev["acc"], "epochs": 0, "source": str(src),
               "params": sum(p.numel() for p in model.parameters())}
    save_model(out, model, arch=arch, num_classes=bundle.num_classes, metrics=metrics,
               meta=provenance(spec.to_dict(), inputs_key=key, data_version=bundle.version))
    atomic_write_json(out.with_suffix(".json"), metrics)
    return metrics


def _teacher_task(spec_dict: dict[str, Any], arch: str, run_dir: str, cpus: float) -> dict[str, Any]:
    """Body of one Ray task: a worker process trains (or imports) one teacher."""
    from ..spec import parse_spec

    setup_logging()
    set_cpu_threads(cpus)
    spec = parse_spec(spec_dict)
    device = resolve_device(spec.device)
    tcfg = next(t for t in spec.teachers.models if t.arch == arch)
    out = teacher_path(Path(run_dir), arch)
    if tcfg.checkpoint:
        return import_teacher(spec, arch, tcfg.checkpoint, out, device=device)
    return train_float_model(spec, arch, spec.teachers.train, out, device=device)


def train_teachers(spec: Spec, ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Train every teacher of the spec at once, one Ray task each (a GPU each on a cluster; CPUs shared locally)."""
    import ray

    from ..raycluster import cluster_gpus, ensure_ray

    ensure_ray(ctx.address)
    use_gpu = spec.device != "cpu" and cluster_gpus() > 0
    task = ray.remote(_teacher_task).options(
        num_cpus=spec.teachers.cpus, num_gpus=spec.teachers.gpus if use_gpu else 0, max_retries=2
    )
    refs = {t.arch: task.remote(spec.to_dict(), t.arch, str(ctx.run_dir.resolve()), spec.teachers.cpus)
            for t in spec.teachers.models}
    results = dict(zip(refs, ray.get(list(refs.values()))))
    for arch, m in results.items():
        log.info("teacher %s: test accuracy %.2f%%", arch, m["test_acc"])
    return results


def train_scratch_student(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    m = train_float_model(spec, spec.student.arch, spec.student.train, scratch_student_path(ctx.run_dir),
                          device=ctx.device, progress=ctx.progress)
    log.info("student %s (scratch): test accuracy %.2f%%", spec.student.arch, m["test_acc"])
    return m
