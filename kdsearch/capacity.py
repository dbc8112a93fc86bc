"""What a run asks of its Ray cluster, checked against what the cluster can ever offer, before a stage submits.

Every Ray task of a stage asks for the resources of one spec section (`teachers.cpus/gpus`, `student.cpus/gpus`,
`search.cpus_per_trial/gpus_per_trial`), and Ray places a task on one node. A request larger than every node waits
forever on a cluster that cannot add nodes (a local Ray, or one started by hand with `ray start`): the only output
is Ray's autoscaler repeating "No available node types can fulfill resource request". So, before compute:

- GPU requests: with a device other than `cpu`, on a cluster that has no GPUs and cannot add nodes, they are dropped
  and every task runs on CPUs; the log says so once (`check_capacity`). On a cluster that can grow they stay: its
  autoscaler adds GPU nodes (`clusters/gpu.yaml` starts with none). `gpus_for` is that rule, for every submitter.
- On a fixed cluster, a request no node meets is a `CapacityError`: one line naming the spec field, the request, the
  largest node and the fix (the CLI's exit 2).
- On a cluster that can grow, such a request waits for the autoscaler, and `PendingWatch` says in kdsearch's words
  what is pending and for how long (Ray's own autoscaler lines are silenced: `kdsearch.raycluster.quiet_ray_env`).

What the cluster is comes from Ray: alive nodes from `ray.nodes()`; whether it can grow from the autoscaler's
cluster status (`ray.autoscaler.v2.sdk.get_cluster_status`, what `ray status` reads): nodes launched by the cluster
launcher or KubeRay carry a node type name, those of `ray.init()` and `ray start` do not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .eta import fmt_duration
from .spec import Spec, SpecError
from .ticker import Ticker

log = logging.getLogger("kdsearch.capacity")

# spec section -> (its CPU field, its GPU field, what one of its tasks is called in messages)
SECTIONS: dict[str, tuple[str, str, str]] = {
    "teachers": ("teachers.cpus", "teachers.gpus", "each teacher task"),
    "student": ("student.cpus", "student.gpus", "each student task"),
    "search": ("search.cpus_per_trial", "search.gpus_per_trial", "each search trial"),
}


class CapacityError(SpecError):
    """A resource request that no node of a cluster that cannot add nodes will ever meet (a user mistake)."""


@dataclass(frozen=True)
class ClusterView:
    """The alive nodes' total resources (CPU, GPU per node) and whether the cluster can add nodes."""

    nodes: tuple[tuple[float, float], ...]
    can_grow: bool
    name: str = "this Ray cluster"

    @property
    def gpus(self) -> float:
        return sum(g for _, g in self.nodes)

    def fits(self, cpus: float, gpus: float) -> bool:
        """Some alive node has at least `cpus` CPUs and `gpus` GPUs in total (busy or not)."""
        return any(c + 1e-9 >= cpus and g + 1e-9 >= gpus for c, g in self.nodes)


@dataclass(frozen=True)
class Request:
    """What each task of one spec section asks for, after the GPU rule."""

    section: str
    cpus: float
    gpus: float
    asked_gpus: float  # the spec's value, before the GPU rule

    @property
    def fields(self) -> tuple[str, str, str]:
        return SECTIONS[self.section]

    def shape(self) -> str:
        return _count(self.cpus, "CPU") + (f" and {_count(self.gpus, 'GPU')}" if self.gpus else "")


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


