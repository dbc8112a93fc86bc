"""Process-level runtime choices: device, seeding, thread counts.

Kept apart from the training loop so that Ray workers, the CLI and tests make the same choices.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


class DeviceError(RuntimeError):
    """The spec asks for a device this machine does not have."""


def resolve_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; `cuda` on a machine without one is a user error, not a crash."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("the spec asks for device: cuda but no GPU is visible; set device: auto or cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_cpu_threads(num: float | int | None) -> None:
    """Pin torch's intra-op threads: a Ray worker with num_cpus=1 otherwise oversubscribes the host."""
    if num is None:
        return
    n = max(1, int(num))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
