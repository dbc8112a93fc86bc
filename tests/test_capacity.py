"""Resource requests against what a Ray cluster can ever offer (`kdsearch.capacity`).

The rules on hand-made cluster views, then the real thing: a multi-node local Ray (`ray.cluster_utils.Cluster`, a head
with no resources for work, like `clusters/gpu.yaml`'s) where an impossible `student.cpus` fails in seconds with one
line naming the field, before any stage ran, and a feasible one trains on the one node that can hold it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdsearch.capacity import CapacityError, ClusterView, PendingWatch, check_capacity, gpus_for, requests_for
from kdsearch.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent

FIXED = ClusterView(((0.0, 0.0), (2.0, 0.0), (1.0, 0.0)), can_grow=False, name="the test cluster")


def _spec(*sets: str):
    from kdsearch.spec import parse_override

    return load_spec("cifar10", dict(parse_override(s) for s in sets))


def test_an_impossible_request_on_a_fixed_cluster_is_one_line_naming_the_field_and_the_fix() -> None:
    with pytest.raises(CapacityError) as err:
        check_capacity(_spec(), ["teachers"], FIXED)  # cifar10 asks teachers.cpus: 8
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("spec field 'teachers.cpus': each teacher task asks for 8 CPUs")
    assert "largest node of the test cluster has 2 CPUs and 0 GPUs" in msg
    assert msg.endswith("--set teachers.cpus=2")


def test_every_stage_to_run_is_checked_before_the_first_and_only_its_sections() -> None:
    spec = _spec("teachers.cpus=1")
    assert check_capacity(spec, ["teachers", "baselines", "sensitivity"], FIXED)  # search not run: not checked
    with pytest.raises(CapacityError, match=r"^spec field 'search\.cpus_per_trial'"):
        check_capacity(_spec("teachers.cpus=1", "search.cpus_per_trial=4"), ["teachers", "search"], FIXED)
    live = _spec("teachers.cpus=3", "distill.source=live")  # the search's teacher actors ask teachers.cpus too
    assert [r.section for r in requests_for(live, ["search"], FIXED)] == ["search", "student", "teachers"]


def test_gpu_requests_are_dropped_only_where_no_gpu_can_ever_come(caplog) -> None:
    assert gpus_for("auto", 1.0, FIXED) == 0.0
    assert gpus_for("auto", 1.0, ClusterView(((8.0, 0.0),), can_grow=True)) == 1.0  # the autoscaler adds GPU nodes
    assert gpus_for("cpu", 1.0, ClusterView(((8.0, 4.0),), can_grow=False)) == 0.0
    with caplog.at_level(logging.INFO, logger="kdsearch.capacity"):
        check_capacity(_spec("teachers.cpus=1"), ["teachers", "search"], FIXED)
    line = caplog.messages[-1]
    assert "GPU requests (teachers.gpus=1, search.gpus_per_trial=0.25, student.gpus=1) are dropped" in line
    assert "every task runs on CPUs" in line


def test_a_gpu_request_larger_than_any_node_names_the_gpu_field() -> None:
    view = ClusterView(((16.0, 1.0), (64.0, 0.0)), can_grow=False)
    with pytest.raises(CapacityError, match=r"^spec field 'teachers\.gpus'.*--set teachers\.gpus=1$"):
        check_capacity(_spec("teachers.gpus=2"), ["teachers"], view)
    # 8 CPUs with a GPU: only the 16-CPU GPU node counts, not the 64-CPU one without a GPU
    with pytest.raises(CapacityError, match=r"^spec field 'teachers\.cpus'.*--set teachers\.cpus=16$"):
        check_capacity(_spec("teachers.cpus=20"), ["teachers"], view)


def test_on_a_cluster_that_can_grow_a_request_waits_and_kdsearch_says_what_and_for_how_long(caplog) -> None:
    growing = ClusterView(((8.0, 0.0),), can_grow=True, name="the cluster")
    with caplog.at_level(logging.INFO, logger="kdsearch.capacity"):
        reqs = check_capacity(_spec(), ["teachers"], growing)  # 8 CPUs + 1 GPU: no GPU node yet
    assert "each teacher task asks for 8 CPUs and 1 GPU (teachers.cpus=8, teachers.gpus=1)" in caplog.messages[-1]
    views = [growing, growing, ClusterView(((8.0, 0.0), (8.0, 1.0)), can_grow=True)]
    watch = PendingWatch(reqs, view_fn=lambda: views.pop(0))
    watch.poll(), watch.poll(), watch.poll()
    assert "has waited" in watch.lines[0] and "teachers.cpus=8, teachers.gpus=1" in watch.lines[0]
    assert watch.lines[-1].startswith("capacity: a node with 8 CPUs and 1 GPU joined after")
    assert len(watch.lines) == 3


def test_rays_autoscaler_lines_stay_quiet_even_when_ray_was_imported_first(monkeypatch) -> None:
    """kdsearch says what waits in its own words; Ray's driver filter then prints none of the autoscaler's events
    ("No available node types can fulfill resource request ..."). A user's own RAY_SCHEDULER_EVENTS wins."""
    from ray._private import ray_constants
    from ray._private.worker import filter_autoscaler_events

    from kdsearch.raycluster import quiet_ray_env

    line = ":event_summary:Error: No available node types can fulfill resource request {'CPU': 8.0}."
    monkeypatch.setattr(ray_constants, "AUTOSCALER_EVENTS", 1)  # restored after the test
    monkeypatch.delenv("RAY_SCHEDULER_EVENTS", raising=False)
    quiet_ray_env()
    assert list(filter_autoscaler_events([line])) == []
    monkeypatch.setenv("RAY_SCHEDULER_EVENTS", "1")
    quiet_ray_env()
    assert ray_constants.AUTOSCALER_EVENTS


