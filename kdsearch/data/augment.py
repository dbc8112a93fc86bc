"""Augmentation with reproducible views: the view of image i in epoch e under seed s is a function of
(s, e, i) and the augmentation settings only, never of batch size, order, worker count or device.

The logit cache depends on it: teacher logits are computed once for the augmented views of a few seeded
epochs and replayed later, so the student must see exactly the same pixels when it replays that epoch.

Two implementations, chosen by `DataConfig.augment`:

* Batch path ("none", "standard"): the per-sample parameters of an epoch (crop offsets, flip, cutout
  centre, random-erasing box) are drawn for all N samples at once from a generator seeded by (s, e) and
  indexed by i; the augmentation itself is pure integer indexing and masking of whole uint8 batches, so it
  runs on whichever device holds the data (the GPU path keeps CIFAR there) and gives identical bytes on
  CPU and GPU. Standard = pad-4 random crop + horizontal flip (He et al. 2016).
* Per-sample path ("autoaugment", "randaugment", "trivialaugment"): torchvision.transforms.v2 policies
  (Cubuk et al. 2019 AutoAugment, CIFAR-10 policy; Cubuk et al. 2020 RandAugment; Mueller & Hutter 2021
  TrivialAugment) after pad-crop + flip, run per image in DataLoader workers. v2 transforms draw from torch's
  global RNG, so each view runs inside `torch.random.fork_rng` seeded from a hash of (s, e, i). (They do not
  use Python's `random`.)

Both paths end with Cutout (DeVries & Taylor 2017: a `cutout`-pixel square, centre uniform over the image,
clipped at the border, filled with 0) and Random Erasing (Zhong et al. 2020, torchvision's defaults:
scale (0.02, 0.33), ratio (0.3, 3.3), value 0, probability `random_erasing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torchvision.transforms import v2

from .seeding import derive_seed, generator

if TYPE_CHECKING:
    from ..spec import DataConfig

PAD = 4  # pixels of zero padding before the random crop (standard CIFAR augmentation)
BATCH_AUGMENTS = ("none", "standard")
POLICY_AUGMENTS = ("autoaugment", "randaugment", "trivialaugment")
_ERASE_SCALE = (0.02, 0.33)
_ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))
_ERASE_TRIES = 10  # as torchvision: the first of 10 drawn boxes that fits, else no erasing
_VIEW_STREAM = 0x5EED  # separates per-sample view seeds from other uses of (seed, epoch, index)


@dataclass(frozen=True)
class AugmentSpec:
    """The augmentation fields of a `DataConfig` (the only settings a view depends on)."""

    augment: str = "standard"
    cutout: int = 0
    random_erasing: float = 0.0

    def __post_init__(self) -> None:
        if self.augment not in BATCH_AUGMENTS + POLICY_AUGMENTS:
            raise ValueError(f"augment must be one of {BATCH_AUGMENTS + POLICY_AUGMENTS} (got {self.augment!r})")
        if self.cutout < 0:
            raise ValueError(f"cutout must be >= 0 pixels (got {self.cutout})")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing must be a probability in [0, 1] (got {self.random_erasing})")

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "AugmentSpec":
        return cls(cfg.augment, cfg.cutout, cfg.random_erasing)

    @property
    def batched(self) -> bool:
        return self.augment in BATCH_AUGMENTS


@dataclass(frozen=True)
class EpochParams:
    """Per-sample parameters of one epoch's batch augmentation, all [N] int64 (or bool) tensors.

    Crop offsets dy, dx index the zero-padded image (PAD = no shift); a cutout or erasing box is the
    half-open rectangle [y0, y1) x [x0, x1) (empty when y0 == y1).
    """

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    cut_y0: torch.Tensor
    cut_y1: torch.Tensor
    cut_x0: torch.Tensor
    cut_x1: torch.Tensor
    er_y0: torch.Tensor
    er_y1: torch.Tensor
    er_x0: torch.Tensor
    er_x1: torch.Tensor

    def take(self, idx: torch.Tensor) -> "EpochParams":
        return EpochParams(*(getattr(self, f.name)[idx] for f in fields(self)))

    def to(self, device: torch.device | str) -> "EpochParams":
        return EpochParams(*(getattr(self, f.name).to(device) for f in fields(self)))


def _cutout_box(cy: torch.Tensor, cx: torch.Tensor, size: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    y0 = (cy - size // 2).clamp(0, h)
    x0 = (cx - size // 2).clamp(0, w)
    return y0, (cy - size // 2 + size).clamp(0, h), x0, (cx - size // 2 + size).clamp(0, w)


def _erasing_boxes(n: int, h: int, w: int, p: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Vectorised torchvision RandomErasing box sampling: 10 tries per sample, the first that fits wins."""
    area = h * w * (_ERASE_SCALE[0] + (_ERASE_SCALE[1] - _ERASE_SCALE[0]) * torch.rand(n, _ERASE_TRIES, generator=g))
    ratio = torch.exp(_ERASE_LOG_RATIO[0] + (_ERASE_LOG_RATIO[1] - _ERASE_LOG_RATIO[0])
                      * torch.rand(n, _ERASE_TRIES, generator=g))
    eh = torch.sqrt(area * ratio).round().long()
    ew = torch.sqrt(area / ratio).round().long()
    fits = (eh < h) & (ew < w)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
    top = (torch.rand(n, generator=g) * (h - eh + 1)).floor().long().clamp_max(h - 1)
    left = (torch.rand(n, generator=g) * (w - ew + 1)).floor().long().clamp_max(w - 1)
    on = (torch.rand(n, generator=g) < p) & fits.any(dim=1)
    eh, ew = torch.where(on, eh, 0), torch.where(on, ew, 0)
    return top, top + eh, left, left + ew


