"""The step-drift figure: how far QAT moves each layer's weight steps, before and after the QAT-recipe change.

    kdsearch run benchmarks/evidence/quant.yaml                       # (at least its baselines: the KD student)
    python benchmarks/evidence/step_drift.py after RUN_DIR            # this checkout's recipe
    PYTHONPATH=OLD_CHECKOUT python benchmarks/evidence/step_drift.py before RUN_DIR   # e.g. a worktree of 49e564d

Run from the repo root. One QAT run of the evidence student (seed 0's FP32 KD student of `quant.yaml`), every layer
at 4 bits except the pinned first and last layers at 8 (so both widths are there), activations 8-bit, the spec's
`quant.qat` recipe for one epoch, plain cross-entropy (no teacher: the step dynamics are the question), through the
product's own `kdsearch.qat.qat_finetune` of whichever kdsearch is imported. Per layer: max over its channels of
|log(s_end / s_init)| of the weight steps, and the channels whose step ended dead or degenerate (every code 0, or a
step below 1e-7: the old clamp). Writes benchmarks/results/step_drift.json (one entry per label) and, once both
labels are there, step_drift.png.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import kdsearch
from kdsearch.checkpoints import load_model
from kdsearch.data import load_data
from kdsearch.qat import qat_finetune
from kdsearch.spec import FinalizeConfig, QuantConfig, parse_spec

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "benchmarks" / "results" / "step_drift"
SPEC = ROOT / "benchmarks" / "evidence" / "quant.yaml"


def _spec():
    """quant.yaml, minus the fields an older kdsearch does not know (so the 'before' code can read it)."""
    d = yaml.safe_load(SPEC.read_text())
    for k in ("calib_batches", "bn_batches"):
        if k not in QuantConfig.model_fields:
            d["quant"].pop(k, None)
    if "uniform_bits" not in FinalizeConfig.model_fields:
        d.get("finalize", {}).pop("uniform_bits", None)
    for k in ("root",):
        d["data"][k] = str((ROOT / d["data"][k]).resolve()) if not Path(d["data"][k]).is_absolute() else d["data"][k]
    return parse_spec(d)


def _weight_steps(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_quantizer.effective_step().detach().clone() for n, m in model.named_modules()
            if hasattr(getattr(m, "weight_quantizer", None), "effective_step")}


def _dead(model: torch.nn.Module) -> dict[str, int]:
    out = {}
    for n, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if hasattr(wq, "integers"):
            s = wq.effective_step().detach()
            codes = wq.integers(m.weight).reshape(s.numel(), -1)
            nonzero = m.weight.detach().reshape(s.numel(), -1).abs().amax(dim=1) > 0
            out[n] = int((((codes == 0).all(dim=1) & nonzero) | (s <= 1e-7)).sum())
    return out


def main() -> None:
    label = sys.argv[1]
    run_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/quant_evidence")
    torch.set_num_threads(1)
    spec = _spec()
    bundle = load_data(spec.data)
    student = run_dir / "students" / "s0" / "kd.pt"
    model, _ = load_model(student)
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    bits = {n: 8 if i in (0, len(names) - 1) else 4 for i, n in enumerate(names)}
    init: dict[str, torch.Tensor] = {}
    cfg = spec.quant.qat.model_copy(update={"epochs": 1})
    qmodel, m = qat_finetune(spec, student, bits, cfg, device=torch.device("cpu"), seed=0, bundle=bundle,
                             on_quantized=lambda mod: init.update(_weight_steps(mod)))
    end = _weight_steps(qmodel)
    dead = _dead(qmodel)
    layers = [{"layer": n, "bits": bits[n], "channels": int(end[n].numel()),
               "max_abs_log_drift": float((end[n] / init[n]).log().abs().max()), "dead_channels": dead[n]}
              for n in names]
    commit = subprocess.run(["git", "-C", str(Path(kdsearch.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    data = json.loads(Path(f"{OUT}.json").read_text()) if Path(f"{OUT}.json").is_file() else {}
    data[label] = {"kdsearch_commit": commit, "val_acc": m["val_acc"], "qat": cfg.model_dump(mode="json"),
                   "layers": layers, "dead_channels": sum(dead.values()),
                   "command": f"python benchmarks/evidence/step_drift.py {label} RUN_DIR",
                   "machine": {"platform": platform.platform()}, "data_version": bundle.version}
    Path(f"{OUT}.json").write_text(json.dumps(data, indent=1) + "\n")
    print(label, "val", m["val_acc"], "dead", sum(dead.values()),
          "max drift 8-bit", max(r["max_abs_log_drift"] for r in layers if r["bits"] == 8),
          "4-bit", max(r["max_abs_log_drift"] for r in layers if r["bits"] == 4))
    if {"before", "after"} <= set(data):
        plot(data)


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for label, marker in (("before", "x"), ("after", "o")):
        layers = data[label]["layers"]
        for b, color in ((8, "tab:red"), (4, "tab:blue")):
            xs = [i for i, r in enumerate(layers) if r["bits"] == b]
            ax.scatter(xs, [max(layers[i]["max_abs_log_drift"], 1e-6) for i in xs], marker=marker, color=color,
                       label=f"{label} ({data[label]['kdsearch_commit']}), {b}-bit weights, "
                             f"{data[label]['dead_channels']} dead channels")
    ax.set_yscale("log")
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("max over channels |log(s_end / s_init)|")
    ax.set_title("Weight-step drift in one QAT epoch of the evidence student (resnet20, 8-bit ends / 4-bit rest)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{OUT}.png", dpi=110)


if __name__ == "__main__":
    main()
