"""The distillation ablation on real images: scratch vs KD-average / vote / dynamic / dynamic_ka, several seeds.

    python benchmarks/evidence/ablation.py [--spec benchmarks/evidence/evidence.yaml] [--set k=v ...]

Run from the repo root. Every row is the spec's one student recipe; rows differ only in the teacher signal (none,
or an ensemble strategy), and a KD row and the scratch row of the same seed see the same augmented views epoch by
epoch (`kdsearch.recipes`). Each (row, seed) is one Ray task of the product (`kdsearch.stages.baselines`), so a
cluster runs them at once; finished students are reused on a rerun. Prints the table (test accuracy mean ± std
over seeds, the paired difference to scratch and to average with their spread) and writes
benchmarks/results/kd_ablation.json and .md naming the machine, the command, the seeds and the data version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from kdsearch.context import RunContext
from kdsearch.pipeline import run_pipeline
from kdsearch.report_text import difference_line, fmt_ms, mean_std
from kdsearch.spec import load_spec, parse_override
from kdsearch.stages.baselines import student_units
from kdsearch.stages.tasks import gather

HERE = Path(__file__).resolve().parent
STRATEGIES = ("average", "vote", "dynamic", "dynamic_ka")  # entropy: in the registry, not run here (CPU time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(HERE / "evidence.yaml"))
    ap.add_argument("--run-dir", default="runs/evidence")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(HERE.parent / "results" / "kd_ablation"))
    args = ap.parse_args()
    spec = load_spec(args.spec, dict(parse_override(s) for s in args.set))
    ctx = RunContext.create(args.run_dir, device=spec.device, progress=False)
    run_pipeline(spec, ctx, only=("teachers",))
    refs, pool = student_units(spec, ctx.run_dir, strategies=STRATEGIES)
    try:
        out = gather("ablation", refs)
    finally:
        if pool is not None:
            pool.shutdown()
    by_row: dict[str, dict[int, float]] = {}
    val: dict[str, dict[int, float]] = {}
    for label, m in out.items():
        row = "scratch" if label.startswith("scratch") else "KD-" + m["strategy"]
        by_row.setdefault(row, {})[m["seed"]] = m["test_acc"]
        val.setdefault(row, {})[m["seed"]] = m["val_acc"]
    teachers = json.loads((Path(args.run_dir) / "manifest.json").read_text())["stages"]["teachers"]["summary"]
    version = next(iter(out.values()))["data_version"]
    data = "CIFAR-10 (JPEG q75 copy)" if "cifar10-jpeg" in version else spec.data.dataset
    lines = [f"Distillation ablation, {spec.student.arch} student, {data}, seeds {list(spec.seeds)}; "
             f"teachers: " + ", ".join(f"{a} test {t['test_acc']:.2f}%" for a, t in teachers["teachers"].items()),
             "", "| row | test acc. (%) | val acc. (%) | n | vs scratch (paired) | vs KD-average (paired) |",
             "|---|---|---|---|---|---|"]
    for row in ["scratch", *(f"KD-{s}" for s in STRATEGIES)]:
        acc = by_row.get(row, {})
        ds, ss, _ = mean_std([acc[s] - by_row["scratch"][s] for s in acc if s in by_row["scratch"]])
        da, sa, _ = mean_std([acc[s] - by_row["KD-average"][s] for s in acc if s in by_row.get("KD-average", {})])
        lines.append(f"| {row} | {fmt_ms(list(acc.values()))} | {fmt_ms(list(val.get(row, {}).values()))} | "
                     f"{len(acc)} | {ds:+.2f} ± {ss:.2f} | {da:+.2f} ± {sa:.2f} |")
    lines += ["", difference_line("KD-dynamic - scratch", by_row["KD-dynamic"], by_row["scratch"]),
              difference_line("KD-dynamic - KD-average", by_row["KD-dynamic"], by_row["KD-average"])]
    if "KD-dynamic_ka" in by_row:
        lines += [difference_line("KD-dynamic_ka - KD-average", by_row["KD-dynamic_ka"], by_row["KD-average"]),
                  difference_line("KD-dynamic_ka - KD-dynamic", by_row["KD-dynamic_ka"], by_row["KD-dynamic"])]
    meta = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "command": " ".join(["python", *sys.argv]), "seeds": list(spec.seeds),
            "data_version": version, "spec": spec.to_dict()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({**meta, "test_acc": by_row, "val_acc": val}, indent=1) + "\n")
    text = "\n".join(lines) + f"\n\nMachine: {meta['machine']}; command: `{meta['command']}`; data version " \
                              f"`{meta['data_version']}`.\n"
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
