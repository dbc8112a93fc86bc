"""Accuracy of a trained float student after the same short QAT at uniform 8-bit, uniform 4-bit and mixed 8/4.

The expected order (issue 3): uniform 8-bit within 0.5 point of float, 4-bit below 8-bit, mixed 8/4 between.
Plain QAT (no KD) from the run's scratch student, so the numbers isolate quantization. First and last layers
follow the spec's pins in every config. Mixed 8/4: the largest free layers go to 4 bits until half of the free
layers' weights are at 4 bits, the rest stay at 8 (a fixed rule, independent of the sensitivity analysis).

    python benchmarks/qat_accuracy.py RUN_DIR [--epochs 2] [--student scratch|kd]

RUN_DIR is a `kdsearch run` directory whose baselines stage is done (its spec.yaml is read from there).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kdsearch.checkpoints import load_model
from kdsearch.data import EvalLoader, Normalizer, load_data
from kdsearch.qat import qat_finetune
from kdsearch.quant import BitConfig, layer_inventory, model_size
from kdsearch.runtime import resolve_device
from kdsearch.sensitivity.costs import resolve_pins
from kdsearch.spec import load_spec
from kdsearch.rundir import RunDir
from kdsearch.train import evaluate


def mixed_8_4(model: torch.nn.Module, pins: dict[str, int]) -> BitConfig:
    free = sorted((i for i in layer_inventory(model) if i.name not in pins), key=lambda i: -i.params)
    half, at4, bits = sum(i.params for i in free) / 2, 0, {}
    for info in free:
        bits[info.name] = 4 if at4 < half else 8
        at4 += info.params if bits[info.name] == 4 else 0
    return BitConfig.uniform(model, 8).updated({**bits, **pins})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--student", choices=("scratch", "kd"), default="scratch")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    spec = load_spec(args.run_dir / "spec.yaml")
    device = resolve_device(spec.device)
    student = RunDir(args.run_dir).student(args.student, spec.seed)
    bundle = load_data(spec.data)
    test = EvalLoader(bundle.val, batch_size=spec.data.eval_batch_size, device=device)  # compares configs: validation
    norm = Normalizer.from_bundle(bundle)
    model, _ = load_model(student)
    float_acc = evaluate(model.to(device), test, norm, device)["acc"]
    names = [i.name for i in layer_inventory(model)]
    pins = resolve_pins(names, spec.quant.pin)
    configs = {"uniform 8-bit": BitConfig.uniform(model, 8).updated(pins),
               "mixed 8/4": mixed_8_4(model, pins),
               "uniform 4-bit": BitConfig.uniform(model, 4).updated(pins)}
    cfg = spec.quant.qat.model_copy(update={"epochs": args.epochs})
    rows = [{"config": "float", "size_mb": model_size(model, BitConfig.uniform(model, 32)).total_mb,
             "avg_bits": 32.0, "acc": float_acc, "delta": 0.0, "seconds": 0.0}]
    print(f"{'config':14s} {'size MB':>9s} {'avg bits':>8s} {'acc %':>7s} {'vs float':>8s}")
    print(f"{'float':14s} {rows[0]['size_mb']:9.4f} {32.0:8.2f} {float_acc:7.2f} {0.0:8.2f}", flush=True)
    for name, bits in configs.items():
        t0 = time.perf_counter()
        qmodel, m = qat_finetune(spec, student, bits, cfg, device=device, seed=spec.seed, bundle=bundle,
                                 desc=f"QAT {name}")
        size = model_size(qmodel)
        row = {"config": name, "size_mb": size.total_mb, "avg_bits": size.avg_bits, "acc": m["val_acc"],
               "delta": m["val_acc"] - float_acc, "seconds": time.perf_counter() - t0, "bits": dict(bits)}
        rows.append(row)
        print(f"{name:14s} {row['size_mb']:9.4f} {row['avg_bits']:8.2f} {row['acc']:7.2f} {row['delta']:8.2f}",
              flush=True)
    out = args.out or Path(__file__).parent / "results" / f"qat_accuracy_{spec.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "qat_accuracy", "spec": spec.name, "data_version": bundle.version, "student": str(student),
        "qat_epochs": args.epochs, "device": str(device), "machine": {"platform": platform.platform(),
        "torch": torch.__version__, "threads": torch.get_num_threads()}, "time": time.strftime("%F %T"),
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
