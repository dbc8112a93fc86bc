"""`kdsearch bench RUN_DIR`: every finalized model and the FP32 KD student of each seed in ONNX Runtime.

One Ray task per model (one CPU each, `kdsearch.bench` holds the bodies); the tasks run one after another
(each waits for the one before), so no two latency measurements share the machine. The driver only gathers
and writes ``RUN_DIR/bench.json``: the machine (CPU model and flags, VNNI or not), the ORT version, threads,
batch and run counts, each model's fusion counts, median and p90 latency, speed-up over its seed's FP32
student (timed alongside it, round-robin, in the same task), and top-1 agreement of ORT with the reloaded ``.kdq`` on the test split. Paths in it are relative
to the run directory.
"""

from __future__ import annotations

import logging
from typing import Any

from ..io import atomic_write_json
from ..rundir import RunDir, RunDirError
from .tasks import Resources, Unit, gather, submit

log = logging.getLogger("kdsearch.stages.bench")


def _rows(rd: RunDir) -> list[tuple[str, int, str]]:
    import pandas as pd

    if not rd.final_table.is_file():
        raise RunDirError(f"{rd.root} has no finalized models yet; run `kdsearch run SPEC` until the finalize stage")
    df = pd.read_parquet(rd.final_table)
    return [(str(r["id"]), int(r["seed"]), str(r["label"])) for _, r in df.iterrows()]


def run_bench(run_dir: str, runs: int = 1000, address: str | None = None) -> dict[str, Any]:
    """Measure, write and return ``bench.json``'s content."""
    import onnxruntime as ort

    from ..bench import WARMUP_RUNS, bench_final_task, bench_fp32_task, cpu_info
    from ..raycluster import ensure_ray

    rd = RunDir(run_dir)
    rows = _rows(rd)
    spec = rd.spec_dict()
    seeds = sorted({seed for _, seed, _ in rows})
    units = [Unit(f"bench fp32 s{s}", bench_fp32_task, (spec, str(rd.root), s, runs), resources=Resources(cpus=1))
             for s in seeds]
    units += [Unit(f"bench {i} s{s}", bench_final_task, (spec, str(rd.root), i, s, runs), resources=Resources(cpus=1))
              for i, s, _ in rows]
    ensure_ray(address)
    refs: dict[str, Any] = {}
    last = None
    for unit in units:  # one after another: latency is measured alone on the machine
        last = submit(unit, *([last] if last is not None else []))
        refs[unit.label] = last
    log.info("bench: %d models and %d FP32 students, %d runs each", len(rows), len(seeds), runs)
    out = gather("bench", refs)
    fp32 = {int(r["seed"]): r for label, r in out.items() if label.startswith("bench fp32")}
    labels = {(i, s): label for i, s, label in rows}
    models = []
    for i, s, _ in rows:
        r = dict(out[f"bench {i} s{s}"])
        r["label"] = labels[(i, s)]
        models.append(r)
    result = {"machine": cpu_info(), "onnxruntime": ort.__version__, "intra_op_num_threads": 1, "batch": 1,
              "runs": runs, "warmup": WARMUP_RUNS, "fp32": [fp32[s] for s in seeds], "models": models}
    atomic_write_json(rd.bench_file, result)
    return result


def bench_table(result: dict[str, Any]) -> str:
    """A markdown table of bench.json: one row per FP32 student and finalized model. "Requantized in ORT only":
    how many tensors the integer graph quantizes where the QAT model computes in float (``bench.json`` names
    them): none in the zoo's models, whose residual adds are quantized in QAT; a user's ``+`` adds, for one."""
    m = result["machine"]
    lines = [f"ONNX Runtime {result['onnxruntime']} CPU provider, batch {result['batch']}, "
             f"{result['intra_op_num_threads']} thread, {result['runs']} runs after {result['warmup']} warm-up; "
             f"{m['model']} ({'VNNI' if m['vnni'] else 'no VNNI'}: {', '.join(m['flags']) or 'none'})", "",
             "| model | seed | integer / float-by-design / unfused convs+gemms | median ms | p90 ms | FP32 median ms "
             "(timed alongside) | speed-up vs FP32 | top-1 agreement ORT vs .kdq (%) | requantized in ORT only |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["fp32"]:
        lines.append(f"| FP32 KD student | {r['seed']} | float | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | | 1.00x | | |")
    for r in result["models"]:
        f = r["fusion"]
        lines.append(f"| {r['id']} ({r['label']}) | {r['seed']} | {f['integer_total']} / {len(f['float_by_design'])} / "
                     f"{len(f['float_unfused'])} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['fp32_alongside']['median_ms']:.3f} | {r['speedup_vs_fp32']:.2f}x | {r['agreement']:.2f} | "
                     f"{len(r.get('requantized', []))} |")
    return "\n".join(lines) + "\n"
