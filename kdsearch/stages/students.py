"""Student selection (the seed's step 3): which candidate architectures are "good quantizable".

For each of ``student.candidates`` (default: the spec's student alone) this measures

* the float accuracy after ``student.train`` from scratch (reusing the scratch student's file for the
  spec's own student, and any finished candidate file);
* the accuracy right after uniform 8- and 4-bit quantization (weights per ``quant.pin``; activations at
  ``quant.act_bits``), and after the *same short QAT* the search's trials run (``search.trial``);

and ranks the candidates: by float accuracy, by the accuracy lost to quantization, and overall by the
4-bit accuracy after QAT (what a size-constrained search can reach). Each candidate's numbers are cached
(keyed by its float model and the QAT settings), so a rerun only redoes what changed.

Outputs: runs/<name>/students/selection.parquet and selection.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..checkpoints import load_model, read_model_file
from ..context import RunContext
from ..data import DataBundle, load_data
from ..fp32 import train_float_model
from ..io import atomic_to_parquet, atomic_write_json, atomic_write_text, file_digest, stable_hash
from ..qat import recipe_key
from ..quant import BitConfig, model_size
from ..recipes import model_seed
from ..rundir import RunDir
from ..spec import Spec

log = logging.getLogger("kdsearch.stages.students")

UNIFORM_BITS = (8, 4)


def selection_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).students_dir / "selection"


def candidate_path(spec: Spec, run_dir: Path, arch: str) -> Path:
    """The spec's own student shares the baselines' scratch file of seeds[0]; other candidates get their own."""
    if arch == spec.student.arch:
        return RunDir(run_dir).student("scratch", spec.seed)
    return selection_dir(run_dir) / f"{arch.replace(':', '.')}.pt"  # an import path's colon: not in a file name


def quantized_accuracy(
    spec: Spec, bundle: DataBundle, model_file: Path, bits: int, device: torch.device, *, ckpt: Path | None = None
) -> dict[str, float]:
    """Validation accuracy of the float model at uniform ``bits`` (pins applied): post-training quantization, and
    after the search's short QAT (``search.trial``) on the training split; both by the product's one QAT recipe
    (`kdsearch.qat.qat_finetune`), so a candidate is ranked by what the search and finalize would do with it."""
    from ..qat import qat_finetune

    model, obj = load_model(model_file)
    cfg = BitConfig.uniform(model, bits, pin=spec.quant.pin).to_dict()
    seed = model_seed(obj["arch"], spec.seed) + bits
    trial = spec.search.trial
    _, ptq = qat_finetune(spec, model_file, cfg, trial, device=device, seed=seed, bundle=bundle, train=False)
    qmodel, qat = qat_finetune(spec, model_file, cfg, trial, device=device, seed=seed, bundle=bundle, ckpt_path=ckpt,
                               desc=f"{obj['arch']} QAT w{bits}",
                               resume_key=stable_hash({"model": file_digest(model_file), "bits": bits}))
    size = model_size(qmodel)
    return {"ptq_acc": float(ptq["val_acc"]), "qat_acc": float(qat["val_acc"]), "size_mb": size.total_mb,
            "avg_bits": size.avg_bits}


def _candidate_task(spec_dict: dict[str, Any], run_dir: str, arch: str) -> dict[str, Any]:
    """Body of one Ray task: train (or reuse) one candidate and measure its quantized accuracy."""
    from ..context import setup_logging
    from ..raycluster import task_device
    from ..runtime import set_cpu_threads
    from ..spec import parse_spec

    setup_logging()
    spec = parse_spec(spec_dict)
    set_cpu_threads(spec.student.cpus)
    device = task_device(spec.device)
    path = candidate_path(spec, Path(run_dir), arch)
    float_metrics = train_float_model(spec, arch, spec.student.train, path, seed=spec.seed, device=device)
    meta = read_model_file(path).get("meta", {})
    key = stable_hash({"model": meta.get("inputs_key"), "qat": spec.search.trial.model_dump(mode="json"),
                       "pin": spec.quant.pin, "act_bits": spec.quant.act_bits, "bits": UNIFORM_BITS,
                       "recipe": recipe_key(spec)})
    out_json = selection_dir(Path(run_dir)) / f"{arch}.json"
    if out_json.is_file():
        cached = json.loads(out_json.read_text())
        if cached.get("inputs_key") == key:
            log.info("students: %s is done (same inputs); reusing", arch)
            return dict(cached["row"])
    bundle = load_data(spec.data)
    model, _ = load_model(path)
    row: dict[str, Any] = {
        "arch": arch, "params": sum(p.numel() for p in model.parameters()),
        "fp32_mb": model_size(model).total_mb, "float_acc": float(float_metrics["val_acc"]),
        "qat_epochs": spec.search.trial.epochs,
    }  # fmt: skip
    for bits in UNIFORM_BITS:
        ckpt = selection_dir(Path(run_dir)) / f"{arch}_w{bits}.ckpt"
        q = quantized_accuracy(spec, bundle, path, bits, device, ckpt=ckpt)
        row.update({f"ptq_acc_w{bits}": q["ptq_acc"], f"qat_acc_w{bits}": q["qat_acc"],
                    f"drop_w{bits}": row["float_acc"] - q["qat_acc"], f"size_mb_w{bits}": q["size_mb"]})
        log.info("students: %s w%d: float %.2f%%, PTQ %.2f%%, after QAT %.2f%% (validation)", arch, bits,
                 row["float_acc"], q["ptq_acc"], q["qat_acc"])
    atomic_write_json(out_json, {"inputs_key": key, "row": row})
    for bits in UNIFORM_BITS:
        (selection_dir(Path(run_dir)) / f"{arch}_w{bits}.ckpt").unlink(missing_ok=True)
    return row


def rank_students(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Sort by 4-bit accuracy after QAT; rank columns for float accuracy and for the mean quantization loss."""
    df = pd.DataFrame(rows)
    last = UNIFORM_BITS[-1]
    df["mean_drop"] = df[[f"drop_w{b}" for b in UNIFORM_BITS]].mean(axis=1)
    df["rank_float"] = df["float_acc"].rank(ascending=False, method="min").astype(int)
    df["rank_drop"] = df["mean_drop"].rank(ascending=True, method="min").astype(int)
    df = df.sort_values([f"qat_acc_w{last}", "float_acc"], ascending=False).reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    cols = ["rank", "arch", "params", "fp32_mb", "float_acc", "qat_epochs"]
    for b in UNIFORM_BITS:
        cols += [f"ptq_acc_w{b}", f"qat_acc_w{b}", f"drop_w{b}", f"size_mb_w{b}"]
    return df[cols + ["mean_drop", "rank_float", "rank_drop"]]  # a fixed order, also for cached rows


