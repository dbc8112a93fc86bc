"""Heavy work as Ray tasks: the driver submits, waits and reports; the work and its device live on a worker.

Every unit (a teacher, a student of one seed, a cache, the sensitivity table, a finalize model) is one Ray task
with the resources the spec gives it, `max_retries` so that a task on a node that died runs again elsewhere
(resuming from its per-epoch checkpoint in the shared run directory), and a result that names the node it ran
on. A task that still fails after its retries fails the stage with one line naming the stage, the unit, the
node and where its log is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import StageFailed

log = logging.getLogger("kdsearch.stages.tasks")

TASK_RETRIES = 3


@dataclass(frozen=True)
class Resources:
    """What one task asks Ray for; GPUs by `kdsearch.capacity.gpus_for` (dropped only where none can ever be had)."""

    cpus: float = 1.0
    gpus: float = 0.0

    @classmethod
    def for_spec(cls, device: str, cpus: float, gpus: float) -> "Resources":
        from ..capacity import cluster_view, gpus_for

        return cls(cpus=cpus, gpus=gpus_for(device, gpus, cluster_view()))


@dataclass
class Unit:
    """One task to run: a label for messages, the function, its arguments, its resources."""

    label: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    resources: Resources = Resources()


def submit(unit: Unit, *deps: Any) -> Any:
    """Submit one unit; `deps` are object refs it waits for (passed as its last positional arguments)."""
    import ray

    remote = ray.remote(unit.fn).options(num_cpus=unit.resources.cpus, num_gpus=unit.resources.gpus,
                                         max_retries=TASK_RETRIES, retry_exceptions=False,
                                         name=f"kdsearch:{unit.label}")
    return remote.remote(*unit.args, *deps, **dict(unit.kwargs))


def gather(stage: str, refs: Mapping[str, Any],
           on_done: Callable[[dict[str, Any], list[str]], None] | None = None) -> dict[str, Any]:
    """Wait for every ref; a failure raises `StageFailed` with the stage, unit, node and log location.

    `on_done(results so far, labels pending)` runs after each completion (progress files for views).
    """
    import ray

    out: dict[str, Any] = {}
    pending = dict(refs)
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=1)
        label = next(k for k, v in pending.items() if v == ready[0])
        del pending[label]
        try:
            out[label] = ray.get(ready[0])
        except Exception as err:  # a task error, a node lost past its retries, a worker killed
            for ref in pending.values():
                ray.cancel(ref)
            raise StageFailed(_failure_line(stage, label, err)) from err
        if on_done is not None:
            on_done(out, sorted(pending))
    return out


def _failure_line(stage: str, label: str, err: BaseException) -> str:
    ip = getattr(err, "ip", None) or "?"
    cause = getattr(err, "cause", None) or err
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
    return (f"stage {stage}: {label} failed after {TASK_RETRIES} retries on node {ip}: {type(cause).__name__}: "
            f"{first}; its log is in /tmp/ray/session_latest/logs/ on that node (worker-*.err); rerun the same "
            "command to continue from the last checkpoint")
