"""What makes two training runs comparable: their seeds, their image stream, and the key of their inputs.

One recipe, several seeds: the scratch student, the KD student and every QAT run of seed s start from the same
initialisation (`model_seed`) and read the same augmented views epoch by epoch (`loader_seed`, `train_loader`),
so a KD-vs-scratch difference is the teacher signal and nothing else. These functions are the only place that
decides that; the stages call them, and `tests/test_fairness.py` checks the streams are identical.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from .io import stable_hash

if TYPE_CHECKING:
    import torch

    from .data import DataBundle
    from .spec import Spec, TrainConfig


def model_seed(arch: str, seed: int) -> int:
    """The initialisation seed of `arch` under run seed `seed` (stable across processes: hash() is salted)."""
    return int(seed) * 1_000_003 + zlib.crc32(arch.encode()) % 1_000_003


def loader_seed(spec: Spec, seed: int) -> int:
    """The augmentation-stream seed of seed `seed`'s students: the student's own initialisation seed.

    The logit cache of seed s holds exactly this stream, so scratch, KD and QAT(+KD) runs of seed s see
    the same views in the same order.
    """
    return model_seed(spec.student.arch, seed)


def train_loader(spec: Spec, bundle: DataBundle, seed: int, *, batch_size: int, device: torch.device | str,
                 teacher: Any = None, epochs: int | None = None) -> Any:
    """The training loader of a seed-`seed` student run, with or without a teacher source.

    With a `LogitCache` the loader replays the cache's stream (the same stream `loader_seed` gives); when
    `epochs` is given the cache must cover every one of them, so each epoch is a fresh view, exactly the
    views the scratch run sees. Search trials pass `epochs=None` and may replay cached epochs (e % E): they
    are only compared with each other.
    """
    from .data import TrainLoader

    if hasattr(teacher, "train_loader"):  # a source that replays its own stream (`distill.LogitCache`)
        if teacher.seed != loader_seed(spec, seed):
            raise ValueError(f"the logit cache holds stream {teacher.seed}, seed {seed}'s students read "
                             f"{loader_seed(spec, seed)}")
        if epochs is not None and teacher.epochs < epochs:
            raise ValueError(f"the logit cache covers {teacher.epochs} epochs, the run trains {epochs}: it would "
                             "replay views the scratch run sees only once; grow the cache first")
        return teacher.train_loader(bundle, spec.data, batch_size=batch_size, device=device)
    return TrainLoader(bundle, spec.data, batch_size=batch_size, seed=loader_seed(spec, seed), device=device)


def data_key(spec: Spec) -> dict[str, Any]:
    """Everything about the data a trained model depends on (source, sizes, splits, augmentation)."""
    return spec.data.model_dump(mode="json", exclude={"num_workers", "eval_batch_size", "on_gpu", "download"})


def float_model_key(spec: Spec, arch: str, cfg: TrainConfig, seed: int, extra: Any = None) -> str:
    """The inputs key of a float model (teacher or student): a file made under another key is not reused, and
    a checkpoint written under another key is not resumed. The `kwargs:` beside `arch` build another model, so
    they are part of it (only when given: the keys of models without kwargs stay what they were)."""
    kwargs = spec.model_kwargs(arch)
    return stable_hash({"data": data_key(spec), "arch": arch, "train": cfg.model_dump(mode="json"),
                        "seed": model_seed(arch, seed), "extra": extra, **({"kwargs": kwargs} if kwargs else {})})


def kd_settings(spec: Spec, strategy: str) -> dict[str, Any]:
    """The distillation inputs of a KD run (the loss, not where the logits come from)."""
    d = spec.distill
    return {"strategy": strategy, "temperature": d.temperature, "alpha": d.alpha}
