"""report.md: the seed's results tables for a run, rebuilt from the run directory's files alone.

    write_report(run_dir)      # runs/<name>/report.md; `kdsearch report RUN_DIR` and the report stage call this
    run_answer(run_dir)        # the terminal's version: what `kdsearch run` prints at its end

Sources: spec.yaml/manifest.json, teachers/*.json, students/*.json (+ the student file's provenance),
final/final.parquet, search/summary.json + pareto.parquet, sensitivity/priors.json. The plots are linked
where their stages wrote them (search/pareto.png, sensitivity/sensitivity.png), relative to report.md.
Anything a stage has not produced yet reads "not run yet", so the report works on a partial run.

The seed's table (Baseline FP32, KD FP32, QAT Scratch/KD 16 and 8 bit, QAT Layer+KD Mixed 16/8 and 8/4)
maps onto the run as: FP32 rows = students/scratch.pt and kd.pt; uniform rows = finalize's qat_scratch_16,
qat_kd_16, qat_scratch_8, qat_kd_8; a "Mixed a/b" row = the most accurate finalized searched configuration
whose widths are exactly {a, b}. Finalized configurations with other width sets get rows of their own,
labelled by the widths they use (e.g. "Mixed 8/4/2-bit"). Two baselines every compressed model is judged
against get rows too: PTQ 8-bit (``ptq_kd_8``: the KD student quantized and calibrated, no training) and, per
budget, the allocation-only model (the sensitivity solver's configuration with the same QAT+KD, no search);
the efficiency section states the paired differences to them in words.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .io import atomic_write_text
from .report_sections import finalized_section, search_section, sensitivity_section
from .report_text import NOT_RUN, by_seed, difference_line, fmt_ms, mean_std, pct
from .row_costs import fmt_gbops, gbops_of_bits, with_gbops
from .rundir import RunDir, read_json
from .selection import Budget, best_first, export_default, model_means, spec_budgets, within
from .status import check_run_dir, markdown_table, run_spec, stage_rows

log = logging.getLogger("kdsearch.report")

UNIFORM_ROWS = (("QAT Scratch", "16-bit", "qat_scratch_16"), ("QAT KD", "16-bit", "qat_kd_16"),
                ("QAT Scratch", "8-bit", "qat_scratch_8"), ("QAT KD", "8-bit", "qat_kd_8"))
PTQ_ROW = ("PTQ (KD student, no training)", "8-bit", "ptq_kd_8")
ALLOCATION = "allocation only"  # the role finalize gives the solver's configuration per budget
MIXED_ROWS = ((16, 8), (8, 4))
ROW_COLUMNS = ["Configuration", "Bit-width scheme", "Test acc. (%)", "n", "Val acc. (%)", "Size (MB)", "GBOPs",
               "File (bytes)", "Avg bits", "Teachers", "Model"]


def _float_student(run_dir: Path) -> dict[str, Any]:
    """arch, num_classes, FP32 size (size model) and provenance of the float student; {} without one."""
    from .checkpoints import CheckpointError, read_model_file

    rd = RunDir(run_dir)
    for seed in rd.seeds():
        for kind in ("kd", "scratch"):
            p = rd.student(kind, seed)
            if not p.is_file():
                continue
            try:
                obj = read_model_file(p)
            except CheckpointError:
                continue
            from .models import create_model
            from .quant import model_size

            size = model_size(create_model(obj["arch"], num_classes=obj["num_classes"], **(obj.get("kwargs") or {})))
            return {"arch": obj["arch"], "num_classes": obj["num_classes"], "fp32_mb": size.total_mb,
                    "params": size.num_params, "meta": obj.get("meta", {})}
    return {}


def students(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The metrics of every seed's `kind` student (students/s<seed>/<kind>.json) that exists."""
    rd = RunDir(run_dir)
    return [m for s in rd.seeds() if (m := read_json(rd.student(kind, s).with_suffix(".json")))]


