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
    """Pin torch's intra-op threads to this process's share of CPUs: inside a Ray task, the CPUs Ray gave it (its
    assignment, which is what the scheduler counts); elsewhere `num`. A Ray worker with num_cpus=1 otherwise sizes
    torch's pool to the host and oversubscribes it. The data loaders size their worker processes by the same
    number (`kdsearch.data.loaders.loader_workers`)."""
    given = ray_task_cpus()
    if given is not None:
        num = given
    if num is None:
        return
    n = max(1, int(num))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def ray_task_cpus() -> float | None:
    """The CPUs Ray assigned to the running task or actor; None outside one (the driver, tests, plain scripts)."""
    import sys

    ray = sys.modules.get("ray")  # a process that never imported ray runs no Ray task
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return float(cpus) if cpus else None
