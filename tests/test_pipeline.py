"""`kdsearch run`: the stage manifest, and a SIGKILL at a random moment followed by a rerun."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kdsearch.pipeline import STAGES, read_manifest

ROOT = Path(__file__).resolve().parent.parent

# The smoke spec made smaller still, so that a full run takes about a minute on 2 cores.
TINY = [
    "data.train_size=256", "data.test_size=128", "teachers.train.epochs=1", "student.train.epochs=2",
    "distill.cache_epochs=1", "quant.qat.epochs=1", "search.num_trials=3", "search.trial_epochs=1",
    "finalize.top_k=1",
]


def _cmd(run_dir: Path) -> list[str]:
    sets = [a for s in TINY for a in ("--set", s)]
    return [sys.executable, "-m", "kdsearch", "run", "smoke", "--run-dir", str(run_dir), *sets]


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_DEDUP_LOGS": "0",
           "KDSEARCH_CACHE": str(tmp / "cache"), "KDSEARCH_DATA": str(tmp / "data")}
    env.pop("RAY_ADDRESS", None)  # never join the test session's Ray
    return env


def _outputs(run_dir: Path) -> dict[str, object]:
    """What must match between an interrupted-then-resumed run and an uninterrupted one."""
    manifest = read_manifest(run_dir)
    results = pd.read_parquet(run_dir / "search" / "results.parquet")
    final = pd.read_parquet(run_dir / "final" / "final.parquet")
    launched = results[results["status"].isin(["completed", "pruned", "error"])]
    return {
        "stages": sorted(manifest["stages"]),
        "teachers": sorted(p.name for p in (run_dir / "teachers").glob("*.pt")),
        "students": sorted(str(p.relative_to(run_dir)) for p in (run_dir / "students").rglob("*.pt")),
        "sensitivity": sorted(p.name for p in (run_dir / "sensitivity").iterdir() if not p.name.startswith(".")),
        "trials_launched": len(launched),
        "final_kinds": sorted(final["kind"]),
        "report": (run_dir / "report.md").is_file(),
        "pareto_png": (run_dir / "search" / "pareto.png").is_file(),
    }


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    with log.open("a") as f:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three small end-to-end runs; about 2-3 min on an idle 2-core machine
def test_sigkill_at_a_random_moment_then_rerun_equals_uninterrupted(tmp_path):
    env = _env(tmp_path)
    ref_dir, ref_log = tmp_path / "ref", tmp_path / "ref.log"
    t0 = time.monotonic()
    assert _run(_cmd(ref_dir), env, ref_log, 600).returncode == 0, ref_log.read_text()[-4000:]
    full_s = time.monotonic() - t0
    reference = _outputs(ref_dir)
    assert reference["stages"] == sorted(s.name for s in STAGES)
    assert reference["trials_launched"] == 3

    # Kill -9 the driver and everything it started (its Ray, teacher tasks, trials) at a seeded random moment.
    seed = int(os.environ.get("KDSEARCH_KILL_SEED", "7"))
    kill_at = random.Random(seed).uniform(0.2, 0.9) * full_s
    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stages_before = sorted(read_manifest(run_dir)["stages"])
    rerun = _run(_cmd(run_dir), env, log, 600)
    assert rerun.returncode == 0, log.read_text()[-4000:]
    resumed = _outputs(run_dir)
    assert resumed == reference, f"killed at {kill_at:.1f}s of {full_s:.1f}s (seed {seed}) after {stages_before}"
    # Stages finished before the kill were not redone.
    text = log.read_text()
    for name in stages_before:
        assert f"stage {name}: done, skipping" in text
    summary = json.loads((run_dir / "search" / "summary.json").read_text())
    assert summary["counts"]["error"] == 0