def _final(run_dir: Path) -> pd.DataFrame | None:
    p = RunDir(run_dir).final_table
    return pd.read_parquet(p) if p.is_file() else None


def final_with_costs(run_dir: Path, spec: dict[str, Any], student: dict[str, Any]) -> pd.DataFrame | None:
    """final.parquet with its ``gbops`` column (computed from the bits where finalize did not record it)."""
    return with_gbops(_final(run_dir), gbops_of_bits(run_dir, spec, student))


def budgets_of(spec: dict[str, Any]) -> list[Budget]:
    """The run's size and BOPs budgets (`kdsearch.selection.Budget`), from its spec dict."""
    search = spec.get("search") or {}
    return spec_budgets([float(b) for b in search.get("budgets_mb") or []],
                        [float(b) for b in search.get("budgets_gbops") or []])


def export_pick(final: pd.DataFrame | None, spec: dict[str, Any]) -> pd.Series | None:
    """The model `kdsearch export` ships by default (`selection.export_default` under the spec's budgets)."""
    if final is None:
        return None
    search = spec.get("search") or {}
    return export_default(final, [float(b) for b in search.get("budgets_mb") or []],
                          [float(b) for b in search.get("budgets_gbops") or []])


def shipped_model(run_dir: Path) -> pd.Series | None:
    """`export_pick` for a run directory (final.parquet with its costs)."""
    spec = run_spec(run_dir)
    return export_pick(final_with_costs(run_dir, spec, _float_student(run_dir)), spec)


def _used(s: Any) -> frozenset[int]:
    return frozenset(int(b) for b in str(s).split("/") if b)


def _source(v: Any) -> str:
    return {"cache": "logit cache", "live": "live (Ray actors)"}.get(str(v), "-") if v is not None and v == v else "-"


def _model_row(conf: str, scheme: str, r: pd.Series, final: pd.DataFrame) -> list[Any]:
    seeds = final[final["id"] == r["id"]]
    return [conf, scheme, fmt_ms(seeds["test_acc"]), len(seeds), fmt_ms(seeds["val_acc"]), f"{r['size_mb']:.4f}",
            fmt_gbops(r.get("gbops")), f"{int(r['file_bytes']):,}", f"{r['avg_bits']:.2f}", _source(r.get("source")),
            f"final/{r['id']}.s*.kdq"]


def _missing_row(conf: str, scheme: str, why: str) -> list[Any]:
    return [conf, scheme, why, 0, "-", "-", "-", "-", "-", "-", "-"]


