"""Starting or joining Ray: the embedded local default, or an existing cluster (`--address auto`)."""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

log = logging.getLogger("kdsearch.ray")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once per process. Local Ray needs no service; `address='auto'` joins `ray up`'s cluster."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)  # never a `ray start` cluster by accident
    res = ray.cluster_resources()
    log.info("ray: %s with %s CPUs, %s GPUs", address or "local", res.get("CPU", 0), res.get("GPU", 0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def where() -> dict[str, Any]:
    """The node a task runs on (id, IP, host, pid, device), recorded in every output it writes."""
    import ray

    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    return {"node_id": ctx.get_node_id() if ctx else None,
            "ip": ray.util.get_node_ip_address() if ray.is_initialized() else None,
            "host": platform.node(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []}


def task_device(requested: str) -> Any:
    """The device of the running Ray task: CUDA only when Ray gave this task a GPU, so a task never takes an
    uncounted share of a GPU and the driver's own device never matters. Outside Ray: `resolve_device`."""
    import ray
    import torch

    from .runtime import DeviceError, resolve_device

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return resolve_device(requested)
    if requested != "cpu" and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise DeviceError("the spec asks for device: cuda but Ray gave this task no GPU; give the cluster GPU "
                          "workers or set device: auto")
    return torch.device("cpu")


def check_device(requested: str, address: str | None) -> None:
    """`device: cuda` needs GPUs where the work runs: this machine for the local Ray, the cluster's workers
    otherwise (the driver's own node may have none). A one-line `DeviceError` before any compute."""
    from .runtime import DeviceError

    if requested != "cuda":
        return
    if address is None:
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("the spec asks for device: cuda but this machine has no visible GPU; set device: auto "
                              "or cpu, or join a GPU cluster with --address")
        return
    ensure_ray(address)
    if cluster_gpus() == 0:
        raise DeviceError(f"the spec asks for device: cuda but the Ray cluster at {address} has no GPUs; add GPU "
                          "workers or set device: auto")
