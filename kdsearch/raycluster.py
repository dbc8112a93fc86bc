"""Starting or joining Ray: the embedded local default, or an existing cluster (`--address auto`)."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("kdsearch.ray")

# Logs a warning at every local `ray.init` while RAY_AUTH_MODE is unset ("Token authentication is enabled ...");
# the cluster is secured either way, the banner only repeats Ray's default on every run.
TOKEN_BANNER_LOGGER = "ray._private.authentication.authentication_token_setup"
# Run in every worker process at startup, before a trial restores ("Restored on ... from checkpoint") or
# reports ("Checkpoint successfully created ..."): those INFO lines would reach this console once per epoch.
QUIET_WORKERS = "kdsearch.search.quiet.quiet_library_loggers"


def plain_worker_prefixes() -> None:
    """No ANSI colour codes around the "(task pid=...)" prefix of worker lines when the output is not a terminal
    (a log file, CI, a pipe). Ray reads RAY_COLOR_PREFIX when it prints each line; a user's setting wins."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect once per process. Local Ray needs no service; `address='auto'` joins `ray up`'s cluster.

    Console output: worker lines without colour codes off a terminal, no token-authentication banner, and
    workers whose Ray Tune/Train loggers say only warnings and errors."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    plain_worker_prefixes()
    logging.getLogger(TOKEN_BANNER_LOGGER).setLevel(logging.ERROR)
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False,
                    "runtime_env": {"worker_process_setup_hook": QUIET_WORKERS}}
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:  # None: Ray's default; "local": always a new local instance (tests, benchmarks)
        ray.init(address=address, num_cpus=num_cpus, **kwargs)
    res = ray.cluster_resources()
    log.info("ray: %s with %s CPUs, %s GPUs", address or "local", res.get("CPU", 0), res.get("GPU", 0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