def selection_markdown(df: pd.DataFrame) -> str:
    cols = ["rank", "arch", "params", "float_acc"]
    for b in UNIFORM_BITS:
        cols += [f"ptq_acc_w{b}", f"qat_acc_w{b}", f"drop_w{b}", f"size_mb_w{b}"]
    cols += ["rank_float", "rank_drop"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    lines = []
    for r in df[cols].itertuples(index=False):
        cells = [f"{v:.2f}" if isinstance(v, float) and not c.startswith("size") else
                 f"{v:.4f}" if isinstance(v, float) else str(v) for c, v in zip(cols, r)]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nAccuracies in % on the validation split (the ranking chooses, so it never reads test); drop = float - "
            "after QAT; QAT = the search's short trial QAT (search.trial); sizes in MB (1e6 bytes) from the size "
            "model.\n")
    return head + "\n".join(lines) + "\n" + note


def students_stage(spec: Spec, ctx: RunContext) -> pd.DataFrame:
    """Rank the spec's candidate students (one Ray task each) by validation accuracy; write the table."""
    from ..raycluster import ensure_ray
    from .tasks import Resources, Unit, gather, submit

    ensure_ray(ctx.address, py_modules=ctx.py_modules)
    candidates = spec.student.candidates or (spec.student.arch,)
    res = Resources.for_spec(spec.device, spec.student.cpus, spec.student.gpus)
    run_dir = str(Path(ctx.run_dir).resolve())
    refs = {a: submit(Unit(f"candidate {a}", _candidate_task, (spec.to_dict(), run_dir, a), resources=res))
            for a in candidates}
    out = gather("students", refs)
    df = rank_students([out[a] for a in candidates])
    rd = RunDir(ctx.run_dir)
    atomic_to_parquet(df, rd.students_dir / "selection.parquet")
    atomic_write_text(rd.students_dir / "selection.md", selection_markdown(df))
    return df
