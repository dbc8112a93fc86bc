"""Scratch vs KD-average vs KD-vote vs KD-dynamic on the CIFAR-10 JPEG copy (CPU; teachers trained once, seed 0).

    python benchmarks/kd_strategies.py [SEEDS=0,1] [OUT_DIR=/tmp/kd_strategies]

Spec: benchmarks/kd_strategies.yaml (4000/2000-image subset, resnet20 + resnet8 teachers, tiny_cnn student).
The archive defaults to ../shared/data/cifar10-jpeg.tar.gz beside the repo ($KDSEARCH_CIFAR_JPEG overrides).
Writes OUT_DIR/results.json and benchmarks/results/kd_strategies_cpu.json.
"""
import json, shutil, sys, time
from pathlib import Path
from kdsearch.context import RunContext, setup_logging
from kdsearch.spec import load_spec
from kdsearch.stages.train_models import train_teachers, train_scratch_student
from kdsearch.stages.baselines import train_kd_student

import os
setup_logging()
seeds = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0, 1]
base = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/kd_strategies")
rows = {}
t0 = time.time()
for seed in seeds:
    spec = load_spec(Path(__file__).with_name("kd_strategies.yaml"),
                     {"seed": seed, "name": f"cifar_kd_s{seed}", "data.root": os.environ.get("KDSEARCH_CIFAR_JPEG", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"))})
    ctx = RunContext.create(base / spec.name, device="cpu", progress=False)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    if seed == seeds[0]:
        teachers = train_teachers(spec, ctx)
        rows["teachers"] = {a: m["test_acc"] for a, m in teachers.items()}
        print("teachers", rows["teachers"], f"{time.time()-t0:.0f}s", flush=True)
        tdir = ctx.run_dir / "teachers"
    else:
        shutil.copytree(tdir, ctx.run_dir / "teachers", dirs_exist_ok=True)
    r = {"scratch": train_scratch_student(spec, ctx)["test_acc"]}
    print(seed, "scratch", r["scratch"], f"{time.time()-t0:.0f}s", flush=True)
    for strat in ("average", "vote", "dynamic"):
        r[f"kd_{strat}"] = train_kd_student(spec, ctx, strategy=strat)["test_acc"]
        print(seed, strat, r[f"kd_{strat}"], f"{time.time()-t0:.0f}s", flush=True)
    rows[seed] = r
    (base / "results.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2), f"total {time.time()-t0:.0f}s")
out = Path(__file__).parent / "results" / "kd_strategies_cpu.json"
out.write_text(json.dumps({"benchmark": "kd_strategies", "data": "CIFAR-10 (JPEG q75 copy)", "seeds": seeds,
                           "seconds": time.time() - t0, "rows": rows}, indent=2) + "\n")