def cluster_view() -> ClusterView:
    """The connected Ray cluster as Ray reports it (needs `ray.init`)."""
    import ray

    nodes = tuple((float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
                  for n in ray.nodes() if n.get("Alive"))
    return ClusterView(nodes, _can_grow(), _cluster_name())


def _cluster_status() -> Any:
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    return get_cluster_status(ray.get_runtime_context().gcs_address)


def _can_grow() -> bool:
    """Whether an autoscaler may add nodes: some node was launched by one (it has a node type name). When Ray
    cannot say, assume it can: kdsearch then waits and reports instead of refusing a cluster that could grow."""
    try:
        status = _cluster_status()
    except Exception as err:  # an older GCS, a status RPC timeout
        log.debug("capacity: no autoscaler status (%s); assuming the cluster can add nodes", err)
        return True
    return any(n.ray_node_type_name and n.ray_node_type_name != f"node_{n.node_id}"
               for n in (*status.active_nodes, *status.idle_nodes))


def _cluster_name() -> str:
    import ray

    ctx = ray.get_runtime_context()
    return f"the Ray cluster at {ctx.gcs_address}" if len(ray.nodes()) > 1 else "the local Ray"


def gpus_for(device: str, gpus: float, view: ClusterView) -> float:
    """The GPUs a task asks Ray for: none with device cpu, none on a cluster that has no GPU and cannot add one."""
    if device == "cpu" or gpus <= 0 or (view.gpus == 0 and not view.can_grow):
        return 0.0
    return gpus


def section_request(spec: Spec, section: str, view: ClusterView) -> Request:
    cpu_field, gpu_field, _ = SECTIONS[section]
    cpus, gpus = (float(_field(spec, f)) for f in (cpu_field, gpu_field))
    return Request(section, cpus, gpus_for(spec.device, gpus, view), gpus)


def _field(spec: Spec, dotted: str) -> Any:
    obj: Any = spec
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def stage_sections(spec: Spec, stage: str) -> tuple[str, ...]:
    """The spec sections whose resources the tasks (and actors) of `stage` ask for."""
    live = ("teachers",) if spec.distill.source == "live" else ()
    return {"teachers": ("teachers",), "baselines": ("student", *live), "sensitivity": ("student",),
            "search": ("search", "student", *live), "finalize": ("student", *live),
            "students": ("student",)}.get(stage, ())


def requests_for(spec: Spec, stages: Iterable[str], view: ClusterView) -> list[Request]:
    sections = dict.fromkeys(s for st in stages for s in stage_sections(spec, st))
    return [section_request(spec, s, view) for s in sections]


def check_capacity(spec: Spec, stages: Iterable[str], view: ClusterView | None = None) -> list[Request]:
    """Check the requests of `stages` against the cluster; raise `CapacityError` for one that can never run.

    Logs once when GPU requests are dropped, and on a cluster that can grow which requests wait for new nodes.
    Returns the requests (after the GPU rule). Needs a connected Ray unless `view` is given.
    """
    view = view if view is not None else cluster_view()
    reqs = requests_for(spec, stages, view)
    waiting = [r for r in reqs if not view.fits(r.cpus, r.gpus)]
    if waiting and not view.can_grow:
        raise CapacityError(*_refusal(waiting[0], view))
    dropped = [f"{r.fields[1]}={r.asked_gpus:g}" for r in reqs if r.asked_gpus > 0 and r.gpus == 0]
    if dropped and spec.device != "cpu":
        log.warning("device %s: %s has no GPU and cannot add nodes, so the GPU requests (%s) are dropped and every "
                    "task runs on CPUs", spec.device, view.name, ", ".join(dropped))
    for r in waiting:
        log.warning("capacity: %s asks for %s (%s); no node of %s has that yet, so it waits for the autoscaler "
                    "to add one", r.fields[2], r.shape(), ", ".join(_values(r)), view.name)
    return reqs


def _values(r: Request) -> list[str]:
    cpu_field, gpu_field, _ = r.fields
    return [f"{cpu_field}={r.cpus:g}"] + ([f"{gpu_field}={r.gpus:g}"] if r.gpus else [])


def _refusal(r: Request, view: ClusterView) -> tuple[str, str]:
    """(field, message) for a request no node meets: the field to lower and the largest value that would run."""
    cpu_field, gpu_field, what = r.fields
    max_gpus = max((g for _, g in view.nodes), default=0.0)
    if r.gpus > max_gpus + 1e-9:
        field, fix = gpu_field, max_gpus
    else:
        field, fix = cpu_field, max(c for c, g in view.nodes if g + 1e-9 >= r.gpus)
    best = max(view.nodes, key=lambda n: (n[1] >= r.gpus, n[0], n[1]), default=(0.0, 0.0))
    node = f"{_count(best[0], 'CPU')} and {_count(best[1], 'GPU')}"
    return field, (f"{what} asks for {r.shape()}, but the largest node of {view.name} has {node} and the cluster "
                   f"cannot add nodes, so it would wait forever; lower it, e.g. --set {field}={fix:g}")


class PendingWatch(Ticker):
    """While a stage runs on a cluster that can grow: every `interval_s`, log the requests that no alive node can
    hold yet (they wait for the autoscaler) and for how long; log once more when a node for them joined.

        with PendingWatch(requests):
            stage(spec, ctx)
    """

    def __init__(self, requests: list[Request], interval_s: float = 60.0,
                 view_fn: Callable[[], ClusterView] = cluster_view) -> None:
        self.requests, self.interval_s, self.view_fn = requests, float(interval_s), view_fn
        self.lines: list[str] = []
        self._since: dict[str, float] = {}

    def poll(self) -> None:
        """One look at the cluster: log what waits (and since when) and what stopped waiting."""
        view = self.view_fn()
        now = time.monotonic()
        for r in self.requests:
            key = ", ".join(_values(r))
            if not view.fits(r.cpus, r.gpus):
                since = self._since.setdefault(key, now)
                self._log(f"capacity: {r.fields[2]} ({key}) has waited {fmt_duration(now - since)} for the "
                          f"autoscaler to add a node with {r.shape()}; stop with Ctrl-C and lower the request if "
                          "this cluster has no such node type")
            elif key in self._since:
                self._log(f"capacity: a node with {r.shape()} joined after {fmt_duration(now - self._since.pop(key))}")

    def _log(self, line: str) -> None:
        log.info("%s", line)
        self.lines.append(line)
