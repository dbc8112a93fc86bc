"""The seed's quantization table on real images, from a finished run of the evidence spec.

    kdsearch run benchmarks/evidence/evidence.yaml        # teachers imported, students, search, finalize, report
    python benchmarks/evidence/quant_table.py [runs/evidence]

Run from the repo root. Takes the run's own report (`kdsearch.report.render_report`: every row chosen on
validation, test read once per finalized model) and writes its results table and efficiency lines, with the
machine, the command, the seeds and the data version, to benchmarks/results/quant_table.md, and every seed's
numbers (FP32 students and finalized models) to quant_table.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pandas as pd

from kdsearch.report import render_report, students
from kdsearch.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent.parent


def section(report: str, title: str) -> str:
    """The markdown between `## title` and the next `## ` heading."""
    body = report.split(f"## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0].strip()


def main() -> None:
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/evidence")
    out = ROOT / "benchmarks" / "results" / "quant_table"
    rd = RunDir(run_dir)
    report = render_report(run_dir)
    final = pd.read_parquet(rd.final_table)
    spec = rd.spec_dict()
    version = students(run_dir, "scratch")[0].get("data_version", "?")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": spec.get("device")}
    cols = [c for c in ("id", "seed", "label", "kind", "roles", "bits_used", "size_mb", "file_bytes", "val_acc",
                        "test_acc") if c in final.columns]
    rows = final[cols].astype({"roles": str} if "roles" in cols else {}).to_dict("records")
    data = {"machine": machine, "command": "kdsearch run benchmarks/evidence/evidence.yaml && python "
            "benchmarks/evidence/quant_table.py", "seeds": spec.get("seeds"), "data_version": version,
            "students": {k: students(run_dir, k) for k in ("scratch", "kd")}, "finalized": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    text = (f"# Quantization table, CIFAR-10 (JPEG q75 copy), seeds {spec.get('seeds')}\n\n"
            f"{section(report, 'Results')}\n\n### Efficiency\n\n{section(report, 'Efficiency analysis')}\n\n"
            f"Machine: {machine}; command: `{data['command']}`; data version `{version}`.\n")
    Path(str(out) + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
