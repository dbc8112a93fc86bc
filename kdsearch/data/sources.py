"""Where the images come from: torchvision CIFAR, an image folder (or a .tar.gz of one), or the synthetic set.

Every source ends as uint8 arrays in memory (see `arrays`). Image folders are decoded once and cached as an
safetensors file (atomic write) keyed by the folder's or archive's identity, so later loads are a file read.
Archives are streamed (tarfile) and decoded without being extracted: one pass, no 60k small files on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# check_data and its helpers are torch-free (kdsearch validate); re-exported here, where they always were
from ..data_checks import (IMG_EXTENSIONS, _FOLDER_LAYOUT, _cache_file, _check_imagefolder,  # noqa: F401
                           _cifar_missing, _cifar_present, _folder_base, _split_class, cache_dir, check_data,
                           data_root, known_image_shape)
from ..io import atomic_path
from .arrays import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DataBundle, DataError,
                     ImageArrays, channel_stats)
from .seeding import generator
from .synthetic import make_synthetic

if TYPE_CHECKING:
    from ..spec import DataConfig

_CIFAR = {  # dataset -> (torchvision class name, mean, std); the files it needs are in data_checks
    "cifar10": ("CIFAR10", CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("CIFAR100", CIFAR100_MEAN, CIFAR100_STD),
}
_SUBSET_STREAMS = {"train": 11, "test": 12, "val": 13}


# -- subsets --------------------------------------------------------------------------------------------
def class_balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of n samples, as balanced over classes as the data allows, chosen by `seed`.

    Each sample gets its rank within a seeded shuffle of its class; taking samples in rank order (ties
    between classes in a seeded class order) gives every class floor(n / C) or one more, unless a class runs
    out, in which case the others fill in.
    """
    total = labels.numel()
    if n >= total:
        return torch.arange(total)
    g = generator(seed, n, total)
    perm = torch.randperm(total, generator=g).numpy()  # a seeded shuffle
    # numpy for the sorts: small single-threaded sorts avoid torch's thread-pool overhead on busy machines
    classes, inverse = np.unique(labels.cpu().numpy(), return_inverse=True)
    tie = torch.randperm(len(classes), generator=g).numpy()  # seeded class order within a rank
    lab = inverse.reshape(-1)[perm]  # class of each shuffled sample
    by_class = np.argsort(lab, kind="stable")
    counts = np.bincount(lab, minlength=len(classes))
    rank = np.empty(total, dtype=np.int64)
    rank[by_class] = np.arange(total) - (np.cumsum(counts) - counts)[lab[by_class]]
    take = np.argsort(rank * len(classes) + tie[lab], kind="stable")[:n]
    return torch.from_numpy(np.sort(perm[take]))


