"""Stage `baselines`: the float student trained from scratch and with ensemble KD, for the spec's epochs.

The KD student (`runs/<name>/students/kd.pt`) is where every QAT trial starts. Both students use the
same initialisation seed and the same augmentation stream (the logit cache's seed is the student's
loader seed, `kdsearch.distill.cache_seed`), so scratch vs KD differ only in the teacher signal.

Like the teachers, a KD student resumes from its per-epoch checkpoint and is skipped when its file was
made from the same inputs (data, training settings, seed, distillation settings, teacher files, source).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..checkpoints import provenance, read_model_file, save_model
from ..context import RunContext
from ..data import EvalLoader, Normalizer, TrainLoader, load_data
from ..distill import KDLoss, LogitCache, cache_seed, teacher_source, teachers_key
from ..distill.sources import SourceKind
from ..io import atomic_write_json
from ..models import create_model
from ..runtime import seed_everything
from ..spec import Spec
from ..train import fit
from .train_models import inputs_key, is_current, model_seed, train_scratch_student

log = logging.getLogger("kdsearch.stages.baselines")


def kd_student_path(spec: Spec, run_dir: Path, strategy: str | None = None) -> Path:
    """students/kd.pt for the spec's strategy, students/kd_<strategy>.pt for any other."""
    strategy = strategy or spec.distill.strategy
    name = "kd" if strategy == spec.distill.strategy else f"kd_{strategy}"
    return run_dir / "students" / f"{name}.pt"


def default_source(spec: Spec) -> SourceKind:
    """distill.source: 'cache' replays the logit cache, 'live' asks the Ray teacher pool."""
    return "cache" if spec.distill.source == "cache" else "pool"


def train_kd_student(spec: Spec, ctx: RunContext, strategy: str | None = None,
                     source: SourceKind | None = None) -> dict[str, Any]:
    """Distil the spec's teachers into the student with `strategy` (default: the spec's); write its model file.

    Needs the trained teachers (stage `teachers`). With the cache source, epochs beyond `cache_epochs`
    replay the cached epochs (e % E): the student then sees E distinct views of each image.
    """
    strategy = strategy or spec.distill.strategy
    source = source or default_source(spec)
    arch, cfg = spec.student.arch, spec.student.train
    out = kd_student_path(spec, ctx.run_dir, strategy)
    loss = KDLoss.from_config(spec.distill, strategy, label_smoothing=cfg.label_smoothing)
    extra = {"kd": {"strategy": strategy, "temperature": loss.temperature, "alpha": loss.alpha},
             "teachers": teachers_key(spec, ctx.run_dir), "source": source, "loader_seed": cache_seed(spec),
             "cache_epochs": spec.distill.cache_epochs if source == "cache" else None}
    key = inputs_key(spec, arch, cfg, extra=extra)
    if is_current(out, key):
        log.info("KD student (%s): %s is done (same inputs); skipping", strategy, out)
        return dict(read_model_file(out)["metrics"])

    bundle = load_data(spec.data, seed=spec.seed)
    teachers = teacher_source(spec, ctx, source, bundle=bundle)
    if isinstance(teachers, LogitCache):
        train: Any = teachers.train_loader(bundle, spec.data, batch_size=cfg.batch_size, device=ctx.device)
    else:
        train = TrainLoader(bundle, spec.data, batch_size=cfg.batch_size, seed=cache_seed(spec), device=ctx.device)
    seed_everything(model_seed(spec, arch))  # the scratch student's initialisation
    model = create_model(arch, num_classes=bundle.num_classes)
    test = EvalLoader(bundle.test, batch_size=spec.data.eval_batch_size, device=ctx.device)
    try:
        result = fit(model, train, test, cfg, normalizer=Normalizer.from_bundle(bundle), device=ctx.device,
                     ckpt_path=out.with_suffix(".ckpt"), teacher=teachers, kd_loss=loss, progress=ctx.progress,
                     desc=f"{arch} KD-{strategy}")
    finally:
        if hasattr(teachers, "shutdown"):
            teachers.shutdown()
    metrics = {"arch": arch, "test_acc": result.final["test_acc"], "epochs": cfg.epochs, "strategy": strategy,
               "source": source, "temperature": loss.temperature, "alpha": loss.alpha,
               "params": sum(p.numel() for p in model.parameters()), "history": result.history}
    save_model(out, model, arch=arch, num_classes=bundle.num_classes, metrics=metrics,
               meta=provenance(spec.to_dict(), inputs_key=key, data_version=bundle.version))
    atomic_write_json(out.with_suffix(".json"), metrics)
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    log.info("student %s (KD-%s): test accuracy %.2f%%", arch, strategy, metrics["test_acc"])
    return metrics


def train_baselines(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Scratch student + KD student with the spec's strategy: {'scratch': metrics, 'kd': metrics}."""
    return {"scratch": train_scratch_student(spec, ctx), "kd": train_kd_student(spec, ctx)}
