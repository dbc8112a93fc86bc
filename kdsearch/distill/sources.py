"""Teacher sources: in-process teachers, and the factory that builds any source from a run's teacher files.

Three implementations of `kdsearch.train.TeacherSource` (`annotate(batches, epoch) -> (batch, [T, B, C])`):

* `InProcessTeachers`: the teachers live in the training process (simplest; one GPU or a CPU).
* `kdsearch.distill.pool.TeacherPool`: one Ray actor per teacher, requests in flight while the student steps.
* `kdsearch.distill.cache.LogitCache`: replays logits precomputed for the seeded augmentation epochs.

`teacher_source(spec, run_dir, kind, device=...)` builds any of them from `runs/<name>/teachers/<arch>.pt`.
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
from ..io import stable_hash
from ..rundir import RunDir
from ..spec import Spec
from .cache import LogitCache, build_logit_cache
from .numerics import teacher_autocast, teacher_bf16, teacher_format, teacher_numerics
from .pool import TeacherPool

log = logging.getLogger("kdsearch.distill")

SourceKind = Literal["cache", "live", "inprocess"]
SOURCE_KINDS: tuple[str, ...] = ("cache", "live", "inprocess")


class InProcessTeachers:
    """Frozen teachers evaluated in this process on `device` (numerics: `kdsearch.distill.numerics`)."""

    def __init__(self, models: Mapping[str, nn.Module] | list[nn.Module], normalizer: nn.Module,
                 device: torch.device, *, bf16: bool = True, channels_last: bool = True) -> None:
        items = list(models.values()) if isinstance(models, Mapping) else list(models)
        if not items:
            raise ValueError("InProcessTeachers needs at least one teacher")
        self.device = device
        self.fmt = teacher_format(channels_last)
        self.bf16 = teacher_bf16(device, bf16)
        self.models = [m.to(device, memory_format=self.fmt).eval().requires_grad_(False) for m in items]
        self.normalizer = normalizer.to(device)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 logits [T, B, C]."""
        x = self.normalizer(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.fmt)
        with teacher_autocast(self.device, self.bf16):
            return torch.stack([m(x).float() for m in self.models])

    def annotate(self, batches: Iterable[Any], epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in batches:
            yield batch, self.logits(batch.images)


# ---- building sources from a run directory ---------------------------------------------------------------
# One name set for where teacher logits come from, everywhere (spec, trials, reports):
#   "cache": the logit cache of the run's seeded augmentation stream (kdsearch.distill.cache),
#   "live":  the Ray actor pool, one actor per teacher (kdsearch.distill.pool),
#   "inprocess": the teachers inside the training process (tests, benchmarks, building the cache).

def teacher_files(spec: Spec, run_dir: Path) -> dict[str, Path]:
    """arch -> trained teacher file (runs/<name>/teachers/<arch>.pt), all of which must exist."""
    rd = RunDir(run_dir)
    files = {t.arch: rd.teacher(t.arch) for t in spec.teachers.models}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise CheckpointError(f"teacher files missing: {', '.join(missing)}; run `kdsearch train SPEC --model teachers`")
    return files


def teachers_key(spec: Spec, run_dir: Path) -> str:
    """A hash of the trained teachers (their inputs keys, else their file digests): the cache's identity."""
    from ..io import file_digest

    parts = {}
    for arch, p in teacher_files(spec, run_dir).items():
        meta = read_model_file(p).get("meta", {})
        parts[arch] = meta.get("inputs_key") or file_digest(p)
    return stable_hash(parts)


def load_teachers(spec: Spec, run_dir: Path) -> dict[str, nn.Module]:
    """arch -> trained teacher in eval mode (CPU), loaded weights-only."""
    return {arch: load_model(p, arch=arch)[0].eval() for arch, p in teacher_files(spec, run_dir).items()}


def cache_seed(spec: Spec, seed: int | None = None) -> int:
    """The augmentation seed of seed `seed`'s logit cache (default: the search's seed): the students' stream."""
    from ..recipes import loader_seed

    return loader_seed(spec, spec.seed if seed is None else seed)


def logit_cache_dir(run_dir: Path, seed: int) -> Path:
    return RunDir(run_dir).logit_cache(seed)


def cache_epochs_needed(spec: Spec) -> int:
    """Epochs the cache of a seed must hold: every epoch the FP32 KD student and a finalize QAT+KD run train
    (each sees a fresh view per epoch, like its scratch counterpart), and at least the search's replay set."""
    return max(spec.distill.cache_epochs, spec.student.train.epochs, spec.quant.qat.epochs)


def make_pool(spec: Spec, run_dir: Path, bundle: Any, *, use_gpu: bool, lookahead: int = 2) -> TeacherPool:
    """The Ray actor pool of the spec's teachers; named by the teachers' hash so other tasks can `attach`."""
    return TeacherPool(load_teachers(spec, run_dir), bundle.mean, bundle.std, num_cpus=spec.teachers.cpus,
                       num_gpus=spec.teachers.gpus if use_gpu else 0.0, lookahead=lookahead,
                       tag=teachers_key(spec, run_dir))


def ensure_logit_cache(spec: Spec, run_dir: Path, bundle: Any, seed: int, *, device: torch.device,
                       epochs: int | None = None) -> LogitCache:
    """Open seed `seed`'s logit cache, computing whatever epochs are missing with in-process teachers.

    The cache grows: asking for more epochs keeps the finished ones and computes only the new ones.
    """
    root = logit_cache_dir(run_dir, seed)
    key = stable_hash({"teachers": teachers_key(spec, run_dir), "data": bundle.version,
                       "augment": [spec.data.augment, spec.data.cutout, spec.data.random_erasing],
                       "numerics": teacher_numerics(device)})
    stream, epochs = cache_seed(spec, seed), epochs or cache_epochs_needed(spec)
    with contextlib.suppress(FileNotFoundError, ValueError):
        cache = LogitCache(root)
        if cache.meta.key == key and cache.seed == stream and cache.epochs >= epochs:
            return cache
    log.info("logit cache (seed %d): computing up to %d epochs of teacher logits in %s", seed, epochs, root)
    source = teacher_source(spec, run_dir, "inprocess", bundle=bundle, device=device)
    return build_logit_cache(source, bundle, spec.data, root, key=key, seed=stream, epochs=epochs,
                             teachers=[t.arch for t in spec.teachers.models], device=device,
                             batch_size=spec.data.eval_batch_size)


def teacher_source(spec: Spec, run_dir: Path, kind: SourceKind, *, bundle: Any = None, device: torch.device,
                   seed: int | None = None, pool_tag: str | None = None) -> InProcessTeachers | TeacherPool | LogitCache:
    """A teacher source of the given kind for the spec's trained teachers in `run_dir`.

    "cache" opens (or completes) seed `seed`'s cache; its trainings must read `recipes.train_loader`'s
    loader. "live" attaches to the pool the driver started (`pool_tag`), or starts one.
    """
    from ..data import Normalizer, load_data

    if kind not in SOURCE_KINDS:
        raise ValueError(f"teacher source kind must be one of {', '.join(SOURCE_KINDS)} (got {kind!r})")
    bundle = bundle if bundle is not None else load_data(spec.data)
    if kind == "inprocess":
        return InProcessTeachers(load_teachers(spec, run_dir), Normalizer.from_bundle(bundle), device)
    if kind == "live":
        if pool_tag is not None:
            return TeacherPool.attach(pool_tag, [t.arch for t in spec.teachers.models])
        return make_pool(spec, run_dir, bundle, use_gpu=device.type == "cuda")
    return ensure_logit_cache(spec, run_dir, bundle, spec.seed if seed is None else seed, device=device)