def draw_epoch_params(n: int, h: int, w: int, spec: AugmentSpec, seed: int, epoch: int) -> EpochParams:
    """Parameters for all n samples of `epoch`, from a CPU generator seeded by (seed, epoch) only.

    Every quantity is drawn for every sample, whether used or not, so that turning one augmentation on or
    off does not shift the random stream of the others.
    """
    g = generator(seed, epoch, _VIEW_STREAM)
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    cy = torch.randint(0, h, (n,), generator=g)
    cx = torch.randint(0, w, (n,), generator=g)
    erase = _erasing_boxes(n, h, w, spec.random_erasing, g)
    if spec.augment == "none":
        dy, dx, flip = torch.full_like(dy, PAD), torch.full_like(dx, PAD), torch.zeros_like(flip)
    cut = _cutout_box(cy, cx, spec.cutout, h, w)
    return EpochParams(dy, dx, flip, *cut, *erase)


def _box_mask(y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, 1, H, W] bool mask of the per-sample boxes [y0, y1) x [x0, x1)."""
    ys = torch.arange(h, device=y0.device)
    xs = torch.arange(w, device=x0.device)
    in_y = (ys[None] >= y0[:, None]) & (ys[None] < y1[:, None])
    in_x = (xs[None] >= x0[:, None]) & (xs[None] < x1[:, None])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def batch_augment(images: torch.Tensor, p: EpochParams) -> torch.Tensor:
    """Augment a uint8 batch [B, 3, H, W] with its samples' parameters (same device), -> uint8 [B, 3, H, W].

    Crop-from-padded and flip are one gather (3-4x faster on CPU than 4-D advanced indexing): output pixel (i, j) reads source row dy + i - PAD and column
    dx + j - PAD (or dx + W - 1 - j - PAD when flipped); reads outside the image are the zero padding.
    """
    b, c, h, w = images.shape
    dev = images.device
    rows = p.dy[:, None] + torch.arange(h, device=dev)[None] - PAD  # [B, H]
    j = torch.arange(w, device=dev)[None]
    cols = p.dx[:, None] + torch.where(p.flip[:, None], w - 1 - j, j) - PAD  # [B, W]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    pix = (rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]).view(b, 1, h * w)
    out = images.reshape(b, c, h * w).gather(2, pix.expand(b, c, h * w)).view(b, c, h, w)  # one flat gather
    erase = ~valid[:, None]
    erase = erase | _box_mask(p.cut_y0, p.cut_y1, p.cut_x0, p.cut_x1, h, w)
    erase = erase | _box_mask(p.er_y0, p.er_y1, p.er_x0, p.er_x1, h, w)
    return out.masked_fill_(erase, 0)


def _policy(name: str) -> v2.Transform:
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    if name == "randaugment":
        return v2.RandAugment()
    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    raise ValueError(f"no per-sample policy named {name!r}; choose from {POLICY_AUGMENTS}")


class SeededViews:
    """Per-sample policy augmentation of in-memory uint8 images; picklable, so it runs in DataLoader workers.

    `view(i, epoch)` reseeds torch's RNG from (seed, epoch, i) inside `fork_rng`, so the caller's RNG state is
    untouched and the result does not depend on which process computes it or in which order.
    """

    def __init__(self, images: torch.Tensor, spec: AugmentSpec, seed: int) -> None:
        if spec.batched:
            raise ValueError(f"SeededViews is for the policies {POLICY_AUGMENTS} (got {spec.augment!r})")
        self.images = images
        self.spec = spec
        self.seed = int(seed)
        h, w = images.shape[-2:]
        self.transform = v2.Compose([
            v2.RandomCrop((h, w), padding=PAD),
            v2.RandomHorizontalFlip(),
            _policy(spec.augment),
        ])
        self.erasing = v2.RandomErasing(p=spec.random_erasing) if spec.random_erasing > 0 else None

    def view(self, i: int, epoch: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, i, _VIEW_STREAM))
            x = self.transform(self.images[i])
            h, w = x.shape[-2:]
            if self.spec.cutout > 0:
                cy, cx = torch.randint(0, h, (1,)), torch.randint(0, w, (1,))
                y0, y1, x0, x1 = (int(v) for v in _cutout_box(cy, cx, self.spec.cutout, h, w))
                x = x.clone()
                x[:, y0:y1, x0:x1] = 0
            if self.erasing is not None:
                x = self.erasing(x)
        return x.contiguous()
