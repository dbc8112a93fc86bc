"""Issue 5 experiment: sensitivity vs measured per-layer drops, and solver vs random configs after short QAT.

CIFAR-10 (JPEG q75 copy), resnet8 student, CPU. Each step caches its result in results.json.
Run: python benchmarks/sensitivity_validity.py [OUT_DIR=/tmp/sensitivity_validity]   (BUDGET_MULT=0.9 for the
solver-vs-random comparison at 0.9x the uniform-4-bit size; each step is cached in OUT_DIR/results.json).
The archive defaults to ../shared/data/cifar10-jpeg.tar.gz beside the repo ($KDSEARCH_CIFAR_JPEG overrides).
"""
import json, time, sys, random
from pathlib import Path
import torch
import pandas as pd
from scipy.stats import spearmanr

import os

from kdsearch.spec import parse_spec
from kdsearch.context import RunContext, setup_logging
from kdsearch.checkpoints import load_model
from kdsearch.data import load_data, EvalLoader, Normalizer, TrainLoader
from kdsearch.models import create_model
from kdsearch.quant import BitConfig, model_size, quantize
from kdsearch.train import FitRun, evaluate, fit
from kdsearch.sensitivity import fake_quant_weight, layer_names, resolve_pins, calibration_indices
from kdsearch.stages.sensitivity import sensitivity_stage
from kdsearch.fp32 import train_float_model
from kdsearch.recipes import model_seed
from kdsearch.rundir import RunDir
from kdsearch.runtime import seed_everything

setup_logging()
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sensitivity_validity")
OUT.mkdir(parents=True, exist_ok=True)
RES = OUT / "results.json"
res = json.loads(RES.read_text()) if RES.is_file() else {}
def save():
    RES.write_text(json.dumps(res, indent=2))

PIN = {"first": 8, "last": 8}
m0 = create_model("resnet8", num_classes=10)
budget_mb = round(model_size(m0, BitConfig.uniform(m0, 4, pin=PIN), act_bits=8).total_bytes / 1e6, 6)
spec_dict = {
    "name": "sens_cifar", "seed": 0, "device": "cpu",
    "data": {"dataset": "imagefolder", "root": os.environ.get("KDSEARCH_CIFAR_JPEG", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz")), "train_size": 4000,
             "test_size": 2000, "augment": "standard", "num_workers": 0, "eval_batch_size": 500},
    "teachers": {"models": ["resnet8"]},
    "student": {"arch": "resnet8", "train": {"epochs": 5, "lr": 0.1, "weight_decay": 5e-4, "batch_size": 128}},
    "quant": {"bits": [8, 4, 2], "act_bits": 8, "pin": PIN},
    "sensitivity": {"calib_size": 512, "hutchinson_samples": 8, "metric": "kl"},
    "search": {"budgets_mb": [budget_mb], "trial_epochs": 1, "trial": {"lr": 0.01, "weight_decay": 5e-5, "batch_size": 128}},
}
spec = parse_spec(spec_dict)
dev = torch.device("cpu")
ctx = RunContext.create(OUT / "runs" / "sens_cifar", device="cpu", progress=False)
student_file = RunDir(ctx.run_dir).student("scratch", 0)
res["spec"] = spec.to_dict(); res["torch_threads"] = torch.get_num_threads(); save()

t0 = time.perf_counter()
m = train_float_model(spec, "resnet8", spec.student.train, student_file, seed=0, device=dev)
res.setdefault("float_train_s", time.perf_counter() - t0); res["float_val_acc_train_stage"] = m["val_acc"]; save()

t0 = time.perf_counter()
summary = sensitivity_stage(spec, ctx)
res["sensitivity_stage"] = summary; res.setdefault("sensitivity_wall_s", time.perf_counter() - t0); save()
table = pd.read_parquet(ctx.run_dir / "sensitivity" / "sensitivity.parquet")

bundle = load_data(spec.data)
norm = Normalizer.from_bundle(bundle)
test = EvalLoader(bundle.val, batch_size=500, device=dev)  # a study that ranks layers: on validation, never test
model, _ = load_model(student_file)
model.eval()
if "layer_drops" not in res:
    t0 = time.perf_counter()
    base = evaluate(model, test, norm, dev)["acc"]
    drops = []
    for name in layer_names(model):
        w = model.get_submodule(name).weight
        orig = w.data
        for bits in (4, 2):
            w.data = fake_quant_weight(orig, bits)
            acc = evaluate(model, test, norm, dev)["acc"]
            w.data = orig
            drops.append({"layer": name, "bits": bits, "acc": acc, "drop": base - acc})
    res["float_acc"] = base; res["layer_drops"] = drops; res["layer_drops_s"] = time.perf_counter() - t0; save()
drops = pd.DataFrame(res["layer_drops"])
corr = {}
for bits in (4, 2):
    d = drops[drops.bits == bits].merge(table[table.bits == bits], on=["layer", "bits"])
    for col in ("omega_kl", "omega_hessian"):
        r = spearmanr(d[col], d["drop"])
        corr[f"{col}@{bits}"] = {"rho": float(r.statistic), "p": float(r.pvalue), "n": len(d)}
res["spearman"] = corr; save()
print(json.dumps(corr, indent=1))

# solver vs random configs of the same size, after the same short QAT
priors = json.loads((ctx.run_dir / "sensitivity" / "priors.json").read_text())
MULT = float(os.environ.get("BUDGET_MULT", "1.0"))
ws = next(w for w in priors["warm_starts"] if w["multiple"] == MULT)
budget = ws["budget_bytes"]
names = layer_names(model)
pins = resolve_pins(names, PIN)
configs = {"solver": ws["bit_config"]}
rng = random.Random(0)
k = 0
while k < 5:
    cfg = {n: pins.get(n, rng.choice([8, 4, 2])) for n in names}
    size = model_size(model, BitConfig(cfg), act_bits=8).total_bytes
    if 0.97 * budget <= size <= budget and cfg not in configs.values():
        configs[f"random{k}"] = cfg; k += 1
res[f"configs_{MULT}"] = {n: {"bits": c, "bytes": model_size(model, BitConfig(c), act_bits=8).total_bytes,
                      "omega_kl_sum": float(sum(table.set_index(["layer", "bits"]).loc[(l, b), "omega_kl"] for l, b in c.items()))}
                  for n, c in configs.items()}
res[f"budget_bytes_{MULT}"] = budget; save()
calib = norm(bundle.train.images[calibration_indices(len(bundle.train), 256, 0)])
qres = res.setdefault("qat" if MULT == 1.0 else f"qat_{MULT}", {})
order = ["solver"] + [f"random{i}" for i in range(5)]
for name in order:
    if name in qres:
        continue
    t0 = time.perf_counter()
    qm, _ = load_model(student_file)
    quantize(qm, BitConfig(configs[name]), act_bits=8, calib=calib)
    ptq = evaluate(qm, test, norm, dev)["acc"]
    seed_everything(1)
    train = TrainLoader(bundle, spec.data, batch_size=128, seed=model_seed(spec, "resnet8"), device=dev)
    r = fit(qm, train, test, FitRun(spec.search.trial, normalizer=norm, device=dev, progress=False, desc=f"QAT {name}"))
    qres[name] = {"ptq_acc": ptq, "qat_acc": r.final["val_acc"], "seconds": time.perf_counter() - t0}
    save()
    print(name, qres[name], flush=True)
print("done")
