"""A deterministic, learnable, CIFAR-shaped synthetic dataset (for CPU tests and smoke runs, any class count).

Why not noise: a smoke run must show that training, distillation and quantization *do* something, so the
labels have to be predictable from the pixels, yet not from one pixel or the mean colour (or every model
would hit 100 % at once and no method could be told apart from another).

Each class k owns a smooth colour texture: a base colour plus `WAVES` plane waves (orientation, spatial
frequency in cycles per image, phase and a colour per wave), i.e. a low-frequency prototype. A sample of
class k is that texture seen through a random similarity transform (shift, rotation, scale), with random
contrast and per-channel brightness, blended with a random other class's texture (a distractor), plus
pixel noise. Train and test are independent draws from the same distribution (different RNG streams).
Everything is a function of (seed, sizes, num_classes, image size) only.
"""

from __future__ import annotations

import math

import torch

from .arrays import ImageArrays
from .seeding import generator as _gen

VERSION = "synthetic-v1"
WAVES = 3
_CHUNK = 2048  # samples rendered at a time (bounded memory); the pixel noise stream is drawn per chunk


def _prototypes(num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-class texture parameters, shared by train and test."""
    g = _gen(seed, num_classes, 0)
    c = num_classes
    return {
        "base": 0.4 + 0.2 * torch.rand(c, 3, generator=g),  # base colour in [0.4, 0.6]: a weak cue on its own
        "theta": 2 * math.pi * torch.rand(c, WAVES, generator=g),  # wave orientation
        "freq": 1.0 + 3.0 * torch.rand(c, WAVES, generator=g),  # cycles per image, low frequency
        "phase": 2 * math.pi * torch.rand(c, WAVES, generator=g),
        "amp": 0.22 * (2 * torch.rand(c, WAVES, 3, generator=g) - 1),  # each wave's colour
    }


def _render(proto: dict[str, torch.Tensor], cls: torch.Tensor, shift: torch.Tensor, rot: torch.Tensor,
            scale: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Textures of classes `cls` [B] under per-sample shift [B, 2], rotation [B], scale [B] -> [B, 3, H, W]."""
    yy, xx = grid  # [H, W] in image units, centred
    theta = proto["theta"][cls] + rot[:, None]  # [B, J]
    freq = proto["freq"][cls] * scale[:, None]
    kx = (2 * math.pi * freq * torch.cos(theta))[:, :, None, None]
    ky = (2 * math.pi * freq * torch.sin(theta))[:, :, None, None]
    x = xx[None, None] - shift[:, 0, None, None, None]
    y = yy[None, None] - shift[:, 1, None, None, None]
    waves = torch.sin(kx * x + ky * y + proto["phase"][cls][:, :, None, None])  # [B, J, H, W]
    tex = torch.einsum("bjhw,bjc->bchw", waves, proto["amp"][cls])
    return proto["base"][cls][:, :, None, None] + tex


def _split(proto: dict[str, torch.Tensor], n: int, num_classes: int, size: int, seed: int,
           stream: int) -> ImageArrays:
    g = _gen(seed, num_classes, n, size, stream)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]  # balanced, shuffled
    other = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes  # distractor class
    shift = torch.rand(n, 2, generator=g) - 0.5  # anywhere within half an image
    rot = (torch.rand(n, generator=g) - 0.5) * (math.pi / 3)  # +-30 degrees
    scale = 0.8 + 0.45 * torch.rand(n, generator=g)
    o_shift = torch.rand(n, 2, generator=g) - 0.5
    mix = 0.15 + 0.35 * torch.rand(n, generator=g)  # distractor weight
    contrast = 0.6 + 0.8 * torch.rand(n, generator=g)
    bright = 0.06 * torch.randn(n, 3, generator=g)
    noise_sd = 0.04 + 0.08 * torch.rand(n, generator=g)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    grid = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    zero = torch.zeros(n)
    for s in range(0, n, _CHUNK):
        sl = slice(s, min(n, s + _CHUNK))
        own = _render(proto, labels[sl], shift[sl], rot[sl], scale[sl], grid)
        dis = _render(proto, other[sl], o_shift[sl], zero[sl], torch.ones(sl.stop - s), grid)
        m = mix[sl, None, None, None]
        x = (1 - m) * own + m * dis
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + contrast[sl, None, None, None] * (x - mean) + bright[sl, :, None, None]
        x = x + noise_sd[sl, None, None, None] * torch.randn(x.shape, generator=g)
        images[sl] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageArrays(images, labels.to(torch.int64))


def make_synthetic(num_classes: int, train_size: int, test_size: int, seed: int = 0,
                   image_size: int = 32) -> tuple[ImageArrays, ImageArrays, str]:
    """(train, test, version) of the synthetic dataset; the same arguments always give the same bytes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (got {num_classes})")
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size and test_size must be >= 1 (got {train_size}, {test_size})")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (got {image_size})")
    proto = _prototypes(num_classes, seed)
    train = _split(proto, train_size, num_classes, image_size, seed, stream=1)
    test = _split(proto, test_size, num_classes, image_size, seed, stream=2)
    version = f"{VERSION}:seed={seed}:n={train_size}/{test_size}:c={num_classes}"
    if image_size != 32:
        version += f":hw={image_size}"
    return train, test, version
