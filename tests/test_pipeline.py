"""`kdsearch run` end to end on a small image folder: a SIGKILL at a random moment followed by a rerun equals an
uninterrupted run, and a run whose test labels are permuted makes every choice the same (validation chooses)."""

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


def _cmd(run_dir: Path, data: Path) -> list[str]:
    sets = [a for s in TINY for a in ("--set", s)]
    return [sys.executable, "-m", "kdsearch", "run", "smoke", "--run-dir", str(run_dir), *sets,
            "--set", "data.dataset=imagefolder", "--set", f"data.root={data}", "--set", "data.num_classes=null",
            "--set", "data.train_size=null", "--set", "data.test_size=null", "--set", "search.max_concurrent=1"]


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run on a real image folder: (run_dir, its outputs, its wall time, env, tmp)."""
    from test_trust import write_folder

    tmp = tmp_path_factory.mktemp("pipeline")
    env = _env(tmp)
    data = write_folder(tmp / "data", permute_test=False)
    ref_dir, ref_log = tmp / "ref", tmp / "ref.log"
    t0 = time.monotonic()
    assert _run(_cmd(ref_dir, data), env, ref_log, 600).returncode == 0, ref_log.read_text()[-4000:]
    full_s = time.monotonic() - t0
    text = ref_log.read_text()
    assert "Selected on validation" not in text  # the terminal table, not the report's prose
    assert "to ship:" in text and "| Baseline (Scratch) | FP32 |" in text  # the run ends with the answer
    return ref_dir, _outputs(ref_dir), full_s, env, tmp, data


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_a_random_moment_then_rerun_equals_uninterrupted(reference):
    ref_dir, reference_out, full_s, env, tmp, data = reference
    assert reference_out["stages"] == sorted(s.name for s in STAGES)
    assert reference_out["trials_launched"] == 3

    # Kill -9 the driver and everything it started (its Ray, teacher tasks, trials) at a seeded random moment.
    seed = int(os.environ.get("KDSEARCH_KILL_SEED", "7"))
    kill_at = random.Random(seed).uniform(0.2, 0.9) * full_s
    run_dir, log = tmp / "killed", tmp / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen(_cmd(run_dir, data), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stages_before = sorted(read_manifest(run_dir)["stages"])
    rerun = _run(_cmd(run_dir, data), env, log, 600)
    assert rerun.returncode == 0, log.read_text()[-4000:]
    resumed = _outputs(run_dir)
    assert resumed == reference_out, f"killed at {kill_at:.1f}s of {full_s:.1f}s (seed {seed}) after {stages_before}"
    # Stages finished before the kill were not redone.
    text = log.read_text()
    for name in stages_before:
        assert f"stage {name}: done, skipping" in text
    summary = json.loads((run_dir / "search" / "summary.json").read_text())
    assert summary["counts"]["error"] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_permuting_the_test_labels_changes_no_choice(reference):
    """Two full runs whose data differ only in the test labels: every choice is identical, only test moves."""
    from test_trust import choices, write_folder

    ref_dir, _, _, env, tmp, _ = reference
    data = write_folder(tmp / "data_permuted", permute_test=True)
    run_dir, log = tmp / "permuted", tmp / "permuted.log"
    assert _run(_cmd(run_dir, data), env, log, 600).returncode == 0, log.read_text()[-4000:]
    a, b = choices(ref_dir), choices(run_dir)
    assert a["trials"] and a["finalized"]
    for key in a:
        assert a[key] == b[key], key
    fa = pd.read_parquet(ref_dir / "final" / "final.parquet")
    fb = pd.read_parquet(run_dir / "final" / "final.parquet")
    assert (fa["test_acc"].to_numpy() != fb["test_acc"].to_numpy()).any()  # the test labels did matter
