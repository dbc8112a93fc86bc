"""Issue 19 end to end: `kdsearch run` on a spec that names only things from outside kdsearch, on a two-node local
Ray. The student and a teacher come from a package this test writes to a temporary folder (shipped with
--py-modules, not on anyone's PYTHONPATH), the student starts from a trained checkpoint of the user's, the ensemble
strategy is the user's function and the sampler an Optuna class by path; the report names each of them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

PACKAGE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=4, bias=False),
                                     nn.BatchNorm2d(2 * width), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width, bias=False),
                                nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.dw(self.grouped(self.stem(x))).mean((2, 3)))


def student(num_classes=10, width=16):
    return Net(num_classes, width)


def teacher(num_classes=10):
    return Net(num_classes, width=32)


def sharpened_average(teacher_logits, labels, temperature):
    p = torch.softmax(teacher_logits / temperature, -1).mean(0) ** 2
    return p / p.sum(-1, keepdim=True)
'''

SPEC = {
    "name": "user_run", "seeds": [0], "device": "cpu",
    "data": {"dataset": "synthetic", "num_classes": 10, "train_size": 256, "test_size": 128, "num_workers": 0,
             "eval_batch_size": 256},
    "teachers": {"models": [{"arch": "kds_run_pkg:teacher"}, "resnet8"], "train": {"epochs": 1, "batch_size": 64},
                 "gpus": 0, "cpus": 1},
    "student": {"arch": "kds_run_pkg:student", "kwargs": {"width": 12}, "candidates": [],
                "train": {"epochs": 1, "lr": 0.02, "batch_size": 64}, "gpus": 0, "cpus": 1},
    "distill": {"strategy": "kds_run_pkg:sharpened_average", "cache_epochs": 1},
    "quant": {"bits": [8, 4], "qat": {"epochs": 1, "lr": 0.005, "batch_size": 64}, "calib_batches": 2,
              "bn_batches": 2},
    "sensitivity": {"calib_size": 64},
    "search": {"budgets_mb": [0.03], "num_trials": 3, "trial_epochs": 1, "sampler": "optuna.samplers:RandomSampler",
               "sampler_kwargs": {}, "cpus_per_trial": 1, "max_concurrent": 1},
    "finalize": {"top_k": 1},
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_spec_of_only_outside_names_runs_on_two_nodes_and_the_report_names_them(tmp_path) -> None:
    from ray.cluster_utils import Cluster

    pkg = tmp_path / "user" / "kds_run_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PACKAGE)
    ckpt = tmp_path / "trained.pt"
    subprocess.run([sys.executable, "-c", "import sys, torch; sys.path.insert(0, sys.argv[1]); "
                    "from kds_run_pkg import student; torch.manual_seed(1); "
                    "torch.save(student(10, width=12).state_dict(), sys.argv[2])", str(pkg.parent), str(ckpt)],
                   check=True)
    spec = {**SPEC, "student": {**SPEC["student"], "checkpoint": str(ckpt)}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
           "KDSEARCH_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node does no work
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        run_dir, log = tmp_path / "run", tmp_path / "run.log"
        cmd = [sys.executable, "-m", "kdsearch", "run", str(tmp_path / "spec.yaml"), "--run-dir", str(run_dir),
               "--address", cluster.address, "--py-modules", str(pkg)]
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=800).returncode
        assert rc == 0, log.read_text()[-4000:]
    finally:
        cluster.shutdown()
    report = (run_dir / "report.md").read_text()
    assert "**Student:** kds_run_pkg:student (given as" in report
    assert "kds_run_pkg:teacher (test" in report and "kds_run_pkg:sharpened_average ensemble" in report
    assert "**Search sampler:** optuna.samplers:RandomSampler" in report
    assert "| Baseline (given) | FP32 |" in report and "Stays in float" in report
    given = json.loads((run_dir / "students" / "s0" / "scratch.json").read_text())
    assert given["kind"] == "given" and given["node"]["node_id"] == worker.node_id
    teacher = json.loads((run_dir / "teachers" / "kds_run_pkg.teacher.json").read_text())
    assert teacher["node"]["node_id"] == worker.node_id
    final = json.loads(next((run_dir / "final").glob("trial_*.s0.json")).read_text())
    assert final["export_ok"] and final["node"]["node_id"] == worker.node_id


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchvision_mobilenet_v3_small_as_the_student(tmp_path) -> None:
    """`arch: torchvision.models:mobilenet_v3_small` (kdsearch passes num_classes) on smoke data: the search runs,
    every export reloads to its trained validation accuracy, and each finalized model's size is the independent
    count of its parameters at their bit-widths."""
    import pandas as pd

    from kdsearch.models import create_model
    from test_user_models import independent_bytes

    sets = ["student.arch=torchvision.models:mobilenet_v3_small", "student.candidates=[]", "teachers.models=[resnet8]",
            "data.train_size=256", "data.test_size=128", "teachers.train.epochs=1", "student.train.epochs=1",
            "distill.cache_epochs=1", "quant.qat.epochs=1", "quant.calib_batches=2", "quant.bn_batches=2",
            "sensitivity.calib_size=32", "sensitivity.hutchinson_samples=2", "search.num_trials=3",
            "search.trial_epochs=1", "search.max_concurrent=1", "search.budgets_mb=[1.0]", "finalize.top_k=1",
            "finalize.uniform_bits=[8]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0", "KDSEARCH_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    cmd = [sys.executable, "-m", "kdsearch", "run", "smoke", "--run-dir", str(run_dir),
           *[a for s in sets for a in ("--set", s)]]
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=850).returncode
    assert rc == 0, log.read_text()[-4000:]
    results = pd.read_parquet(run_dir / "search" / "results.parquet")
    assert (results["status"] == "completed").sum() >= 1
    final = pd.read_parquet(run_dir / "final" / "final.parquet")
    assert len(final) >= 3 and final["export_ok"].all()
    model = create_model("torchvision.models:mobilenet_v3_small", num_classes=10)
    for _, row in final.iterrows():
        bits = {k: int(v) for k, v in (kv.split("=") for kv in row["bits"].split(","))}  # "layer=bits,..."
        assert row["total_bytes"] == independent_bytes(model, bits, act_bits=8), row["id"]
    for js in (run_dir / "final").glob("*.s0.json"):  # QAT with 8-bit activations trains: finite, bounded losses
        losses = [h["train_loss"] for h in json.loads(js.read_text())["history"]]
        assert all(math.isfinite(x) and x < 100 for x in losses), (js.name, losses)