def seed_table(run_dir: Path, spec: dict[str, Any], student: dict[str, Any]) -> pd.DataFrame:
    """The seed's eight rows (plus one per other finalized width set): test accuracy as mean ± std over the seeds
    (with n), the validation accuracy that chose it, sizes, the teacher source, or why a row is missing."""
    rows: list[list[Any]] = []
    fp32, gbops = student.get("fp32_mb"), gbops_of_bits(run_dir, spec, student)
    for conf, kind in (("Baseline (Scratch)", "scratch"), ("KD (FP32)", "kd")):
        ms = students(run_dir, kind)
        if ms and ms[0].get("kind") == "given":  # student.checkpoint: the user's model, measured, not trained
            conf = "Baseline (given)"
        if ms:
            rows.append([conf, "FP32", fmt_ms([m.get("test_acc") for m in ms]), len(ms),
                         fmt_ms([m.get("val_acc") for m in ms]), f"{fp32:.4f}" if fp32 else "-",
                         fmt_gbops(gbops(None)), "-", "32.00", _source(ms[0].get("source")), f"students/s*/{kind}.pt"])
        else:
            rows.append(_missing_row(conf, "FP32", NOT_RUN))
    final = final_with_costs(run_dir, spec, student)
    models = model_means(final) if final is not None else None
    uniform_bits = [int(b) for b in (spec.get("finalize") or {}).get("uniform_bits", (16, 8))]
    for conf, scheme, fid in UNIFORM_ROWS:
        hit = models[models["id"] == fid] if models is not None and len(models) else None
        if hit is not None and len(hit):
            rows.append(_model_row(conf, scheme, hit.iloc[0], final))
        elif fid.startswith("qat_") and int(scheme.split("-")[0]) not in uniform_bits:
            continue  # a width the spec's finalize.uniform_bits leaves out: no row, not a missing one
        else:
            rows.append(_missing_row(conf, scheme, NOT_RUN))
    quant = spec.get("quant") or {}
    choices = set(quant.get("bits") or []) | set((quant.get("pin") or {}).values())
    searched = models[models["kind"] == "searched"] if models is not None and len(models) else None
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
            rows.append(_model_row("QAT Layer+KD", scheme, best_first(hit).iloc[0], final))
    if searched is not None and len(searched):
        for used, group in sorted(searched.groupby(searched["bits_used"].map(_used)), key=lambda g: -max(g[0])):
            if used in seen:
                continue
            best = best_first(group).iloc[0]
            rows.append(_model_row("QAT Layer+KD", best["label"], best, final))
    rows += _baseline_rows(spec, models, final)
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _baseline_rows(spec: dict[str, Any], models: pd.DataFrame | None, final: pd.DataFrame | None) -> list[list[Any]]:
    """PTQ 8-bit, and per budget the allocation-only model: the rows a compressed model is judged against."""
    rows: list[list[Any]] = []
    conf, scheme, fid = PTQ_ROW
    hit = models[models["id"] == fid] if models is not None and len(models) else None
    rows.append(_model_row(conf, scheme, hit.iloc[0], final) if hit is not None and len(hit)
                else _missing_row(conf, scheme, NOT_RUN))
    for budget in budgets_of(spec):
        alloc = _allocation(models, budget)
        conf = f"Allocation only <= {budget} (solver)+KD"
        rows.append(_model_row(conf, alloc["label"], alloc, final) if alloc is not None
                    else _missing_row(conf, "-", NOT_RUN))
    return rows


def _allocation(models: pd.DataFrame | None, budget: Budget) -> pd.Series | None:
    """The finalized model that carries the allocation-only role for ``budget`` (None if there is none)."""
    if models is None or not len(models):
        return None
    hit = models[models["roles"].astype(str).str.contains(f"{ALLOCATION} <= {budget}", regex=False)]
    return hit.iloc[0] if len(hit) else None


def _given_note(spec: dict[str, Any]) -> str:
    """Says that the float student was given (student.checkpoint), not trained by this run."""
    given = (spec.get("student") or {}).get("checkpoint")
    return (f" (given as `{given}`, not trained: the FP32 row is that model measured on this run's splits; KD, QAT "
            "and the search start from it)") if given else ""


def _teachers_line(run_dir: Path, spec: dict[str, Any]) -> str:
    order = [t if isinstance(t, str) else t.get("arch") for t in ((spec.get("teachers") or {}).get("models") or [])]
    found = {p.stem: read_json(p) for p in sorted(RunDir(run_dir).teachers_dir.glob("*.json"))}
    found |= {a: found.get(RunDir(run_dir).teacher(a).stem) for a in order}  # an import path's file name
    archs = order or sorted(found)
    parts = [f"{a} (test {pct(found[a].get('test_acc'))}%, val {pct(found[a].get('val_acc'))}%)"
             if a in found and found[a] else f"{a} ({NOT_RUN})" for a in archs]
    return ", ".join(parts) if parts else NOT_RUN


