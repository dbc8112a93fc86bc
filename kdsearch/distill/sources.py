"""Teacher sources: in-process teachers, and the factory that builds any source from a run's teacher files.

Three implementations of `kdsearch.train.TeacherSource` (`annotate(batches, epoch) -> (batch, [T, B, C])`):

* `InProcessTeachers`: the teachers live in the training process (simplest; one GPU or a CPU).
* `kdsearch.distill.pool.TeacherPool`: one Ray actor per teacher, requests in flight while the student steps.
* `kdsearch.distill.cache.LogitCache`: replays logits precomputed for the seeded augmentation epochs.

`teacher_source(spec, ctx, kind)` builds any of them from `runs/<name>/teachers/<arch>.pt`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..checkpoints import CheckpointError, load_model, read_model_file
from ..context import RunContext
from ..io import stable_hash
from ..spec import Spec
from .cache import LogitCache, build_logit_cache
from .pool import TeacherPool

log = logging.getLogger("kdsearch.distill")

SourceKind = Literal["inprocess", "pool", "cache"]
SOURCE_KINDS: tuple[str, ...] = ("inprocess", "pool", "cache")


class InProcessTeachers:
    """Frozen teachers evaluated in this process on `device` (bf16 autocast + channels_last on a GPU)."""

    def __init__(self, models: Mapping[str, nn.Module] | list[nn.Module], normalizer: nn.Module,
                 device: torch.device, *, bf16: bool = True, channels_last: bool = True) -> None:
        items = list(models.values()) if isinstance(models, Mapping) else list(models)
        if not items:
            raise ValueError("InProcessTeachers needs at least one teacher")
        self.device = device
        gpu = device.type == "cuda"
        self.fmt = torch.channels_last if gpu and channels_last else torch.contiguous_format
        self.bf16 = gpu and bf16
        self.models = [m.to(device, memory_format=self.fmt).eval().requires_grad_(False) for m in items]
        self.normalizer = normalizer.to(device)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 logits [T, B, C]."""
        x = self.normalizer(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.fmt)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            return torch.stack([m(x).float() for m in self.models])

    def annotate(self, batches: Iterable[Any], epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in batches:
            yield batch, self.logits(batch.images)


# ---- building sources from a run directory ---------------------------------------------------------------

def teacher_files(spec: Spec, run_dir: Path) -> dict[str, Path]:
    """arch -> trained teacher file (runs/<name>/teachers/<arch>.pt), all of which must exist."""
    from ..stages.train_models import teacher_path

    files = {t.arch: teacher_path(run_dir, t.arch) for t in spec.teachers.models}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise CheckpointError(f"teacher files missing: {', '.join(missing)}; run `kdsearch train SPEC --model teachers`")
    return files


def teachers_key(spec: Spec, run_dir: Path) -> str:
    """A hash of the trained teachers (their inputs keys, else their file sizes and times): the cache's identity."""
    parts = {}
    for arch, p in teacher_files(spec, run_dir).items():
        meta = read_model_file(p).get("meta", {})
        st = p.stat()
        parts[arch] = meta.get("inputs_key") or f"{st.st_size}:{st.st_mtime_ns}"
    return stable_hash(parts)


def load_teachers(spec: Spec, run_dir: Path) -> dict[str, nn.Module]:
    """arch -> trained teacher in eval mode (CPU), loaded weights-only."""
    return {arch: load_model(p, arch=arch)[0].eval() for arch, p in teacher_files(spec, run_dir).items()}


def cache_seed(spec: Spec) -> int:
    """The augmentation seed of the logit cache: the student's own loader seed.

    With it, the scratch student, the KD student and every QAT trial see the same augmented views
    epoch by epoch, so the comparisons differ only in the teacher signal.
    """
    from ..stages.train_models import model_seed

    return model_seed(spec, spec.student.arch)


def logit_cache_dir(run_dir: Path) -> Path:
    return run_dir / "cache" / "logits"


def make_pool(spec: Spec, ctx: RunContext, bundle: Any, *, lookahead: int = 2) -> TeacherPool:
    """The Ray actor pool of the spec's teachers; named by the teachers' hash so trials can `attach` to it."""
    from ..raycluster import cluster_gpus, ensure_ray

    ensure_ray(ctx.address)
    gpus = spec.teachers.gpus if spec.device != "cpu" and ctx.device.type != "cpu" and cluster_gpus() > 0 else 0.0
    return TeacherPool(load_teachers(spec, ctx.run_dir), bundle.mean, bundle.std, num_cpus=spec.teachers.cpus,
                       num_gpus=gpus, lookahead=lookahead, tag=teachers_key(spec, ctx.run_dir))


def ensure_logit_cache(spec: Spec, ctx: RunContext, bundle: Any, *, builder: SourceKind = "inprocess") -> LogitCache:
    """Open the run's logit cache, computing whatever epochs are missing with `builder` teachers."""
    root = logit_cache_dir(ctx.run_dir)
    key = stable_hash({"teachers": teachers_key(spec, ctx.run_dir), "data": bundle.version,
                       "augment": [spec.data.augment, spec.data.cutout, spec.data.random_erasing]})
    seed, epochs = cache_seed(spec), spec.distill.cache_epochs
    with contextlib.suppress(FileNotFoundError, ValueError):
        cache = LogitCache(root)
        if cache.meta.key == key and cache.seed == seed and cache.epochs == epochs:
            return cache
    log.info("logit cache: computing %d epochs of teacher logits in %s", epochs, root)
    source = teacher_source(spec, ctx, builder, bundle=bundle)
    try:
        return build_logit_cache(source, bundle, spec.data, root, key=key, seed=seed, epochs=epochs,
                                 teachers=[t.arch for t in spec.teachers.models], device=ctx.device,
                                 batch_size=spec.data.eval_batch_size)
    finally:
        if isinstance(source, TeacherPool):
            source.shutdown()


def teacher_source(spec: Spec, ctx: RunContext, kind: SourceKind, *, bundle: Any = None,
                   lookahead: int = 2) -> InProcessTeachers | TeacherPool | LogitCache:
    """A teacher source of the given kind for the spec's trained teachers in `ctx.run_dir`.

    For "cache" the trial's loader must replay the cache's stream: build it with `source.train_loader(...)`.
    """
    from ..data import Normalizer, load_data

    if kind not in SOURCE_KINDS:
        raise ValueError(f"teacher source kind must be one of {', '.join(SOURCE_KINDS)} (got {kind!r})")
    bundle = bundle if bundle is not None else load_data(spec.data, seed=spec.seed)
    if kind == "inprocess":
        return InProcessTeachers(load_teachers(spec, ctx.run_dir), Normalizer.from_bundle(bundle), ctx.device)
    if kind == "pool":
        return make_pool(spec, ctx, bundle, lookahead=lookahead)
    return ensure_logit_cache(spec, ctx, bundle)
