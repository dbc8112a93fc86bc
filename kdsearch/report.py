"""report.md: the seed's results tables for a run, rebuilt from the run directory's files alone.

    write_report(run_dir)      # runs/<name>/report.md; `kdsearch report RUN_DIR` calls this
    report_stage(spec, ctx)    # the pipeline stage

Sources: spec.yaml/manifest.json, teachers/*.json, students/*.json (+ the student file's provenance),
final/final.parquet, search/summary.json + pareto.parquet, sensitivity/priors.json. The plots are linked
where their stages wrote them (search/pareto.png, sensitivity/sensitivity.png), relative to report.md.
Anything a stage has not produced yet reads "not run yet", so the report works on a partial run.

The seed's table (Baseline FP32, KD FP32, QAT Scratch/KD 16 and 8 bit, QAT Layer+KD Mixed 16/8 and 8/4)
maps onto the run as: FP32 rows = students/scratch.pt and kd.pt; uniform rows = finalize's qat_scratch_16,
qat_kd_16, qat_scratch_8, qat_kd_8; a "Mixed a/b" row = the most accurate finalized searched configuration
whose widths are exactly {a, b}. Finalized configurations with other width sets get rows of their own,
labelled by the widths they use (e.g. "Mixed 8/4/2-bit").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .context import RunContext
from .io import atomic_write_text
from .spec import Spec
from .status import check_run_dir, markdown_table, read_json, run_spec, stage_rows

log = logging.getLogger("kdsearch.report")

NOT_RUN = "not run yet"
UNIFORM_ROWS = (("QAT Scratch", "16-bit", "qat_scratch_16"), ("QAT KD", "16-bit", "qat_kd_16"),
                ("QAT Scratch", "8-bit", "qat_scratch_8"), ("QAT KD", "8-bit", "qat_kd_8"))
MIXED_ROWS = ((16, 8), (8, 4))
ROW_COLUMNS = ["Configuration", "Bit-width scheme", "Accuracy (%)", "Size (MB)", "File (bytes)", "Avg bits", "Model"]


def _pct(v: Any) -> str:
    return f"{float(v):.2f}" if v is not None and v == v else "-"


def _float_student(run_dir: Path) -> dict[str, Any]:
    """arch, num_classes, FP32 size (size model) and provenance of the float student; {} without one."""
    from .checkpoints import CheckpointError, read_model_file

    for name in ("kd.pt", "scratch.pt"):
        p = run_dir / "students" / name
        if not p.is_file():
            continue
        try:
            obj = read_model_file(p)
        except CheckpointError:
            continue
        from .models import create_model
        from .quant import model_size

        size = model_size(create_model(obj["arch"], num_classes=obj["num_classes"]))
        return {"arch": obj["arch"], "num_classes": obj["num_classes"], "fp32_mb": size.total_mb,
                "params": size.num_params, "meta": obj.get("meta", {})}
    return {}


def _final(run_dir: Path) -> pd.DataFrame | None:
    p = run_dir / "final" / "final.parquet"
    return pd.read_parquet(p) if p.is_file() else None


def _used(s: Any) -> frozenset[int]:
    return frozenset(int(b) for b in str(s).split("/") if b)


def _model_row(conf: str, scheme: str, r: pd.Series) -> list[Any]:
    return [conf, scheme, _pct(r["acc"]), f"{r['size_mb']:.4f}", f"{int(r['file_bytes']):,}", f"{r['avg_bits']:.2f}",
            f"final/{r['file']}"]


def _missing_row(conf: str, scheme: str, why: str) -> list[Any]:
    return [conf, scheme, why, "-", "-", "-", "-"]


def seed_table(run_dir: Path, spec: dict[str, Any], student: dict[str, Any]) -> pd.DataFrame:
    """The seed's eight rows (plus one per other finalized width set), with accuracy and sizes or why not."""
    rows: list[list[Any]] = []
    fp32 = student.get("fp32_mb")
    for conf, name in (("Baseline (Scratch)", "scratch"), ("KD (FP32)", "kd")):
        m = read_json(run_dir / "students" / f"{name}.json")
        if m:
            rows.append([conf, "FP32", _pct(m.get("test_acc")), f"{fp32:.4f}" if fp32 else "-", "-", "32.00",
                         f"students/{name}.pt"])
        else:
            rows.append(_missing_row(conf, "FP32", NOT_RUN))
    final = _final(run_dir)
    for conf, scheme, fid in UNIFORM_ROWS:
        hit = final[final["id"] == fid] if final is not None else None
        if hit is not None and len(hit):
            rows.append(_model_row(conf, scheme, hit.iloc[0]))
        else:
            rows.append(_missing_row(conf, scheme, NOT_RUN))
    quant = spec.get("quant") or {}
    choices = set(quant.get("bits") or []) | set((quant.get("pin") or {}).values())
    searched = final[final["kind"].isin(("searched", "solver"))] if final is not None else None
    seen: set[frozenset[int]] = set()
    for pair in MIXED_ROWS:
        scheme = f"Mixed {pair[0]}/{pair[1]}-bit"
        seen.add(frozenset(pair))
        if not set(pair) <= choices:
            why = f"not searched (the spec's bit choices are {'/'.join(map(str, sorted(choices, reverse=True)))})"
            rows.append(_missing_row("QAT Layer+KD", scheme, why))
            continue
        hit = searched[searched["bits_used"].map(_used) == frozenset(pair)] if searched is not None else None
        if hit is None:
            rows.append(_missing_row("QAT Layer+KD", scheme, NOT_RUN))
        elif not len(hit):
            why = f"no finalized configuration uses exactly {pair[0]}/{pair[1]}"
            rows.append(_missing_row("QAT Layer+KD", scheme, why))
        else:
            rows.append(_model_row("QAT Layer+KD", scheme, hit.sort_values("acc", ascending=False).iloc[0]))
    if searched is not None and len(searched):
        for used, group in sorted(searched.groupby(searched["bits_used"].map(_used)), key=lambda g: -max(g[0])):
            if used in seen:
                continue
            best = group.sort_values("acc", ascending=False).iloc[0]
            rows.append(_model_row("QAT Layer+KD", best["label"], best))
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _teachers_line(run_dir: Path, spec: dict[str, Any]) -> str:
    order = [t if isinstance(t, str) else t.get("arch") for t in ((spec.get("teachers") or {}).get("models") or [])]
    found = {p.stem: read_json(p) for p in sorted((run_dir / "teachers").glob("*.json"))}
    archs = order or sorted(found)
    parts = [f"{a} ({_pct(found[a].get('test_acc'))}%)" if a in found and found[a] else f"{a} ({NOT_RUN})"
             for a in archs]
    return ", ".join(parts) if parts else NOT_RUN


