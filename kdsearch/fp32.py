"""Training one float model of a spec (a teacher, a scratch or a KD student of one seed), wherever it runs.

Each function is the body of one Ray task (see `kdsearch.stages`), and can be called in-process by tests and
benchmarks. Validation chooses, test reports: every epoch is measured on the validation split, and the test
split is read once, after training, because the report lists every model trained here.

A finished model file is reused when it was made from the same inputs (`recipes.float_model_key`); a
half-trained one resumes from its per-epoch checkpoint only under the same key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_model, provenance, read_model_file, save_model
from .data import DataBundle, EvalLoader, Normalizer, load_data
from .io import atomic_write_json
from .models import create_model
from .recipes import float_model_key, kd_settings, model_seed, train_loader
from .runtime import seed_everything
from .spec import Spec, TrainConfig
from .train import FitRun, evaluate, fit

log = logging.getLogger("kdsearch.fp32")


def is_current(path: Path, key: str) -> bool:
    """True when `path` is a model file made from inputs with key `key`."""
    if not path.is_file():
        return False
    return read_model_file(path).get("meta", {}).get("inputs_key") == key


def split_accuracies(model: torch.nn.Module, bundle: DataBundle, spec: Spec, device: torch.device,
                     cfg: TrainConfig | None = None) -> dict[str, float]:
    """{val_acc, test_acc}: the final measurement of a model the report lists (the one read of test)."""
    norm = Normalizer.from_bundle(bundle).to(device)
    out = {}
    for split in ("val", "test"):
        loader = EvalLoader(getattr(bundle, split), batch_size=spec.data.eval_batch_size, device=device)
        out[f"{split}_acc"] = evaluate(model, loader, norm, device, cfg)["acc"]
    return out


def _finish(out: Path, model: torch.nn.Module, bundle: DataBundle, spec: Spec, key: str, metrics: dict[str, Any],
            device: torch.device, cfg: TrainConfig | None) -> dict[str, Any]:
    from .raycluster import where

    metrics = {**metrics, **split_accuracies(model, bundle, spec, device, cfg), "device": str(device),
               "node": where(), "data_version": bundle.version}
    save_model(out, model, arch=metrics["arch"], num_classes=bundle.num_classes, metrics=metrics,
               kwargs=spec.model_kwargs(metrics["arch"]), meta=provenance(spec.to_dict(), inputs_key=key, data_version=bundle.version))
    atomic_write_json(out.with_suffix(".json"), metrics)
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    return metrics


def train_float_model(spec: Spec, arch: str, cfg: TrainConfig, out: Path, *, seed: int, device: torch.device,
                      progress: bool = False, bundle: DataBundle | None = None) -> dict[str, Any]:
    """Train `arch` from scratch per `cfg` under run seed `seed` and write `out` (+ `.json`); skip if current.

    Students read the students' stream (`recipes.train_loader`), so the KD student of the same seed sees the
    very same views; a teacher reads its own architecture's stream.
    """
    key = float_model_key(spec, arch, cfg, seed)
    if is_current(out, key):
        log.info("%s: %s is done (same inputs); skipping", arch, out)
        return dict(read_model_file(out)["metrics"])
    bundle = bundle if bundle is not None else load_data(spec.data)
    seed_everything(model_seed(arch, seed))
    model = create_model(arch, num_classes=bundle.num_classes, **spec.model_kwargs(arch))
    if arch == spec.student.arch:
        train = train_loader(spec, bundle, seed, batch_size=cfg.batch_size, device=device)
    else:
        from .data import TrainLoader

        train = TrainLoader(bundle, spec.data, batch_size=cfg.batch_size, seed=model_seed(arch, seed), device=device)
    val = EvalLoader(bundle.val, batch_size=spec.data.eval_batch_size, device=device)
    result = fit(model, train, val, FitRun(cfg, normalizer=Normalizer.from_bundle(bundle), device=device,
                 ckpt_path=out.with_suffix(".ckpt"), progress=progress, desc=f"{arch} s{seed}", resume_key=key))
    metrics = {"arch": arch, "kind": "scratch", "seed": seed, "epochs": cfg.epochs, "source": None,
               "params": sum(p.numel() for p in model.parameters()), "history": result.history}
    metrics = _finish(out, model, bundle, spec, key, metrics, device, cfg)
    log.info("%s (scratch, seed %d): val %.2f%%, test %.2f%%", arch, seed, metrics["val_acc"], metrics["test_acc"])
    return metrics


def import_teacher(spec: Spec, arch: str, src: str, out: Path, *, device: torch.device) -> dict[str, Any]:
    """A teacher trained elsewhere: load weights-only, measure it on our splits, keep a copy."""
    return import_model(spec, arch, src, out, seed=spec.seed, kind="imported", device=device)


def import_student(spec: Spec, out: Path, *, seed: int, device: torch.device) -> dict[str, Any]:
    """The float student given as `student.checkpoint`: seed `seed`'s FP32 (scratch) student, not trained here.

    Kind "given": the report's FP32 row is this model measured on this run's splits, and the KD student, the QAT
    runs and the search start from its weights (`given_student_weights`)."""
    assert spec.student.checkpoint is not None
    return import_model(spec, spec.student.arch, spec.student.checkpoint, out, seed=seed, kind="given", device=device)


def import_model(spec: Spec, arch: str, src: str, out: Path, *, seed: int, kind: str,
                 device: torch.device) -> dict[str, Any]:
    """A float model trained elsewhere: load weights-only, measure it on our splits, keep a copy as `out`."""
    from .io import file_digest

    key = float_model_key(spec, arch, TrainConfig(), seed, extra={"checkpoint": file_digest(Path(src))})
    if is_current(out, key):
        return dict(read_model_file(out)["metrics"])
    bundle = load_data(spec.data)
    model, _ = load_model(src, arch=arch, num_classes=bundle.num_classes, kwargs=spec.model_kwargs(arch))
    model.to(device)
    metrics = {"arch": arch, "kind": kind, "seed": seed, "epochs": 0, "source": str(src),
               "params": sum(p.numel() for p in model.parameters())}
    return _finish(out, model, bundle, spec, key, metrics, device, None)


def given_student_weights(spec: Spec, num_classes: int) -> dict[str, torch.Tensor] | None:
    """The state_dict of `student.checkpoint` (weights only), or None when the spec trains its student."""
    if spec.student.checkpoint is None:
        return None
    model, _ = load_model(spec.student.checkpoint, arch=spec.student.arch, num_classes=num_classes,
                          kwargs=spec.student.kwargs)
    return model.state_dict()


def kd_model_key(spec: Spec, seed: int, strategy: str, teachers: str, source: str) -> str:
    """Inputs of a KD student: the float recipe plus the loss, the teachers' files and the logit source (and the
    given student it starts from, if any)."""
    from .io import file_digest

    extra = {"kd": kd_settings(spec, strategy), "teachers": teachers, "source": source}
    if spec.student.checkpoint is not None:
        extra["start"] = file_digest(Path(spec.student.checkpoint))
    return float_model_key(spec, spec.student.arch, spec.student.train, seed, extra=extra)


def train_kd_student(spec: Spec, run_dir: Path, out: Path, *, seed: int, strategy: str, source: str,
                     device: torch.device, pool_tag: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Distil the spec's teachers into the student of seed `seed` with `strategy`; write `out` (+ `.json`).

    Same initialisation and same views, epoch by epoch, as the scratch student of that seed: with the
    cache source the cache covers every epoch (`cache_epochs_needed`), with "live" the Ray pool answers the
    fresh views of the students' stream.
    """
    from .distill import KDLoss, teacher_source, teachers_key

    arch, cfg = spec.student.arch, spec.student.train
    key = kd_model_key(spec, seed, strategy, teachers_key(spec, run_dir), source)
    if is_current(out, key):
        log.info("KD student (%s, seed %d): %s is done (same inputs); skipping", strategy, seed, out)
        return dict(read_model_file(out)["metrics"])
    bundle = load_data(spec.data)
    teachers = teacher_source(spec, run_dir, source, bundle=bundle, device=device, seed=seed,  # type: ignore[arg-type]
                              pool_tag=pool_tag)
    train = train_loader(spec, bundle, seed, batch_size=cfg.batch_size, device=device, teacher=teachers,
                         epochs=cfg.epochs)
    seed_everything(model_seed(arch, seed))  # the scratch student's initialisation
    model = create_model(arch, num_classes=bundle.num_classes, **spec.model_kwargs(arch))
    given = given_student_weights(spec, bundle.num_classes)
    if given is not None:  # KD fine-tunes the given student instead of training one from its initialisation
        model.load_state_dict(given)
    loss = KDLoss.from_config(spec.distill, strategy, label_smoothing=cfg.label_smoothing)
    val = EvalLoader(bundle.val, batch_size=spec.data.eval_batch_size, device=device)
    result = fit(model, train, val, FitRun(cfg, normalizer=Normalizer.from_bundle(bundle), device=device,
                 ckpt_path=out.with_suffix(".ckpt"), teacher=teachers, kd_loss=loss, progress=progress,
                 desc=f"{arch} KD-{strategy} s{seed}", resume_key=key))
    metrics = {"arch": arch, "kind": "kd", "seed": seed, "epochs": cfg.epochs, "strategy": strategy,
               "source": source, "start": spec.student.checkpoint, "temperature": loss.temperature, "alpha": loss.alpha,
               "params": sum(p.numel() for p in model.parameters()), "history": result.history}
    metrics = _finish(out, model, bundle, spec, key, metrics, device, cfg)
    log.info("%s (KD-%s, seed %d, %s teachers): val %.2f%%, test %.2f%%", arch, strategy, seed, source,
             metrics["val_acc"], metrics["test_acc"])
    return metrics