def stratified_split(labels: torch.Tensor, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), both sorted: `n_val` samples held out, stratified by class, chosen by `seed`.

    Each class gives round(n_val * its share) samples (largest remainders settle the rounding, so the total is
    exactly `n_val`), drawn by a seeded shuffle within the class; every class keeps at least one training image.
    A request no split can meet (more than all classes can give) is a `DataError`, never a shorter split.
    """
    total = labels.numel()
    lab = labels.cpu().numpy()
    classes, counts = np.unique(lab, return_counts=True)
    room = int((counts - 1).sum())  # what the classes can give and keep one training image each
    if not 1 <= n_val <= room:
        raise DataError(f"the validation split needs 1 <= val_size <= {room} images here ({total} training images "
                        f"in {len(classes)} classes, each keeping one; got {n_val}); set data.val_size smaller")
    exact = n_val * counts / total
    take = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    order = np.lexsort((classes, -(exact - take)))  # largest remainder first, ties by class id
    while take.sum() < n_val:  # as many passes as needed: a class that is full passes its turn on
        for k in order:
            if take.sum() >= n_val:
                break
            if take[k] < counts[k] - 1:
                take[k] += 1
    g = generator(seed, n_val, total, _SUBSET_STREAMS["val"])
    perm = torch.randperm(total, generator=g).numpy()
    val = [perm[lab[perm] == c][:k] for c, k in zip(classes, take)]  # each class in seeded order
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    mask = np.ones(total, dtype=bool)
    mask[val_idx] = False
    return torch.from_numpy(np.flatnonzero(mask)), torch.from_numpy(val_idx)


def val_count(val_size: int | float, n: int) -> int:
    """`data.val_size` as a number of images: a count as given, a fraction of the n training images rounded."""
    return int(val_size) if isinstance(val_size, int) else max(1, int(round(float(val_size) * n)))


def _maybe_subset(arrays: ImageArrays, n: int | None, seed: int, split: str) -> tuple[ImageArrays, bool]:
    if n is None or n >= len(arrays):
        return arrays, False
    return arrays.subset(class_balanced_subset(arrays.labels, n, seed + _SUBSET_STREAMS[split])), True


# -- CIFAR via torchvision -------------------------------------------------------------------------------
def _load_cifar(cfg: DataConfig, seed: int) -> DataBundle:
    import torchvision

    cls_name, mean, std = _CIFAR[cfg.dataset]
    root = data_root(cfg)
    present = _cifar_present(cfg, root)
    if not present and not cfg.download:
        raise _cifar_missing(cfg, root, "download: false")
    cls = getattr(torchvision.datasets, cls_name)
    splits = {}
    try:
        for split in ("train", "test"):
            ds = cls(str(root), train=split == "train", download=not present)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            splits[split] = ImageArrays(images, torch.as_tensor(ds.targets, dtype=torch.int64))
    except Exception as err:  # no internet, a corrupt file, a half download: say how to provide the files
        why = f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
        raise _cifar_missing(cfg, root, f"loading failed with {why}") from err
    return _bundle(cfg, seed, splits, tuple(ds.classes), mean, std, f"{cfg.dataset}-torchvision")


# -- image folders and archives -------------------------------------------------------------------------
def _folder_files(base: Path) -> list[tuple[str, str, Path]]:
    out = []
    for split in ("train", "val", "test"):
        if not (base / split).is_dir():
            continue
        for cdir in sorted(p for p in (base / split).iterdir() if p.is_dir()):
            for f in sorted(cdir.iterdir()):
                sc = _split_class((split, cdir.name, f.name))
                if sc and f.is_file():
                    out.append((split, cdir.name, f))
    return out


def _decode(blob: bytes, where: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        from PIL import Image  # formats libjpeg/libpng do not cover (bmp, tiff, ...)

        try:
            with Image.open(io.BytesIO(blob)) as im:
                return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        except Exception as err:
            raise DataError(f"cannot decode image {where}: {type(err).__name__}: {err}") from err


def _entries(root: Path) -> Iterable[tuple[str, str, str, bytes]]:
    """(split, class, name, bytes) for every image of a folder or archive."""
    if root.is_dir():
        for split, cls, f in _folder_files(_folder_base(root)):
            yield split, cls, str(f), f.read_bytes()
        return
    try:
        with tarfile.open(root, "r:*") as tf:
            for m in tf:
                sc = _split_class(tuple(m.name.split("/"))) if m.isfile() else None
                if sc:
                    yield sc[0], sc[1], m.name, tf.extractfile(m).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"cannot read archive {root} ({type(err).__name__}: {err}); give {_FOLDER_LAYOUT}") from err


def decode_folder(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Decode every image of an image folder / archive: the tensors and metadata the cache stores."""
    items = sorted(_entries(root), key=lambda t: (t[0], t[1], t[2]))
    classes = sorted({c for s, c, _, _ in items if s == "train"})
    test_classes = sorted({c for s, c, _, _ in items if s == "test"})
    if len(classes) < 2 or not test_classes:
        raise DataError(f"imagefolder {root} needs >= 2 classes with images in train/ and test/; give {_FOLDER_LAYOUT}")
    for split in ("val", "test"):
        extra = {c for s, c, _, _ in items if s == split} - set(classes)
        if extra:
            raise DataError(f"imagefolder {root}: {split} classes {sorted(extra)} are not in train/")
    index = {c: k for k, c in enumerate(classes)}
    decoded = {split: [(_decode(blob, name), cls, name) for s, cls, name, blob in items if s == split]
               for split in ("train", "val", "test")}
    if not decoded["val"]:
        del decoded["val"]
    del items
    shape = decoded["train"][0][0].shape
    tensors: dict[str, torch.Tensor] = {}
    for split, rows in decoded.items():
        for x, _, name in rows:
            if x.shape != shape:
                raise DataError(f"imagefolder images must share one size: {name} is {tuple(x.shape)}, "
                                f"others {tuple(shape)}; resize them first")
        tensors[f"{split}_images"] = torch.stack([x for x, _, _ in rows])
        tensors[f"{split}_labels"] = torch.tensor([index[c] for _, c, _ in rows], dtype=torch.int64)
    mean, std = channel_stats(tensors["train_images"])
    meta = {"classes": json.dumps(classes), "mean": json.dumps(mean), "std": json.dumps(std),
            "content": content_digest(tensors, classes)}
    return tensors, meta


def content_digest(tensors: dict[str, torch.Tensor], classes: list[str] | tuple[str, ...]) -> str:
    """A hash of the decoded images, labels and class names: the data's version.

    The cache file is found by a cheap fingerprint (path, size, mtime), but the version that resume keys and
    logit caches fold in must not change when the same archive is copied to another node or another path, or
    touched; it must change when any image does. Hashing the decoded uint8 arrays costs about a second per 200 MB,
    once per decode (stored in the cache's metadata).
    """
    h = hashlib.sha256(json.dumps(list(classes)).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy())  # the buffer itself: no copy of the ~200 MB of images
    return h.hexdigest()[:16]