def _efficiency(table: pd.DataFrame, final: pd.DataFrame | None, student: dict[str, Any],
                budgets: list[float]) -> list[str]:
    fp32 = student.get("fp32_mb")
    if not fp32:
        return [f"* Original size (FP32): {NOT_RUN}"]
    lines = [f"* **Original size (FP32):** {fp32:.4f} MB ({student['params']:,} parameters x 4 bytes)"]
    scratch = table.loc[table["Configuration"] == "Baseline (Scratch)", "Accuracy (%)"].iloc[0]
    if final is None or not len(final):
        return lines + [f"* Compressed size: {NOT_RUN} (finalize)"]
    mixed = table[(table["Bit-width scheme"] == "Mixed 8/4-bit") & (table["Size (MB)"] != "-")]
    pick = final[final["file"] == mixed["Model"].iloc[0].removeprefix("final/")].iloc[0] if len(mixed) else \
        final.sort_values(["acc", "size_mb"], ascending=[False, True]).iloc[0]
    vs = ""
    if scratch not in ("-", NOT_RUN):
        d = float(pick["acc"]) - float(scratch)
        vs = f", {abs(d):.2f} points {'above' if d >= 0 else 'below'} the scratch FP32 model"
    lines += [f"* **Compressed size ({pick['label']}, `{pick['id']}`):** {pick['size_mb']:.4f} MB "
              f"({int(pick['file_bytes']):,} bytes on disk), {_pct(pick['acc'])}% accuracy",
              f"* **Reduction:** {fp32 / pick['size_mb']:.1f}x smaller{vs}"]
    for b in budgets:
        fits = final[final["size_mb"] <= b]
        if len(fits):
            best = fits.sort_values(["acc", "size_mb"], ascending=[False, True]).iloc[0]
            lines.append(f"* Best finalized model within {b:g} MB: `{best['id']}` ({best['label']}), "
                         f"{_pct(best['acc'])}% at {best['size_mb']:.4f} MB, {fp32 / best['size_mb']:.1f}x smaller")
        else:
            lines.append(f"* Best finalized model within {b:g} MB: none")
    return lines


def _search_section(run_dir: Path) -> list[str]:
    summary = read_json(run_dir / "search" / "summary.json")
    if not summary:
        return [NOT_RUN]
    c = summary.get("counts", {})
    out = [f"{summary.get('launched', 0)} trials launched ({', '.join(f'{v} {k}' for k, v in c.items() if v)}); "
           f"budget {summary.get('budget_mb')} MB; hypervolume {summary.get('hypervolume', 0):.4g} "
           f"(reference {summary.get('reference_point')}); front of {summary.get('front', 0)}; "
           f"best accuracy {_pct(summary.get('best_acc'))}%; updated {summary.get('updated', '?')}.", ""]
    if (run_dir / "search" / "pareto.png").is_file():
        out += ["![Pareto front: accuracy vs size](search/pareto.png)", ""]
    pf = run_dir / "search" / "pareto.parquet"
    if pf.is_file():
        front = pd.read_parquet(pf)
        if len(front):
            bit_cols = [col for col in front.columns if col.startswith("bits.")]
            front = front.assign(bits=front[bit_cols].astype(str).agg("/".join, axis=1))
            cols = ["number", "acc", "size_mb", "avg_bits", "epochs", "bits"]
            out += [f"Pareto front (search accuracy after {int(front['epochs'].max())} QAT epochs; bits in layer "
                    f"order {'/'.join(c.removeprefix('bits.') for c in bit_cols)}):", "",
                    markdown_table(front[cols], {"acc": ".2f", "size_mb": ".4f", "avg_bits": ".2f"})]
    return out


