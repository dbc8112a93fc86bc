"""In-memory image arrays, the data bundle every stage shares, and on-device normalisation.

Why uint8 tensors in memory rather than a Dataset of files: CIFAR is 150 MB as uint8, so the whole train
set fits in RAM (and in GPU memory), augmentation can run on whole batches, and the logit cache can ask for
the exact view of any image without touching a disk. Normalisation is kept out of the data (it happens
on the device, inside `Normalizer`) so that teachers served by Ray actors can receive compact uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data_checks import DataError  # noqa: F401  (defined torch-free, for `kdsearch validate`; re-exported)

# Per-channel statistics of the CIFAR train splits in [0, 1] pixel units (the true per-pixel std, not the
# 0.2023/0.1994/0.2010 values that circulate from an early repository and are the std of image means).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class ImageArrays:
    """A split held in memory: uint8 images [N, 3, H, W] (CPU) and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W] (got {im.dtype} {tuple(im.shape)})")
        if lb.dtype != torch.int64 or lb.dim() != 1 or lb.shape[0] != im.shape[0]:
            raise ValueError(f"labels must be int64 [N] with N = {im.shape[0]} (got {lb.dtype} {tuple(lb.shape)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor) -> "ImageArrays":
        """The images at `indices` (a copy), in the given order."""
        return ImageArrays(self.images[indices].contiguous(), self.labels[indices].contiguous())


@dataclass(frozen=True)
class DataBundle:
    """Everything a stage needs to know about the data; `version` is its provenance string.

    `mean` / `std` are in [0, 1] pixel units: the published constants for CIFAR, computed from the train
    images otherwise (see `channel_stats`).

    Three splits, three jobs: `train` trains (teachers, students, trials), `val` (held out of the train
    split, or the data's own val/ folder) makes every choice, and `test` only reports the chosen models.
    """

    train: ImageArrays
    val: ImageArrays
    test: ImageArrays
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    version: str

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (got {self.num_classes})")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.train.images.shape[1:])} "
                f"vs {tuple(self.test.images.shape[1:])}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 values with std > 0 (got {self.mean}, {self.std})")
        if self.val.images.shape[1:] != self.train.images.shape[1:]:
            raise ValueError(f"validation images {tuple(self.val.images.shape[1:])} differ in shape from train")
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= self.num_classes):
                raise ValueError(f"{name} labels must lie in [0, {self.num_classes})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 [N, 3, H, W] images in [0, 1] units (float64 sums, chunked)."""
    if images.shape[0] == 0:
        raise ValueError("cannot compute channel statistics of an empty image set")
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


class Normalizer(nn.Module):
    """uint8 (or float in [0, 255]) [B, 3, H, W] -> float32 ((x / 255 - mean) / std), on the input's device.

    Folded into one multiply-add: x * (1 / (255 std)) + (-mean / std). The constants follow the input to its
    device, so the module works whether or not it was moved with `.to(device)`.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"Normalizer needs 3 means and 3 stds > 0 (got {mean}, {std})")
        m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.register_buffer("scale", (1.0 / (255.0 * s)).float(), persistent=False)
        self.register_buffer("shift", (-m / s).float(), persistent=False)

    @classmethod
    def from_bundle(cls, bundle: DataBundle) -> "Normalizer":
        return cls(bundle.mean, bundle.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Normalizer expects [B, 3, H, W] images (got {tuple(x.shape)})")
        scale = self.scale.to(x.device, non_blocking=True)
        shift = self.shift.to(x.device, non_blocking=True)
        return torch.addcmul(shift, x.to(torch.float32), scale)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"
