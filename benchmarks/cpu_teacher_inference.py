"""CPU teacher inference: fp32 vs the teachers' numerics rule, glibc's default malloc vs `raycluster.WORKER_ENV`.

    python benchmarks/cpu_teacher_inference.py [--batches 250 1000] [--images 3000] [--repeats 2]

The two product choices that make a logit cache cheap on CPU, measured side by side: `kdsearch.distill.numerics`
(bf16 autocast + channels_last where the CPU has native bf16; fp32 is `bf16=False`) and the workers' malloc
settings. Each case runs in a fresh subprocess (glibc reads MALLOC_* once, at process start), one thread, the
two evidence teachers (resnet20 + wrn_16_2, random weights: speed does not depend on them) through kdsearch's
own `InProcessTeachers`, cases interleaved, best of `--repeats`. Prints images/s and the user / system CPU
seconds (page faults show up as system time), and writes benchmarks/results/cpu_teacher_inference.json naming
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys, time, torch
import kdsearch.models
from kdsearch.data import Normalizer
from kdsearch.distill import InProcessTeachers
from kdsearch.models.registry import create_model
torch.set_num_threads(1)
bs, n, bf16 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
ms = {a: create_model(a, num_classes=10) for a in ("resnet20", "wrn_16_2")}
src = InProcessTeachers(ms, Normalizer((0.5,) * 3, (0.25,) * 3), torch.device("cpu"), bf16=bf16)
x = torch.randint(0, 255, (bs, 3, 32, 32), dtype=torch.uint8)
src.logits(x)
t0, c0 = time.perf_counter(), os.times()
for _ in range(max(1, n // bs)):
    src.logits(x)
c1, dt = os.times(), time.perf_counter() - t0
print(json.dumps({"images_per_s": max(1, n // bs) * bs / dt, "user_s": c1.user - c0.user,
                  "sys_s": c1.system - c0.system, "bf16": src.bf16}))
"""


def run(batch: int, images: int, bf16: bool, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(images), str(int(bf16))], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from kdsearch.raycluster import WORKER_ENV

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[250, 1000])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in WORKER_ENV}
    mallocs = {"glibc default": base, "WORKER_ENV": base | WORKER_ENV}
    cases = {f"{numerics}, {m}": (numerics == "numerics rule", env)
             for numerics in ("fp32", "numerics rule") for m, env in mallocs.items()}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for _ in range(a.repeats):
        for bs in a.batches:
            for name, (bf16, env) in cases.items():
                r = run(bs, a.images, bf16, env)
                best = results.setdefault(name, {}).get(str(bs))
                if best is None or r["images_per_s"] > best["images_per_s"]:
                    results[name][str(bs)] = r
    lines = ["| teachers, malloc | bf16 | batch | images/s | user s | sys s |", "|---|---|---|---|---|---|"]
    for name, by in results.items():
        for bs, r in by.items():
            lines.append(f"| {name} | {r['bf16']} | {bs} | {r['images_per_s']:.0f} | {r['user_s']:.1f} | "
                         f"{r['sys_s']:.1f} |")
    for bs in map(str, a.batches):
        speed = {name: by[bs]["images_per_s"] for name, by in results.items()}
        lines.append(f"\nbatch {bs}: WORKER_ENV / default malloc = "
                     f"{speed['numerics rule, WORKER_ENV'] / speed['numerics rule, glibc default']:.2f}x "
                     f"(fp32: {speed['fp32, WORKER_ENV'] / speed['fp32, glibc default']:.2f}x); numerics rule / fp32 "
                     f"= {speed['numerics rule, WORKER_ENV'] / speed['fp32, WORKER_ENV']:.2f}x; both / neither = "
                     f"{speed['numerics rule, WORKER_ENV'] / speed['fp32, glibc default']:.2f}x")
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results" / "cpu_teacher_inference.json"
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "processor": platform.processor()},
                               "command": " ".join(["python", *sys.argv]), "worker_env": WORKER_ENV,
                               "load_avg_1_5_15": os.getloadavg(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