def _sensitivity_section(run_dir: Path) -> list[str]:
    sdir = run_dir / "sensitivity"
    priors = read_json(sdir / "priors.json")
    if not priors and not (sdir / "sensitivity.png").is_file():
        return [NOT_RUN]
    out = []
    if (sdir / "sensitivity.png").is_file():
        out += ["![Layer sensitivity per bit-width](sensitivity/sensitivity.png)", ""]
    if priors:
        starts = [w for w in priors.get("warm_starts", []) if w.get("multiple") == 1.0]
        excluded = sum(len(v) for v in (priors.get("excluded") or {}).values())
        out.append(f"Metric {priors.get('metric')}; {excluded} (layer, bits) choices excluded; pinned "
                   f"{priors.get('pinned')}.")
        for w in starts:
            what = f"{w['total_mb']:.4f} MB" if w.get("feasible") else f"infeasible ({w.get('reason')})"
            out.append(f"* Solver start for {w['base_budget_mb']:g} MB: {what}")
    return out


def _finalized_section(final: pd.DataFrame | None) -> list[str]:
    if final is None:
        return [NOT_RUN]
    cols = ["id", "label", "roles", "start", "kd", "acc", "export_acc", "size_mb", "file_bytes", "avg_bits",
            "compression", "search_acc"]
    bad = final[~final["export_ok"].astype(bool)]
    note = ("All exports verified: reloaded from the packed file, the test accuracy equals the trained model's."
            if not len(bad) else f"**Export check failed for {', '.join(bad['id'])}**: the reloaded file does not "
            "reproduce the trained model's accuracy.")
    return [markdown_table(final[cols], {"acc": ".2f", "export_acc": ".2f", "size_mb": ".4f", "avg_bits": ".2f",
                                         "compression": ".1f", "search_acc": ".2f"}), "", note]


def render_report(run_dir: str | Path) -> str:
    """The report's markdown text (see the module doc)."""
    from . import __version__

    p = check_run_dir(run_dir)
    spec = run_spec(p)
    student = _float_student(p)
    meta = student.get("meta", {})
    data, quant = spec.get("data") or {}, spec.get("quant") or {}
    final = _final(p)
    table = seed_table(p, spec, student)
    budgets = [float(b) for b in (spec.get("search") or {}).get("budgets_mb") or []]
    kd = read_json(p / "students" / "kd.json")
    distill = spec.get("distill") or {}
    qat_epochs = (quant.get("qat") or {}).get("epochs", "?")
    student_epochs = ((spec.get("student") or {}).get("train") or {}).get("epochs", "?")
    stages = pd.DataFrame([r for r in stage_rows(p) if r[0] != "report"], columns=["stage", "state", "detail"])
    out = [
        f"# kdsearch report: {spec.get('name', p.name)}", "",
        f"* **Data:** {data.get('dataset', '?')} (version `{meta.get('data_version', NOT_RUN)}`)",
        f"* **Student:** {student.get('arch') or (spec.get('student') or {}).get('arch', '?')}; "
        f"**teacher ensemble:** {_teachers_line(p, spec)}",
        f"* **Distillation:** {kd.get('strategy', distill.get('strategy', '?'))} ensemble, "
        f"T={distill.get('temperature')}, alpha={distill.get('alpha')}; epochs: FP32 students {student_epochs}, "
        f"finalize QAT {qat_epochs}; activations {quant.get('act_bits')}-bit",
        f"* **Provenance:** kdsearch {meta.get('kdsearch_version', __version__)}, "
        f"git {meta.get('git_commit') or '?'}, torch {meta.get('torch', '?')}; "
        f"report written {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
        "## Results", "", markdown_table(table), "",
        "Accuracy: top-1 on the test split (%). Size: the size model (MB = 10^6 bytes; packed weights, per-channel "
        "scales, folded BatchNorm); File: the exported `.kdq` on disk (size model + safetensors header and "
        "metadata). QAT rows start from the scratch (QAT Scratch) or KD (QAT KD, Layer+KD) float student; "
        "KD rows distil during QAT.", "",
        "## Efficiency analysis", "", *_efficiency(table, final, student, budgets), "",
        "## All finalized models", "", *_finalized_section(final), "",
        "## Search", "", *_search_section(p), "",
        "## Layer sensitivity", "", *_sensitivity_section(p), "",
        "## Stages", "",
        markdown_table(stages), "",
    ]
    return "\n".join(out)


def write_report(run_dir: str | Path) -> Path:
    """Write runs/<name>/report.md (atomically) from the run's files; return its path."""
    p = check_run_dir(run_dir)
    out = p / "report.md"
    atomic_write_text(out, render_report(p))
    log.info("report: %s", out)
    return out


def report_stage(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Pipeline stage: (re)write report.md; cheap, so it runs whenever its inputs changed."""
    return {"report": str(write_report(ctx.run_dir))}
