"""`kdsearch run --address` on a real multi-node local Ray: the driver orchestrates, the workers do the work.

A head node with no CPU and no GPU for work (what `clusters/gpu.yaml` gives the driver) and a worker node with
declared GPUs. Every stage's output records the node it ran on; none is the head. Midway through finalize the
worker node is killed and a fresh one added: the lost tasks retry on the new node, resuming from their per-epoch
checkpoints in the shared run directory, and the run finishes with every output and no model trained twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "data.train_size=256", "data.test_size=128", "teachers.train.epochs=1", "student.train.epochs=2",
    "distill.cache_epochs=1", "quant.qat.epochs=3", "search.num_trials=3", "search.trial_epochs=1",
    "finalize.top_k=1",
    # 3 QAT epochs: the node is removed when a first epoch checkpoint appears, and the task must still be running
    # then (with 2 epochs a fast worker could finish its last epoch before the kill: a flake seen once in CI)
    # ask for GPUs: on this cluster only the worker node has them (declared; the tasks run on its CPU)
    "teachers.gpus=1", "student.gpus=1", "search.gpus_per_trial=0.5",
]


def _node_ids(run_dir: Path) -> dict[str, set[str]]:
    """stage -> the Ray node ids its outputs say they were made on."""
    out: dict[str, set[str]] = {}

    def add(stage: str, node: dict | None) -> None:
        out.setdefault(stage, set()).add((node or {}).get("node_id") or "missing")

    for p in (run_dir / "teachers").glob("*.json"):
        add("teachers", json.loads(p.read_text()).get("node"))
    for p in (run_dir / "students").rglob("*.json"):
        add("baselines", json.loads(p.read_text()).get("node"))
    add("sensitivity", json.loads((run_dir / "sensitivity" / "sensitivity.json").read_text()).get("node"))
    for p in (run_dir / "search" / "trials").glob("*/trial.json"):
        for a in json.loads(p.read_text())["attempts"]:
            add("search", a.get("node"))
    for p in (run_dir / "final").glob("*.s0.json"):
        add("finalize", json.loads(p.read_text()).get("node"))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_on_a_cluster_whose_head_has_no_resources_survives_a_lost_worker(tmp_path) -> None:
    from ray.cluster_utils import Cluster

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
           "TUNE_GLOBAL_CHECKPOINT_S": "1", "KDSEARCH_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    try:
        first = cluster.add_node(num_cpus=2, num_gpus=2)
        cluster.wait_for_nodes()
        run_dir, log = tmp_path / "run", tmp_path / "run.log"
        sets = [a for s in TINY for a in ("--set", s)]
        cmd = [sys.executable, "-m", "kdsearch", "run", "smoke", "--run-dir", str(run_dir), "--address",
               cluster.address, "--device", "auto", *sets]
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            # Wait for finalize to hold a half-trained model (its first QAT epoch checkpointed), then lose the node.
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                if list((run_dir / "final").glob("*.ckpt")):
                    break
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()[-3000:]
            cluster.remove_node(first, allow_graceful=False)
            second = cluster.add_node(num_cpus=2, num_gpus=2)
            rc = proc.wait(timeout=600)
        text = log.read_text()
        assert rc == 0, text[-4000:]
        workers = {first.node_id, second.node_id}
        nodes = _node_ids(run_dir)
        assert set(nodes) == {"teachers", "baselines", "sensitivity", "search", "finalize"}
        for stage, ids in nodes.items():
            assert ids <= workers, f"{stage} ran on {ids - workers} (head {cluster.head_node.node_id})"
        assert second.node_id in nodes["finalize"]  # the lost work was redone on the fresh node
        # The workers started with kdsearch's malloc settings (raycluster.WORKER_ENV), on both worker nodes.
        sens = json.loads((run_dir / "sensitivity" / "sensitivity.json").read_text())["node"]
        finals = [json.loads(p.read_text())["node"] for p in (run_dir / "final").glob("*.s0.json")]
        from kdsearch.raycluster import WORKER_ENV

        assert all(n["malloc"] == WORKER_ENV for n in [sens, *finals]), [sens, *finals]
        # Every model finalized once: a retried one continued from its checkpoint instead of starting over.
        models = [json.loads(p.read_text()) for p in (run_dir / "final").glob("*.s0.json")]
        assert models and all(m["export_ok"] for m in models)
        retried = [m for m in models if len(m["attempts"]) > 1]
        assert retried, "no finalize task was running on the lost node"
        for m in models:
            assert m["attempts"][-1]["start_epoch"] + m["epochs_run"] == m["epochs"]
        assert any(m["attempts"][-1]["start_epoch"] >= 1 for m in retried)
        assert (run_dir / "report.md").is_file()
    finally:
        cluster.shutdown()