def _efficiency(final: pd.DataFrame | None, run_dir: Path, student: dict[str, Any],
                budgets: list[Budget]) -> list[str]:
    fp32 = student.get("fp32_mb")
    if not fp32:
        return [f"* Original size (FP32): {NOT_RUN}"]
    lines = [f"* **Original size (FP32):** {fp32:.4f} MB ({student['params']:,} parameters x 4 bytes)"]
    scratch, kd = students(run_dir, "scratch"), students(run_dir, "kd")
    lines.append(difference_line("KD (FP32) - scratch (FP32), test accuracy", by_seed(kd), by_seed(scratch)))
    models = model_means(final) if final is not None else None
    if models is None or not len(models):
        return lines + [f"* Compressed size: {NOT_RUN} (finalize)"]
    searched = models[models["kind"] == "searched"]
    mixed = searched[searched["bits_used"].map(_used) == frozenset((8, 4))]
    pick = best_first(mixed).iloc[0] if len(mixed) else best_first(models).iloc[0]
    sm = mean_std([m.get("test_acc") for m in scratch])[0]
    vs = ""
    if sm == sm:
        d = float(pick["test_acc"]) - sm
        vs = f", {abs(d):.2f} points {'above' if d >= 0 else 'below'} the scratch FP32 model (means)"
    lines += [f"* **Compressed size ({pick['label']}, `{pick['id']}`):** {pick['size_mb']:.4f} MB "
              f"({int(pick['file_bytes']):,} bytes on disk), {fmt_ms(final[final['id'] == pick['id']]['test_acc'])}% "
              f"test accuracy (n={int(pick['n'])})",
              f"* **Reduction:** {fp32 / pick['size_mb']:.1f}x smaller{vs}"]
    pick_rows = final[final["id"] == pick["id"]]
    lines.append(difference_line(f"`{pick['id']}` - KD (FP32), test accuracy", by_seed(pick_rows), by_seed(kd)))
    lines += _baseline_lines(final, models, kd, budgets)
    for b in budgets:
        fits = within(models, [b])
        if len(fits):
            best = best_first(fits).iloc[0]
            lines.append(f"* Best finalized model within {b} (chosen on validation): `{best['id']}` "
                         f"({best['label']}), test {fmt_ms(final[final['id'] == best['id']]['test_acc'])}% at "
                         f"{best['size_mb']:.4f} MB, {fp32 / best['size_mb']:.1f}x smaller, "
                         f"{fmt_gbops(best.get('gbops'))} GBOPs")
        else:
            lines.append(f"* Best finalized model within {b}: none")
    return lines


def _baseline_lines(final: pd.DataFrame, models: pd.DataFrame, kd: list[dict[str, Any]],
                    budgets: list[Budget]) -> list[str]:
    """What QAT added over post-training quantization, and what the search added over the one-shot allocation.

    Paired over seeds (same float student, same views), test accuracy, each with its verdict against the spread.
    The searched model per budget is the one finalize's "best <= budget" role names (chosen on validation).
    """
    def seeds_of(mid: str) -> dict[int, float]:
        return by_seed(final[final["id"] == mid])

    ids = set(models["id"])
    lines: list[str] = []
    if {"qat_kd_8", "ptq_kd_8"} <= ids:
        lines.append(difference_line("What QAT added: QAT KD 8-bit - PTQ 8-bit (no training), test accuracy",
                                     seeds_of("qat_kd_8"), seeds_of("ptq_kd_8")))
        lines.append(difference_line("QAT KD 8-bit - KD (FP32), test accuracy", seeds_of("qat_kd_8"), by_seed(kd)))
    for b in budgets:
        alloc = _allocation(models, b)
        best = models[models["roles"].astype(str).str.contains(f"best <= {b}", regex=False)]
        if alloc is None or not len(best):
            continue
        pick = best.iloc[0]
        if pick["id"] == alloc["id"]:
            lines.append(f"* What the search added within {b}: nothing measurable; its best configuration is "
                         f"the sensitivity solver's own (`{pick['id']}`), so the difference is 0 by construction")
            continue
        lines.append(difference_line(f"What the search added within {b}: searched `{pick['id']}` "
                                     f"({pick['label']}, {pick['size_mb']:.4f} MB) - allocation only "
                                     f"`{alloc['id']}` ({alloc['label']}, {alloc['size_mb']:.4f} MB), test accuracy",
                                     seeds_of(pick["id"]), seeds_of(alloc["id"])))
    return lines


