"""Starting or joining Ray: the embedded local default, or an existing cluster (`--address auto`)."""

from __future__ import annotations

import logging
import os
import platform
import sys
from typing import Any

log = logging.getLogger("kdsearch.ray")

# Logs a warning at every local `ray.init` while RAY_AUTH_MODE is unset ("Token authentication is enabled ...");
# the cluster is secured either way, the banner only repeats Ray's default on every run.
TOKEN_BANNER_LOGGER = "ray._private.authentication.authentication_token_setup"
# Run in every worker process at startup, before a trial restores ("Restored on ... from checkpoint") or
# reports ("Checkpoint successfully created ..."): those INFO lines would reach this console once per epoch.
QUIET_WORKERS = "kdsearch.search.quiet.quiet_library_loggers"


# Ray reads these when `ray` is first imported (a user's own value wins): per-epoch lines of teacher tasks look alike
# and must not be folded ("repeated 2x"); the autoscaler's event lines ("No available node types can fulfill
# resource request ...", every 35 s while a task waits) are Ray's words for what `kdsearch.capacity` says in ours.
QUIET_RAY_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_SCHEDULER_EVENTS": "0"}


def quiet_ray_env() -> None:
    """Set `QUIET_RAY_ENV` before any module imports ray; if ray is already imported, its autoscaler-event switch
    (read at import into `ray_constants.AUTOSCALER_EVENTS`) follows the environment too."""
    for k, v in QUIET_RAY_ENV.items():
        os.environ.setdefault(k, v)
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is not None:
        consts.AUTOSCALER_EVENTS = os.environ["RAY_SCHEDULER_EVENTS"] != "0"


def plain_worker_prefixes() -> None:
    """No ANSI colour codes around the "(task pid=...)" prefix of worker lines when the output is not a terminal
    (a log file, CI, a pipe). Ray reads RAY_COLOR_PREFIX when it prints each line; a user's setting wins."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


# glibc malloc settings for every worker of a kdsearch job: keep large tensors (activations of a 1,000-image
# batch are 100+ MB) in the heap instead of a fresh mmap per allocation, whose page faults made a CPU worker
# spend a third of its time in the kernel. On the 2-core dev VM this speeds teacher inference on CPU up about
# 1.5x, side by side (benchmarks/cpu_teacher_inference.py, results/cpu_teacher_inference.json). A user's value wins.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def worker_env() -> dict[str, str]:
    """The environment variables kdsearch's Ray workers start with (see WORKER_ENV)."""
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}


def use_py_modules(py_modules: tuple[str, ...]) -> None:
    """Make the user's packages (folders or .whl files) importable in this process, as the workers will see them.

    A folder `.../mypkg` is imported as `mypkg` (its parent goes on sys.path), a wheel from the wheel itself: the
    same names Ray's `py_modules` gives every worker."""
    for p in py_modules:
        entry = p if p.endswith(".whl") else os.path.dirname(p.rstrip(os.sep))
        if entry not in sys.path:
            sys.path.insert(0, entry)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, py_modules: tuple[str, ...] = ()) -> None:
    """Connect once per process. Local Ray needs no service; `address='auto'` joins `ray up`'s cluster.

    `py_modules`: the user's packages (the spec's `py_modules`, `--py-modules`), shipped to every worker of the
    job by Ray's runtime_env, so every task and trial on every node imports them (not from the driver's sys.path).

    Console output: worker lines without colour codes off a terminal, no token-authentication banner, no autoscaler
    event lines, and workers whose Ray Tune/Train loggers say only warnings and errors."""
    quiet_ray_env()
    import ray

    if ray.is_initialized():
        return
    plain_worker_prefixes()
    logging.getLogger(TOKEN_BANNER_LOGGER).setLevel(logging.ERROR)
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False,
                    "runtime_env": {"worker_process_setup_hook": QUIET_WORKERS, "env_vars": worker_env(),
                                    **({"py_modules": list(py_modules)} if py_modules else {})}}
    # No address means kdsearch's own local Ray. Ray's default for None is to join whatever cluster it finds on the
    # machine (another user's run, even one that is shutting down: a 13-minute hang on a shared VM); only RAY_ADDRESS,
    # Ray's documented way to point every process at a cluster, still overrides.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)  # never a `ray start` cluster by accident
    res = ray.cluster_resources()
    log.info("ray: %s with %s CPUs, %s GPUs", address, res.get("CPU", 0), res.get("GPU", 0))


def where() -> dict[str, Any]:
    """The node a task runs on (id, IP, host, pid, device), recorded in every output it writes."""
    import ray

    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    return {"node_id": ctx.get_node_id() if ctx else None,
            "ip": ray.util.get_node_ip_address() if ray.is_initialized() else None,
            "host": platform.node(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else [],
            "malloc": {k: os.environ.get(k) for k in WORKER_ENV}}


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
    from .capacity import cluster_view

    ensure_ray(address)
    view = cluster_view()
    if view.gpus == 0 and not view.can_grow:
        raise DeviceError(f"the spec asks for device: cuda but the Ray cluster at {address} has no GPUs and cannot "
                          "add nodes; add GPU workers or set device: auto")
