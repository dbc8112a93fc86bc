"""A BOPs-budgeted `kdsearch run smoke` end to end: the search keeps every trial within the GBOPs budget, finalize
picks the best trial and the solver's allocation for it, the report and `kdsearch export` choose within it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.train_size=256", "data.test_size=128", "teachers.models=[resnet8]", "teachers.train.epochs=1",
        "student.train.epochs=2", "student.candidates=[]", "distill.cache_epochs=1", "quant.qat.epochs=1",
        "search.num_trials=4", "search.trial_epochs=1", "search.max_concurrent=1", "finalize.top_k=1",
        "finalize.uniform_bits=[8]", "quant.bits=[8,4]"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_bops_budgeted_smoke_run_keeps_every_choice_within_the_budget(tmp_path) -> None:
    from kdsearch.models import create_model
    from kdsearch.quant import BitConfig, model_bops

    model = create_model("tiny_cnn", num_classes=10)
    g8 = model_bops(model, BitConfig.uniform(model, 8).to_dict(), act_bits=8).gbops
    g4 = model_bops(model, BitConfig.uniform(model, 4, pin={"first": 8, "last": 8}).to_dict(), act_bits=8).gbops
    budget = round(g4 + 0.5 * (g8 - g4), 6)  # between uniform 4-bit (pins at 8) and uniform 8-bit
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0", "KDSEARCH_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    sets = [*TINY, "search.budgets_mb=[]", f"search.budgets_gbops=[{budget}]"]
    cmd = [sys.executable, "-m", "kdsearch", "run", "smoke", "--run-dir", str(run_dir),
           *[a for s in sets for a in ("--set", s)]]
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=850).returncode
    assert rc == 0, log.read_text()[-4000:]

    results = pd.read_parquet(run_dir / "search" / "results.parquet")
    done = results[results["status"] == "completed"]
    assert len(done) >= 1 and (done["gbops"] <= budget + 1e-9).all(), done[["number", "gbops"]]
    final = pd.read_parquet(run_dir / "final" / "final.parquet")
    assert final["gbops"].notna().all()
    roles = final.set_index("id")["roles"].astype(str)
    tag = f"{budget:g} GBOPs"
    assert roles.str.contains(f"best <= {tag}", regex=False).any(), roles
    alloc = f"alloc_{budget:g}gbops".replace(".", "p")
    assert alloc in roles.index and f"allocation only <= {tag}" in roles[alloc]
    within = final[final["id"].isin([i for i in roles.index if "<= " + tag in roles[i]])]
    assert (within["gbops"] <= budget + 1e-9).all()
    # the recorded GBOPs are the finalized model's own
    row = final[final["id"] == alloc].iloc[0]
    bits = {k: int(v) for k, v in (kv.split("=") for kv in row["bits"].split(","))}
    assert row["gbops"] == pytest.approx(model_bops(model, bits, act_bits=8).gbops)

    report = (run_dir / "report.md").read_text()
    assert f"Allocation only <= {tag} (solver)+KD" in report and f"Best finalized model within {tag}" in report
    out = tmp_path / "shipped.kdq"
    rc = subprocess.run([sys.executable, "-m", "kdsearch", "export", str(run_dir), "--out", str(out)], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    from kdsearch.quant import load_quantized

    shipped = model_bops(load_quantized(out), input_size=(3, 32, 32)).gbops
    assert shipped <= budget + 1e-9  # the default export is chosen within the BOPs budget