def _add_latency(run_dir: Path, table: pd.DataFrame) -> list[str]:
    """With `kdsearch bench`'s bench.json: an ORT latency column (median ms, batch 1, one thread; mean over the
    seeds benched) on ``table``, in place, and the speed-up line; without it, nothing."""
    bench = RunDir(run_dir).bench_file
    if not bench.is_file():
        return []
    b = read_json(bench)
    fp32 = [r["median_ms"] for r in b["fp32"]]
    by_id: dict[str, list[float]] = {}
    for r in b["models"]:
        by_id.setdefault(r["id"], []).append(r["median_ms"])
    ms = {f"final/{k}.s*.kdq": sum(v) / len(v) for k, v in by_id.items()} | {"students/s*/kd.pt": sum(fp32) / len(fp32)}
    table["ORT ms"] = [f"{ms[m]:.3f}" if m in ms else "-" for m in table["Model"]]
    best = min(b["models"], key=lambda r: r["median_ms"])
    m = b["machine"]
    return [f"ORT ms: median latency in ONNX Runtime {b['onnxruntime']} (CPU provider, batch 1, "
            f"{b['intra_op_num_threads']} thread, {b['runs']} runs; {m['model']}, {'VNNI' if m['vnni'] else 'no VNNI'}); "
            f"the FP32 row is the KD student's own float ONNX. **Speed-up (fastest finalized model):** "
            f"`{best['id']}` (seed {best['seed']}) "
            f"{best['median_ms']:.3f} ms vs FP32 {best['fp32_alongside']['median_ms']:.3f} ms (timed alongside) = "
            f"{best['speedup_vs_fp32']:.2f}x; "
            f"top-1 agreement of its integer ONNX with the `.kdq` on test: {best['agreement']:.2f}% (`bench.json`).", ""]


