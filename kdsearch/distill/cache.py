"""The logit cache: the frozen teachers' logits for the seeded augmentation views, computed once.

Teachers are frozen, so a search with many trials should not pay for their forward passes again. The
cache holds the raw logits of every teacher for every training image in each of E augmentation epochs
of a seeded stream: `epoch_<e>.npy` is float16 [T, N, C] indexed by dataset index (so any batch size
and any shuffling replays it), next to `epoch_<e>.sum.npy`, each view's int64 pixel sum (-1: not
computed), which lets replay detect a loader whose augmentation stream differs from the cache's.

Replay contract: epoch e of a trial replays cached epoch e % E, so the trial's loader must yield the
views of epoch e % E of the stream seeded with the cache's seed. `LogitCache.train_loader` builds exactly
that loader (a `TrainLoader` with the cache's seed, wrapped so that epoch e is epoch e % E); `annotate`
checks the first batch of every epoch against the stored pixel sums and raises `CacheMismatch` otherwise.

Files are written atomically (temporary name in the same directory, then `os.replace`), one epoch at a
time, so an interrupted build resumes at the first missing epoch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path, atomic_write_json

log = logging.getLogger("kdsearch.distill.cache")

FORMAT = "kdsearch.logit-cache/1"


class CacheMismatch(RuntimeError):
    """A batch whose views (or indices) are not the ones the cache was computed for."""


@dataclass(frozen=True)
class CacheMeta:
    key: str  # hash of everything the logits depend on except the epoch count (teachers, data, seed)
    seed: int  # the TrainLoader seed whose augmentation stream the cache holds
    epochs: int  # E: cached epochs; epoch e replays e % E
    num_train: int
    num_classes: int
    teachers: tuple[str, ...]
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"CacheMeta.epochs must be >= 1 (got {self.epochs})")
        if not self.teachers:
            raise ValueError("CacheMeta.teachers must name at least one teacher")


def _logits_file(root: Path, e: int) -> Path:
    return root / f"epoch_{e:03d}.npy"


def _sums_file(root: Path, e: int) -> Path:
    return root / f"epoch_{e:03d}.sum.npy"


def _read_meta(root: Path) -> CacheMeta | None:
    p = root / "meta.json"
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    d["teachers"] = tuple(d["teachers"])
    return CacheMeta(**d)


def pixel_sums(images: torch.Tensor) -> np.ndarray:
    """Per-view int64 pixel sums: a cheap fingerprint of an augmented view."""
    return images.to(torch.int64).sum(dim=(1, 2, 3)).cpu().numpy()


class LogitCache:
    """A `TeacherSource` replaying cached teacher logits; open with `LogitCache(root)`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = _read_meta(self.root)
        if meta is None:
            raise FileNotFoundError(f"no logit cache at {self.root} (build it with build_logit_cache)")
        missing = [e for e in range(meta.epochs) if not _logits_file(self.root, e).is_file()]
        if missing:
            raise FileNotFoundError(f"logit cache {self.root} lacks epochs {missing}; rerun build_logit_cache")
        self.meta = meta
        self._logits = [np.load(_logits_file(self.root, e), mmap_mode="r") for e in range(meta.epochs)]
        self._sums = [np.load(_sums_file(self.root, e)) for e in range(meta.epochs)]

    @property
    def seed(self) -> int:
        return self.meta.seed

    @property
    def epochs(self) -> int:
        return self.meta.epochs

    def train_loader(self, bundle: Any, cfg: Any, *, batch_size: int, device: torch.device) -> "ReplayLoader":
        """The loader whose epochs this cache replays: the cache's seed, any batch size, epoch e -> e % E."""
        from ..data import TrainLoader

        if len(bundle.train) != self.meta.num_train:
            raise CacheMismatch(f"the cache holds {self.meta.num_train} training images, the data {len(bundle.train)}")
        return ReplayLoader(TrainLoader(bundle, cfg, batch_size=batch_size, seed=self.seed, device=device), self.epochs)

    def logits(self, epoch: int, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Cached logits [T, B, C] (float16) of the views of `index` in `epoch` (replayed as epoch % E)."""
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self._logits[epoch % self.epochs][:, idx]))

    def check(self, batch: Any, epoch: int) -> None:
        """Raise `CacheMismatch` unless `batch` holds the very views the cache computed for `epoch`."""
        idx = batch.index.cpu().numpy()
        want = self._sums[epoch % self.epochs][idx]
        if (want < 0).any():
            raise CacheMismatch(f"cache epoch {epoch % self.epochs} has no logits for some indices of this batch")
        if not np.array_equal(pixel_sums(batch.images), want):
            raise CacheMismatch(
                f"the batch's augmented views differ from those cached for epoch {epoch % self.epochs}: build the "
                f"TrainLoader with the cache's seed ({self.seed}), e.g. via LogitCache.train_loader")

    def annotate(self, batches: Iterable[Any], epoch: int) -> Iterator[tuple[Any, torch.Tensor]]:
        for i, batch in enumerate(batches):
            if i == 0:
                self.check(batch, epoch)
            yield batch, self.logits(epoch, batch.index)


class ReplayLoader:
    """A `TrainLoader` seen through the cache: epoch e yields the inner loader's epoch e % E."""

    def __init__(self, inner: Any, epochs: int) -> None:
        self.inner, self.epochs = inner, epochs

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, e: int) -> Iterator[Any]:
        return self.inner.epoch(e % self.epochs)

    def views(self, e: int, indices: torch.Tensor) -> torch.Tensor:
        return self.inner.views(e % self.epochs, indices)