@pytest.fixture()
def cluster(tmp_path):
    """A head with no resources for work and two workers: 2 CPUs and 1 CPU (no node has 3)."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    big = c.add_node(num_cpus=2)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, big
    c.shutdown()


def _kdsearch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "KDSEARCH_CACHE": str(tmp_path / "c")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "kdsearch", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.timeout(600)
def test_on_a_multi_node_ray_an_impossible_student_request_fails_fast_and_a_feasible_one_runs(tmp_path,
                                                                                              cluster) -> None:
    c, big = cluster
    tiny = ["--set", "data.train_size=256", "--set", "data.test_size=128", "--set", "student.train.epochs=1"]
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    bad = _kdsearch(tmp_path, "run", "smoke", "--address", c.address, "--run-dir", str(run_dir), *tiny,
                    "--set", "student.cpus=3")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("kdsearch: error: spec field 'student.cpus': each student task asks for 3 CPUs"), last
    assert "has 2 CPUs and 0 GPUs" in last and last.endswith("--set student.cpus=2")
    assert "No available node types" not in bad.stderr  # Ray's autoscaler lines stay quiet
    assert not list(run_dir.glob("teachers/*")), "a stage ran before the check"  # nothing ran: not even teachers

    ok = _kdsearch(tmp_path, "train", "smoke", "--model", "student", "--address", c.address, "--run-dir",
                   str(run_dir), *tiny, "--set", "student.cpus=2")
    assert ok.returncode == 0, ok.stderr[-3000:]
    node = json.loads(ok.stdout)["scratch s0"]["node"]
    assert node["node_id"] == big.node_id  # the only node that holds 2 CPUs


def test_the_workstation_spec_fits_one_gpu_and_8_cpus_two_tasks_at_a_time() -> None:
    from kdsearch.pipeline import STAGES

    spec = load_spec("workstation")
    box = ClusterView(((8.0, 1.0),), can_grow=False)
    reqs = check_capacity(spec, [s.name for s in STAGES], box)
    assert {r.section for r in reqs} == {"teachers", "student", "search"}
    for r in reqs:  # teachers and students two at a time (the two teachers; scratch and KD), trials four
        share = 4 if r.section == "search" else 2
        assert r.cpus * share <= 8 and r.gpus * share <= 1, r
