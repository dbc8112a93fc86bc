"""The quantization table on real images, from a finished run of the evidence spec.

    kdsearch run benchmarks/evidence/quant.yaml        # teachers imported, students, sensitivity, search, finalize
    python benchmarks/evidence/quant_table.py [runs/quant_evidence] [benchmarks/evidence/quant.yaml]

Run from the repo root. Takes the run's own report (`kdsearch.report.render_report`: every row chosen on
validation, test read once per finalized model) and writes its results table and efficiency lines to
benchmarks/results/quant_table.md, and to quant_table.json:

* ``student``: arch, quantizable layers, FP32 size; ``budget_mb``;
* ``search``: trials run, and the fraction of the search space that fits the budget (estimated by sampling
  200,000 configurations uniformly: ``SearchSpace.feasible_fraction``);
* ``dead_channels``: dead or degenerate channels counted in every exported ``.kdq`` file, reloaded here
  (``kdsearch.quant.dead_channels``);
* ``rows``: one per configuration, {configuration, bits, size_mb, test_acc: {seed: value}, val_acc: {seed: value}}.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from kdsearch.checkpoints import load_model
from kdsearch.quant import dead_channels, load_quantized, model_size, quantizable_layers
from kdsearch.report import render_report, students
from kdsearch.rundir import RunDir
from kdsearch.search.results import read_results
from kdsearch.search.space import build_space
from kdsearch.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent.parent


def section(report: str, title: str) -> str:
    """The markdown between `## title` and the next `## ` heading."""
    body = report.split(f"## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0].strip()


def configuration(r: pd.Series) -> str:
    """The row's name in the issue's terms, from finalize's id, kind and roles."""
    roles = str(r["roles"])
    if r["id"] == "ptq_kd_8":
        return "PTQ 8-bit (KD student, no training)"
    if r["kind"] == "uniform":
        return r["label"].replace("QAT Scratch", "QAT scratch")
    names = []
    if r["kind"] == "searched":
        names.append(f"searched {r['label'].lower()}")
    if "allocation only" in roles:
        names.append(f"allocation-only {r['label'].lower()}")
    return " = ".join(names) or r["label"]


def _by_seed(rows: pd.DataFrame | list[dict[str, Any]], col: str) -> dict[str, float]:
    recs = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
    return {str(int(m["seed"])): round(float(m[col]), 4) for m in recs if m.get(col) is not None}


def main() -> None:
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quant_evidence")
    spec_path = sys.argv[2] if len(sys.argv) > 2 else "benchmarks/evidence/quant.yaml"
    out = ROOT / "benchmarks" / "results" / "quant_table"
    rd = RunDir(run_dir)
    spec = load_spec(spec_path)
    report = render_report(run_dir)
    final = pd.read_parquet(rd.final_table)
    student, _ = load_model(rd.student("kd", spec.seed))
    budget = spec.search.budgets_mb[0]
    space = build_space(student, spec.quant, budget)
    results = read_results(run_dir)
    # the data version each model was made under: the FP32 students' and the finalized models' (the same images
    # give the same content-based version; a run resumed across the change of version format shows both)
    versions = sorted({str(m.get("data_version", "?")) for kind in ("scratch", "kd") for m in students(run_dir, kind)}
                      | {json.loads((rd.final_dir / f).with_suffix(".json").read_text()).get("data_version", "?")
                         for f in final["file"]})
    version = " / ".join(versions)
    rows: list[dict[str, Any]] = []
    for kind, name in (("scratch", "FP32 scratch"), ("kd", "FP32 KD")):
        ms = students(run_dir, kind)
        rows.append({"configuration": name, "id": f"students/{kind}", "bits": "FP32",
                     "size_mb": model_size(student).total_mb, "test_acc": _by_seed(ms, "test_acc"),
                     "val_acc": _by_seed(ms, "val_acc")})
    dead = 0
    for mid, g in final.groupby("id", sort=False):
        first = g.iloc[0]
        for f in g["file"]:
            dead += len(dead_channels(load_quantized(rd.final_dir / f)))
        rows.append({"configuration": configuration(first), "id": mid, "bits": first["bits_used"],
                     "roles": first["roles"], "size_mb": float(first["size_mb"]),
                     "compression": float(first["compression"]), "bit_config": first["bits"],
                     "test_acc": _by_seed(g, "test_acc"), "val_acc": _by_seed(g, "val_acc")})
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": spec.device}
    command = f"kdsearch run {spec_path} && python benchmarks/evidence/quant_table.py RUN_DIR {spec_path}"
    data = {
        "machine": machine, "command": command, "seeds": list(spec.seeds), "data_version": version,
        "data": "CIFAR-10 (JPEG q75 copy): a stratified 15,000-image subset of the training split (10,000 train, "
                "5,000 validation), the full 10,000-image test split",
        "student": {"arch": spec.student.arch, "quantizable_layers": len(quantizable_layers(student)),
                    "searched_layers": len(space.searchable), "fp32_size_mb": model_size(student).total_mb},
        "budget_mb": budget,
        "search": {"trials": int((results["status"] == "completed").sum()), "trials_total": len(results),
                   "bits": list(spec.quant.bits), "space_size": space.cardinality,
                   "feasible_fraction": space.feasible_fraction(200_000, seed=0)},
        "dead_channels": dead, "exported_files": int(len(final)), "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    text = (f"# Quantization table, CIFAR-10 (JPEG q75 copy), seeds {list(spec.seeds)}\n\n"
            f"Student {spec.student.arch} ({data['student']['quantizable_layers']} quantizable layers, "
            f"{data['student']['searched_layers']} searched over {'/'.join(map(str, spec.quant.bits))}), FP32 "
            f"{data['student']['fp32_size_mb']:.4f} MB; budget {budget:g} MB (FP32 / "
            f"{data['student']['fp32_size_mb'] / budget:.2f}); {data['search']['trials']} search trials; "
            f"{100 * data['search']['feasible_fraction']:.3f}% of the {space.cardinality:.3g} configurations fit "
            f"the budget (200,000 uniform samples); {dead} dead channels in {len(final)} exported files. "
            f"Data: {data['data']}.\n\n"
            f"{section(report, 'Results')}\n\n### Efficiency\n\n{section(report, 'Efficiency analysis')}\n\n"
            f"Machine: {machine}; command: `{command}`; data version `{version}`.\n")
    Path(str(out) + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