def build_logit_cache(
    source: Any, bundle: Any, cfg: Any, root: str | Path, *, key: str, seed: int, epochs: int,
    teachers: Sequence[str], device: torch.device, batch_size: int = 512,
) -> LogitCache:
    """Compute (or finish) the cache of `source`'s logits for `epochs` epochs of the stream seeded `seed`.

    `source` is any TeacherSource (in-process teachers or a `TeacherPool`); `cfg` the `DataConfig` whose
    augmentation the trials use. The views come from `TrainLoader.views(e, indices)` over every index in
    order, so each image has its logits whatever batch size a trial later uses. A cache with another `key`
    at `root` is replaced; one with the same key keeps its finished epochs (and can grow to more epochs).
    """
    from ..data import Batch, TrainLoader

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".epoch_*.tmp"):  # left by a build that was killed mid-epoch
        stale.unlink()
    old = _read_meta(root)
    if old is not None and (old.key != key or old.seed != seed):
        log.info("logit cache %s was built for other inputs; rebuilding", root)
        for p in root.glob("epoch_*.npy"):
            p.unlink()
    n = len(bundle.train)
    meta = CacheMeta(key=key, seed=seed, epochs=epochs, num_train=n, num_classes=bundle.num_classes,
                     teachers=tuple(teachers))
    atomic_write_json(root / "meta.json", asdict(meta))  # first: an interrupted build resumes under this key
    loader = TrainLoader(bundle, cfg, batch_size=batch_size, seed=seed, device=device, drop_last=False)
    labels = bundle.train.labels

    def view_batches(e: int) -> Iterator[Any]:
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(n, s + batch_size))
            yield Batch(loader.views(e, idx), labels[idx].to(device), idx.to(device))

    for e in range(epochs):
        if _logits_file(root, e).is_file() and _sums_file(root, e).is_file():
            continue
        t0 = time.perf_counter()
        sums = np.full(n, -1, dtype=np.int64)
        with atomic_path(_logits_file(root, e)) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                            shape=(len(teachers), n, bundle.num_classes))
            for batch, logits in source.annotate(view_batches(e), e):
                idx = batch.index.cpu().numpy()
                arr[:, idx] = logits.to(torch.float16).cpu().numpy()
                sums[idx] = pixel_sums(batch.images)
            arr.flush()
            del arr
            with atomic_path(_sums_file(root, e)) as stmp:
                with open(stmp, "wb") as f:
                    np.save(f, sums)
        log.info("logit cache: epoch %d/%d in %.1fs", e + 1, epochs, time.perf_counter() - t0)
    return LogitCache(root)