def results_table(run_dir: Path, spec: dict[str, Any], student: dict[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    """The results table (`seed_table`) with its latency column and line where `kdsearch bench` has run: what
    report.md and report.html both show."""
    table = seed_table(run_dir, spec, student)
    return table, _add_latency(run_dir, table)


def render_report(run_dir: str | Path) -> str:
    """The report's markdown text (see the module doc)."""
    from . import __version__

    p = check_run_dir(run_dir)
    spec = run_spec(p)
    student = _float_student(p)
    meta = student.get("meta", {})
    data, quant = spec.get("data") or {}, spec.get("quant") or {}
    final = final_with_costs(p, spec, student)
    table, latency = results_table(p, spec, student)
    budgets = budgets_of(spec)
    kd = (students(p, "kd") or [{}])[0]
    seeds = RunDir(p).seeds()
    distill = spec.get("distill") or {}
    qat_epochs = (quant.get("qat") or {}).get("epochs", "?")
    student_epochs = ((spec.get("student") or {}).get("train") or {}).get("epochs", "?")
    stages = pd.DataFrame([r for r in stage_rows(p) if r[0] != "report"], columns=["stage", "state", "detail"])
    out = [
        f"# kdsearch report: {spec.get('name', p.name)}", "",
        f"* **Data:** {data.get('dataset', '?')} (version `{meta.get('data_version', NOT_RUN)}`)",
        f"* **Student:** {student.get('arch') or (spec.get('student') or {}).get('arch', '?')}"
        f"{_given_note(spec)}; "
        f"**teacher ensemble:** {_teachers_line(p, spec)}",
        f"* **Distillation:** {kd.get('strategy', distill.get('strategy', '?'))} ensemble, "
        f"T={distill.get('temperature')}, alpha={distill.get('alpha')}; epochs: FP32 students {student_epochs}, "
        f"finalize QAT {qat_epochs}; activations {quant.get('act_bits')}-bit",
        f"* **Search sampler:** {(spec.get('search') or {}).get('sampler', '?')} "
        f"{(spec.get('search') or {}).get('sampler_kwargs') or ''}".rstrip(),
        f"* **Provenance:** kdsearch {meta.get('kdsearch_version', __version__)}, "
        f"git {meta.get('git_commit') or '?'}, torch {meta.get('torch', '?')}; "
        f"report written {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
        "## Results", "", "**Selected on validation, reported on test.** Every choice (the search, the front, "
        "finalize's picks, the rows below, the model `kdsearch export` ships) was made on the validation split "
        "held out of the training images; the test split was read once per listed model, after it was chosen.",
        "", markdown_table(table), "", *latency,
        f"Test acc.: top-1 on the test split (%), mean ± sample std over the n seeds {seeds}; for a finalized "
        "model, the accuracy of its exported, reloaded `.kdq` file. Val acc.: the validation accuracy that ranks "
        "it. Size: the size model (MB = 10^6 bytes; packed weights, per-channel scales, folded BatchNorm); File: "
        "the exported `.kdq` on disk (size model + safetensors header and metadata); GBOPs: 10^9 bit operations "
        "for one image (MACs x weight bits x activation bits, HAWQ-V3; FP32 32 x 32). QAT rows start from the "
        "same seed's scratch (QAT Scratch) or KD (QAT KD, Layer+KD) float student; KD rows distil during QAT. "
        "Teachers: where the KD rows' teacher logits came from (a cache covering every epoch they train, or "
        "live Ray actors); a KD row and its scratch row see the same augmented views, epoch by epoch.", "",
        "## Efficiency analysis", "", *_efficiency(final, p, student, budgets), "",
        "## All finalized models", "", *finalized_section(final), "",
        "## Search", "", *search_section(p), "",
        "## Layer sensitivity", "", *sensitivity_section(p), "",
        "## Stages", "",
        markdown_table(stages), "",
    ]
    return "\n".join(out)


def run_answer(run_dir: str | Path, *, rich: bool = False) -> str:
    """What `kdsearch run` prints at the end: the seed's results table, the size lines, and the paths to open.

    Built from the same functions as report.md, so the terminal and the report never disagree.
    """
    from .tables import render_table

    p = check_run_dir(run_dir)
    rd = RunDir(p)
    spec = run_spec(p)
    student = _float_student(p)
    final = final_with_costs(p, spec, student)
    pick = export_pick(final, spec)
    table = seed_table(p, spec, student).drop(columns=["Model"])
    budgets = budgets_of(spec)
    lines = [f"kdsearch: {spec.get('name', p.name)} (selected on validation, reported on test; test accuracy as "
             f"mean ± std over seeds {rd.seeds()})", "", render_table(table, rich=rich), ""]
    lines += [ln.replace("**", "").replace("`", "") for ln in _efficiency(final, p, student, budgets)]
    lines += ["", f"report:      {rd.report_file}"]
    if rd.report_html.is_file():
        lines.append(f"interactive: {rd.report_html}")
    if (rd.search_dir / "pareto.png").is_file():
        lines.append(f"front plot:  {rd.search_dir / 'pareto.png'}")
    if pick is not None and final is not None:
        rows = final[final["id"] == pick["id"]].sort_values(["val_acc", "seed"], ascending=[False, True])
        lines.append(f"to ship:     {rd.final_model(pick['id'], int(rows['seed'].iloc[0]))}  "
                     f"(`kdsearch export {p}` copies it; --onnx for ONNX)")
    if (rd.search_dir / "tune").is_dir():
        lines.append(f"curves:      tensorboard --logdir {p}")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write runs/<name>/report.md and report.html (atomically) from the run's files; return report.md's path."""
    p = check_run_dir(run_dir)
    out = p / "report.md"
    atomic_write_text(out, render_report(p))
    log.info("report: %s", out)
    from .report_html import write_report_html  # report.html beside it (skipped, with a log line, without plotly)

    write_report_html(p, *results_table(p, run_spec(p), _float_student(p)))
    return out