def _load_imagefolder(cfg: DataConfig, seed: int) -> DataBundle:
    root = _check_imagefolder(cfg)
    path, ident = _cache_file(root)
    tensors: dict[str, torch.Tensor] = {}
    if path.is_file():  # safetensors: a memory map, copied out so that the file may be replaced later
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        except Exception:  # an unreadable cache is only a cache: decode again
            tensors = {}
    if tensors and "content" not in meta:  # a cache written before the version was content-based
        tensors = {}
    if not tensors:
        tensors, meta = decode_folder(root)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
    splits = {s: ImageArrays(tensors[f"{s}_images"], tensors[f"{s}_labels"])
              for s in ("train", "val", "test") if f"{s}_images" in tensors}
    mean = tuple(json.loads(meta["mean"]))
    std = tuple(json.loads(meta["std"]))
    classes = tuple(json.loads(meta["classes"]))
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise DataError(f"data.num_classes is {cfg.num_classes} but {root} has {len(classes)} classes "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); remove num_classes")
    name = ident.split(":")[0]
    return _bundle(cfg, seed, splits, classes, mean, std, f"imagefolder-v2:{name}:{meta['content']}")  # type: ignore[arg-type]


# -- entry points ---------------------------------------------------------------------------------------
def _hold_out(train: ImageArrays, cfg: DataConfig, seed: int) -> tuple[ImageArrays, ImageArrays, str]:
    """Carve the validation split out of the train split (stratified, seeded); the version names both."""
    n_val = val_count(cfg.val_size, len(train))
    tr_idx, val_idx = stratified_split(train.labels, n_val, seed)
    return train.subset(tr_idx), train.subset(val_idx), f"val={n_val}@{seed}"


def _bundle(cfg: DataConfig, seed: int, splits: dict[str, ImageArrays], classes: tuple[str, ...],
            mean: tuple[float, ...], std: tuple[float, ...], source: str) -> DataBundle:
    train, sub_tr = _maybe_subset(splits["train"], cfg.train_size, seed, "train")
    test, sub_te = _maybe_subset(splits["test"], cfg.test_size, seed, "test")
    if "val" in splits:  # the data's own validation split (an image folder's val/)
        val, val_tag = splits["val"], "val=folder"
    else:
        train, val, val_tag = _hold_out(train, cfg, seed)
    version = f"{source}:n={len(train)}/{len(val)}/{len(test)}:c={len(classes)}:{val_tag}"
    if sub_tr or sub_te:
        version += f":subset-seed={seed}"
    return DataBundle(train, val, test, len(classes), classes, mean, std, version)  # type: ignore[arg-type]


def load_data(cfg: DataConfig, seed: int | None = None) -> DataBundle:
    """The train, validation and test splits of `cfg.dataset` as uint8 arrays, with class names, statistics
    and provenance.

    `cfg.train_size` / `test_size` are the sizes of the synthetic sets, or pick a class-balanced subset of a
    real split; `cfg.val_size` images are then held out of the train split for validation, unless the data
    has its own (an image folder's val/). Everything is seeded by `seed` (default `cfg.split_seed`), which is
    a property of the data, not of a training run: every seed of a multi-seed run sees the same splits.
    Raises `DataError` (one line, with the fix) when data is missing.
    """
    seed = cfg.split_seed if seed is None else seed
    ds = cfg.dataset
    if ds in _CIFAR:
        return _load_cifar(cfg, seed)
    if ds == "imagefolder":
        return _load_imagefolder(cfg, seed)
    if ds == "synthetic":
        pool, test, version = make_synthetic(cfg.num_classes, cfg.train_size or 50_000,
                                             cfg.test_size or 10_000, seed=seed)
        train, val, val_tag = _hold_out(pool, cfg, seed)
        mean, std = channel_stats(train.images)
        names = tuple(f"class_{k:0{len(str(cfg.num_classes - 1))}d}" for k in range(cfg.num_classes))
        return DataBundle(train, val, test, cfg.num_classes, names, mean, std,  # type: ignore[arg-type]
                          f"{version}:{val_tag}")
    raise DataError(f"unknown dataset {ds!r}; choose cifar10, cifar100, imagefolder or synthetic")



def image_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """The data's image shape (C, H, W), what BOPs are counted on: from the spec where it says it (CIFAR,
    synthetic), else from the decoded images (an image folder; ``load_data`` reads its cache)."""
    return known_image_shape(cfg) or load_data(cfg).image_shape
