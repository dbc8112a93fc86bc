"""The lead on the 8-bit QAT rows of quant_table.md: post-training 8-bit, then one epoch of QAT with LSQ's weight
step sizes learned vs frozen at their init.

    python benchmarks/evidence/qat8_lead.py [runs/evidence]        # after `kdsearch run benchmarks/evidence/evidence.yaml`

Run from the repo root. Seed 0's KD student only, one epoch of plain-CE QAT (the spec's quant.qat recipe, lr 0.01),
all layers at the given width (no pins), activations 8-bit; validation accuracy only. One seed, one epoch: a lead to
measure over 3 seeds, not a result (numbers: benchmarks/results/evidence_setup.md).
"""

from __future__ import annotations

import copy
import sys

import torch

from kdsearch.checkpoints import load_model
from kdsearch.data import EvalLoader, Normalizer, TrainLoader, load_data
from kdsearch.quant import BitConfig, quantize
from kdsearch.runtime import seed_everything
from kdsearch.spec import load_spec
from kdsearch.train import FitRun, evaluate, fit


def main() -> None:
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/evidence"
    torch.set_num_threads(2)
    spec = load_spec("benchmarks/evidence/evidence.yaml")
    bundle = load_data(spec.data)
    norm, cpu = Normalizer.from_bundle(bundle), torch.device("cpu")
    val = EvalLoader(bundle.val, batch_size=1000)
    student, _ = load_model(f"{run_dir}/students/s0/kd.pt")
    student.eval()
    print("fp32 val", evaluate(student, val, norm, cpu)["acc"])
    for bits in (16, 8, 4):
        q = copy.deepcopy(student)
        quantize(q, BitConfig.uniform(q, bits, pin={}), act_bits=8)
        print(f"post-training w{bits}a8 val", evaluate(q.eval(), val, norm, cpu)["acc"])
    cfg = spec.quant.qat.model_copy(update={"epochs": 1})
    for bits in (8, 16):
        for frozen in (False, True):
            seed_everything(0)
            q = copy.deepcopy(student)
            quantize(q, BitConfig.uniform(q, bits, pin={}), act_bits=8)
            for name, p in q.named_parameters():
                if frozen and name.endswith("weight_quantizer.step"):
                    p.requires_grad_(False)
            res = fit(q, TrainLoader(bundle, spec.data, batch_size=128, seed=0), val,
                      FitRun(cfg, normalizer=norm, device=cpu, progress=False))
            print(f"QAT 1 epoch w{bits}a8, weight steps {'frozen' if frozen else 'learned'}: val",
                  res.final["val_acc"], flush=True)


if __name__ == "__main__":
    main()
