"""Train and eval loaders over in-memory uint8 arrays.

The train loader yields seeded views (see `augment`): the order of epoch e is a permutation seeded by
(seed, e), and the pixels of sample i in epoch e depend only on (seed, e, i) and the augmentation fields, so
`views(e, idx)` can recompute any batch exactly (the logit cache replays teacher outputs against it).

GPU path (the airbench idea): when the target device is CUDA and `cfg.on_gpu`, the uint8 train set is moved
to the GPU once (150 MB for CIFAR) and the "none"/"standard" augmentation runs on whole batches there, so
no host-to-device copy or worker process sits on the hot path.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .arrays import DataBundle, ImageArrays
from .augment import AugmentSpec, EpochParams, SeededViews, batch_augment, draw_epoch_params
from .seeding import generator

if TYPE_CHECKING:
    from ..spec import DataConfig

_ORDER_STREAM = 0x0D0E  # separates the epoch-order generator from the view generators
log = logging.getLogger("kdsearch.data")


@functools.lru_cache(maxsize=None)  # once per process and value: every trial of a search builds a loader
def loader_workers(requested: int, cpus: int) -> int:
    """DataLoader worker processes for a process with `cpus` CPUs: `data.num_workers` is an upper bound, never more
    workers than CPUs (a 1-CPU Ray task with 8 workers oversubscribes its node, and PyTorch warns about it)."""
    used = min(int(requested), max(1, int(cpus)))
    if used < requested:
        log.info("%d DataLoader worker%s instead of data.num_workers=%d: this process has %d CPU%s", used,
                 "" if used == 1 else "s", requested, cpus, "" if cpus == 1 else "s")
    return used


class Batch(NamedTuple):
    """uint8 images [B, 3, H, W], int64 labels [B] and int64 dataset indices [B], all on the target device."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of range(n) that epoch `epoch` visits (CPU int64), seeded by (seed, epoch)."""
    return torch.randperm(n, generator=generator(seed, epoch, _ORDER_STREAM))


class _EpochSampler(Sampler[tuple[int, int]]):
    """Yields (index, epoch) pairs so the dataset knows the epoch even inside persistent workers."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        e = self.epoch
        return iter([(int(i), e) for i in epoch_order(self.n, self.seed, e)])


class _ViewDataset(Dataset):
    def __init__(self, views: SeededViews, labels: torch.Tensor) -> None:
        self.views, self.labels = views, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        i, epoch = key
        return self.views.view(i, epoch), self.labels[i], i


class TrainLoader:
    """Seeded, shuffled, augmented batches of `bundle.train`; `len()` is the number of batches per epoch."""

    def __init__(self, bundle: DataBundle, cfg: DataConfig, *, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", drop_last: bool = True) -> None:
        n = len(bundle.train)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training images (with drop_last)")
        self.spec = AugmentSpec.from_config(cfg)
        self.batch_size, self.seed, self.drop_last, self.n = batch_size, int(seed), drop_last, n
        self.device = torch.device(device)
        self.num_workers = int(cfg.num_workers)  # an upper bound: `_policy_epoch` sizes it to the CPUs
        self.on_gpu = self.device.type == "cuda" and cfg.on_gpu and self.spec.batched
        data_dev = self.device if self.on_gpu else torch.device("cpu")
        self._images = bundle.train.images.to(data_dev)
        self._labels = bundle.train.labels.to(data_dev)
        self._params: dict[int, EpochParams] = {}
        self._views = None if self.spec.batched else SeededViews(bundle.train.images, self.spec, self.seed)
        self._loader: DataLoader | None = None
        self._sampler: _EpochSampler | None = None

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self, e: int) -> torch.Tensor:
        """The dataset indices of epoch e in visiting order (CPU int64)."""
        return epoch_order(self.n, self.seed, e)

    def epoch(self, e: int) -> Iterator[Batch]:
        """The shuffled, augmented batches of epoch e."""
        if self.spec.batched:
            return self._batched_epoch(e)
        return self._policy_epoch(e)

    def views(self, e: int, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 views [len(indices), 3, H, W] of `indices` in epoch e, on the loader's device.

        Exactly what `epoch(e)` yields for those samples.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self.spec.batched:
            idx = idx.to(self._images.device)
            out = batch_augment(self._images[idx], self._epoch_params(e).take(idx))
        elif len(idx) == 0:
            out = self._images[:0]
        else:
            out = torch.stack([self._views.view(int(i), e) for i in idx.cpu()])  # type: ignore[union-attr]
        return out.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Shut down persistent workers (also happens when the loader is garbage-collected)."""
        self._loader = None

    # -- batch path -------------------------------------------------------------------------------------
    def _epoch_params(self, e: int) -> EpochParams:
        if e not in self._params:
            h, w = self._images.shape[-2:]
            p = draw_epoch_params(self.n, h, w, self.spec, self.seed, e).to(self._images.device)
            self._params = {k: v for k, v in self._params.items() if k == e - 1}  # keep at most two epochs
            self._params[e] = p
        return self._params[e]

    def _batched_epoch(self, e: int) -> Iterator[Batch]:
        order = self.order(e).to(self._images.device)
        params = self._epoch_params(e)
        pin = self.device.type == "cuda" and not self.on_gpu
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = batch_augment(self._images[idx], params.take(idx))
            y = self._labels[idx]
            if pin:
                x, y, idx = x.pin_memory(), y.pin_memory(), idx.pin_memory()
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                        idx.to(self.device, non_blocking=True))

    # -- per-sample policy path -------------------------------------------------------------------------
    def _policy_epoch(self, e: int) -> Iterator[Batch]:
        if self._loader is None:
            # torch's intra-op threads are this process's CPUs (a Ray task's, set by `runtime.set_cpu_threads`)
            self.num_workers = loader_workers(self.num_workers, torch.get_num_threads())
            self._sampler = _EpochSampler(self.n, self.seed)
            self._loader = DataLoader(
                _ViewDataset(self._views, self._labels),  # type: ignore[arg-type]
                batch_size=self.batch_size, sampler=self._sampler, drop_last=self.drop_last,
                num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator(),  # its base seed is unused; a private one keeps the global RNG untouched
            )
        self._sampler.epoch = e  # type: ignore[union-attr]
        for x, y, idx in self._loader:
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                        idx.to(self.device, non_blocking=True))


class EvalLoader:
    """Batches of a split in dataset order, unaugmented; the split moves to `device` once."""

    def __init__(self, arrays: ImageArrays, *, batch_size: int, device: torch.device | str = "cpu") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.images = arrays.images.to(self.device)
        self.labels = arrays.labels.to(self.device)
        self.index = torch.arange(len(arrays), device=self.device)

    def __len__(self) -> int:
        return -(-int(self.images.shape[0]) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for s in range(0, int(self.images.shape[0]), self.batch_size):
            sl = slice(s, s + self.batch_size)
            yield Batch(self.images[sl], self.labels[sl], self.index[sl])
