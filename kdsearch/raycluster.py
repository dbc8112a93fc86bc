"""Starting or joining Ray: the embedded local default, or an existing cluster (`--address auto`)."""

from __future__ import annotations

import logging
import os

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
        ray.init(num_cpus=num_cpus, **kwargs)
    res = ray.cluster_resources()
    log.info("ray: %s with %s CPUs, %s GPUs", address or "local", res.get("CPU", 0), res.get("GPU", 0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
