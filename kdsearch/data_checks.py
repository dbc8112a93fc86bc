"""Whether a spec's data can be found, answered without importing torch (`kdsearch validate` runs this).

Why a module of its own, outside `kdsearch.data`: importing anything in that package imports torch and
torchvision (seconds), while these checks are file-existence tests, a directory listing, reading archive
member names and a socket probe. `kdsearch.data.sources` loads the data and re-exports `check_data`;
`DataError` lives here so that the check and the loaders raise the one same class.
"""

from __future__ import annotations

import os
import socket
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from .io import stable_hash

if TYPE_CHECKING:
    from .spec import DataConfig


class DataError(RuntimeError):
    """Data that cannot be found, read or used; `str(err)` is one line that says how to fix it."""


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_CIFAR_FILES = {  # dataset -> (folder torchvision extracts to, files in it)
    "cifar10": ("cifar-10-batches-py", ("data_batch_1", "test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}
_FOLDER_LAYOUT = "a folder (or .tar.gz) with train/<class>/<image> and test/<class>/<image>"
_CACHE_FORMAT = 2  # 2: image folders may carry a val/ split


def data_root(cfg: DataConfig) -> Path:
    """cfg.root, else $KDSEARCH_DATA, else ~/.cache/kdsearch/data."""
    root = cfg.root or os.environ.get("KDSEARCH_DATA") or "~/.cache/kdsearch/data"
    return Path(root).expanduser()


def cache_dir() -> Path:
    """$KDSEARCH_CACHE, else ~/.cache/kdsearch: where decoded image folders are kept."""
    return Path(os.environ.get("KDSEARCH_CACHE") or "~/.cache/kdsearch").expanduser()


def _cifar_missing(cfg: DataConfig, root: Path, why: str) -> DataError:
    name = "CIFAR-10" if cfg.dataset == "cifar10" else "CIFAR-100"
    folder = _CIFAR_FILES[cfg.dataset][0]
    return DataError(
        f"{name} not found under {root} ({why}); put torchvision's files there ({root}/{folder}/, i.e. the "
        f"extracted official python tarball), or set data.download: true on a machine with internet, or set "
        f"data.root / $KDSEARCH_DATA to a folder that has them, or use dataset: imagefolder with root: "
        f"{_FOLDER_LAYOUT}".replace("\n", " ")
    )


def _cifar_present(cfg: DataConfig, root: Path) -> bool:
    folder, files = _CIFAR_FILES[cfg.dataset]
    return all((root / folder / f).is_file() for f in files)


def _online(host: str = "www.cs.toronto.edu", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _split_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('prefix', ..., 'train'|'val'|'test', class, file) -> (split, class), else None."""
    if len(parts) >= 3 and parts[-3] in ("train", "val", "test") and parts[-1].lower().endswith(IMG_EXTENSIONS):
        if not parts[-1].startswith("."):
            return parts[-3], parts[-2]
    return None


def _folder_base(root: Path) -> Path:
    """root itself when it holds train/ and test/, or its single subfolder that does (an extracted archive)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    subs = [p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir() and (p / "test").is_dir()]
    if len(subs) == 1:
        return subs[0]
    raise DataError(f"imagefolder root {root} has no train/ and test/ folders; give {_FOLDER_LAYOUT}")


def _identity(root: Path) -> tuple[str, str]:
    """(name, key): a cheap fingerprint that changes when the archive or a class folder changes."""
    if root.is_file():
        st = root.stat()
        return root.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz"), stable_hash(
            [str(root.resolve()), st.st_size, st.st_mtime_ns, _CACHE_FORMAT])
    base = _folder_base(root)
    dirs = [(s, d.name, d.stat().st_mtime_ns, len(os.listdir(d)))
            for s in ("train", "val", "test") if (base / s).is_dir() for d in sorted((base / s).iterdir()) if d.is_dir()]
    return base.name, stable_hash([str(base.resolve()), dirs, _CACHE_FORMAT])


def _cache_file(root: Path) -> tuple[Path, str]:
    name, key = _identity(root)
    return cache_dir() / "imagefolder" / f"{name}-{key}.safetensors", f"{name}:{key}"


def _check_imagefolder(cfg: DataConfig) -> Path:
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"imagefolder root {root} does not exist; give {_FOLDER_LAYOUT}")
    if root.is_dir():
        base = _folder_base(root)
        for split in ("train", "test"):
            if not any(p.is_dir() for p in (base / split).iterdir()):
                raise DataError(f"imagefolder {base}/{split} has no class folders; give {_FOLDER_LAYOUT}")
    elif not tarfile.is_tarfile(root):
        raise DataError(f"imagefolder root {root} is neither a folder nor a tar archive; give {_FOLDER_LAYOUT}")
    return root


def _scan_archive(root: Path) -> None:
    """Read member names until both splits have an image (no decoding): a malformed archive fails here."""
    seen: set[str] = set()
    try:
        with tarfile.open(root, "r:*") as tf:
            for m in tf:
                sc = _split_class(tuple(m.name.split("/"))) if m.isfile() else None
                if sc:
                    seen.add(sc[0])
                    if {"train", "test"} <= seen:
                        return
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"cannot read archive {root} ({type(err).__name__}: {err}); give {_FOLDER_LAYOUT}") from err
    raise DataError(f"archive {root} has no images under {', '.join({'train', 'test'} - seen)}/<class>/; "
                    f"give {_FOLDER_LAYOUT}")


def check_data(cfg: DataConfig) -> None:
    """Raise `DataError` now, before any compute, when `load_data(cfg)` could not find its data.

    Cheap: file-existence checks, a directory listing, or reading archive member names until both splits
    show up; no image is decoded. For CIFAR with `download: true` and no files it checks that the download
    host is reachable.
    """
    ds = cfg.dataset
    if ds in _CIFAR_FILES:
        root = data_root(cfg)
        if _cifar_present(cfg, root):
            return
        if not cfg.download:
            raise _cifar_missing(cfg, root, "download: false")
        if not _online():
            raise _cifar_missing(cfg, root, "no internet to download it")
    elif ds == "imagefolder":
        root = _check_imagefolder(cfg)
        if root.is_file() and not _cache_file(root)[0].is_file():
            _scan_archive(root)
    elif ds != "synthetic":
        raise DataError(f"unknown dataset {ds!r}; choose cifar10, cifar100, imagefolder or synthetic")


FIXED_IMAGE_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "synthetic": (3, 32, 32)}


def known_image_shape(cfg: DataConfig) -> tuple[int, int, int] | None:
    """The dataset's image shape (C, H, W) when the spec alone says it (CIFAR, synthetic); None for an image
    folder, whose images must be decoded to tell (``load_data(cfg).image_shape``)."""
    return FIXED_IMAGE_SHAPES.get(cfg.dataset)
