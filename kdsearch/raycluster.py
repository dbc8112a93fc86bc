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
    # No address means kdsearch's own local Ray. Ray's default for None is to join whatever cluster it finds on the
    # machine (another user's run, even one that is shutting down: a 13-minute hang on a shared VM); only RAY_ADDRESS,
    # Ray's documented way to point every process at a cluster, still overrides.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    res = ray.cluster_resources()
    log.info("ray: %s with %s CPUs, %s GPUs", address, res.get("CPU", 0), res.get("GPU", 0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
