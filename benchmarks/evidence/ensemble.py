"""Accuracy of the evidence teachers' ensemble (average of softmax, majority vote) on validation and test.

    kdsearch train benchmarks/evidence/evidence.yaml --model teachers --run-dir runs/evrun   # imports the assets
    python benchmarks/evidence/ensemble.py runs/evrun [SPEC]     # writes benchmarks/results/ensemble.json

Measured twice: with the teachers' numerics on this machine (`kdsearch.distill.numerics`: bf16 on a CPU with
native bf16) and in fp32, so the cost of bf16 teachers to the ensemble's accuracy is on record.

Run from the repo root. Uses the product's own teacher source and ensemble strategies (`kdsearch.distill`).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from kdsearch.data import EvalLoader, Normalizer, load_data
from kdsearch.distill import InProcessTeachers, combine, load_teachers
from kdsearch.spec import load_spec


OUT = Path(__file__).resolve().parent.parent / "results" / "ensemble.json"


def main() -> None:
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/evidence"
    spec_path = sys.argv[2] if len(sys.argv) > 2 else "benchmarks/evidence/evidence.yaml"
    spec = load_spec(spec_path)
    bundle = load_data(spec.data)
    teachers = load_teachers(spec, run_dir)
    results = {}
    for bf16 in (True, False):
        src = InProcessTeachers(teachers, Normalizer.from_bundle(bundle), torch.device("cpu"), bf16=bf16)
        results["bf16" if src.bf16 else "fp32"] = measure(src, bundle, "bf16" if src.bf16 else "fp32")
    OUT.write_text(json.dumps({
        "command": f"python benchmarks/evidence/ensemble.py RUN_DIR {spec_path}", "spec": spec.name,
        "teachers": sorted(teachers), "data_version": bundle.version, "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "accuracy_pct": results}, indent=1) + "\n")
    print(f"wrote {OUT}")


def measure(src: InProcessTeachers, bundle, numerics: str) -> dict[str, dict[str, float]]:
    out = {}
    for split in ("val", "test"):
        correct, n = {"average": 0, "vote": 0}, 0
        for batch in EvalLoader(getattr(bundle, split), batch_size=1000):
            logits = src.logits(batch.images)
            for name in correct:
                correct[name] += int((combine(name, logits, batch.labels).argmax(1) == batch.labels).sum())
            n += len(batch.labels)
        out[split] = {name: round(100 * c / n, 2) for name, c in correct.items()}
        print(numerics, split, out[split], flush=True)
    return out


if __name__ == "__main__":
    main()
