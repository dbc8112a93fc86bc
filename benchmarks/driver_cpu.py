"""How much work the driver does: CPU seconds of the `kdsearch run` process on a two-node Ray cluster.

    python benchmarks/driver_cpu.py                      # this checkout vs the commit before the Ray-task stages
    python benchmarks/driver_cpu.py --before c3f76c1 --spec smoke --repeats 1

One machine, a real multi-node local Ray (`ray.cluster_utils.Cluster`): a head node with no CPU and no GPU for
work (the driver's node on `clusters/gpu.yaml`) and a worker node with 2 CPUs and 2 declared GPUs. Each version
runs `kdsearch run SPEC --address <cluster> --device auto` in a fresh run directory as a subprocess; its CPU time
(user + sys, from `resource.getrusage(RUSAGE_CHILDREN)`, which counts the driver process only: the Ray workers
are the worker node's children) is compared with its wall time. The goal: driver CPU under 20% of the wall time.
Both versions run side by side in one call, on the same machine, so the ratio is what to read; absolute times
depend on the load. Writes benchmarks/results/driver_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# GPUs asked for where each version's spec has the fields (the old one has no student.gpus: its students ran in
# the driver), so that the GPU-holding worker node is where the work may go.
OVERRIDES = {"before": ["teachers.gpus=1", "search.gpus_per_trial=0.5"],
             "after": ["teachers.gpus=1", "student.gpus=1", "search.gpus_per_trial=0.5"]}


def _checkout(commit: str) -> Path:
    dest = Path(tempfile.gettempdir()) / f"kdsearch-{commit}"
    if not dest.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(dest), commit], check=True,
                       stdout=subprocess.DEVNULL)
    return dest


def _run(code: Path, spec: str, address: str, sets: list[str], log: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    run_dir = Path(tempfile.mkdtemp(prefix="kdsearch-driver-")) / "run"
    cmd = [sys.executable, "-m", "kdsearch", "run", spec, "--run-dir", str(run_dir), "--address", address,
           "--device", "auto", *[a for s in sets for a in ("--set", s)]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=code, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if rc != 0:
        raise SystemExit(f"{code}: kdsearch run failed (exit {rc}); see {log}")
    return {"wall_s": round(wall, 1), "driver_cpu_s": round(cpu, 1), "driver_cpu_share": round(cpu / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="c3f76c1", help="the commit to compare with (default: before this change)")
    ap.add_argument("--spec", default="smoke")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "driver_cpu.json"))
    args = ap.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray.cluster_utils import Cluster

    versions = {"before": _checkout(args.before), "after": ROOT}
    rows = {}
    for name, code in versions.items():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
        try:
            cluster.add_node(num_cpus=2, num_gpus=2)
            cluster.wait_for_nodes()
            log = Path(tempfile.gettempdir()) / f"driver_cpu_{name}.log"
            rows[name] = {"code": str(code), **_run(code, args.spec, cluster.address, OVERRIDES[name], log)}
        finally:
            cluster.shutdown()
        print(f"{name}: {rows[name]}", flush=True)
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_avg_at_end": os.getloadavg()},
           "cluster": "head: 0 CPU, 0 GPU; worker: 2 CPU, 2 declared GPUs (tasks run on its CPU)",
           "spec": args.spec, "before_commit": args.before, "runs": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("\n| version | wall s | driver CPU s | driver CPU / wall |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']} | {r['driver_cpu_s']} | {100 * r['driver_cpu_share']:.0f}% |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
