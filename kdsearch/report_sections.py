"""The report's sections that read one stage's files each: search, sensitivity, finalized models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .report_text import NOT_RUN, pct
from .rundir import read_json
from .status import markdown_table
from .tables import FRONT_FORMAT


def search_section(run_dir: Path) -> list[str]:
    summary = read_json(run_dir / "search" / "summary.json")
    if not summary:
        return [NOT_RUN]
    c = summary.get("counts", {})
    out = [f"{summary.get('launched', 0)} trials launched ({', '.join(f'{v} {k}' for k, v in c.items() if v)}); "
           + "".join(f"budget {summary[k]} {unit}; " for k, unit in (("budget_mb", "MB"), ("budget_gbops", "GBOPs"))
                     if summary.get(k) is not None)
           + f"hypervolume of accuracy and {summary.get('cost', 'size_mb')} {summary.get('hypervolume', 0):.4g} "
           f"(reference {summary.get('reference_point')}); front of {summary.get('front', 0)}; "
           f"best validation accuracy {pct(summary.get('best_acc'))}%; updated {summary.get('updated', '?')}.", ""]
    if (run_dir / "search" / "pareto.png").is_file():
        out += ["![Pareto front: accuracy vs size and vs BOPs](search/pareto.png)", ""]
    pf = run_dir / "search" / "pareto.parquet"
    if pf.is_file():
        front = pd.read_parquet(pf)
        if len(front):
            bit_cols = [col for col in front.columns if col.startswith("bits.")]
            front = front.assign(bits=front[bit_cols].astype(str).agg("/".join, axis=1))
            cols = [c for c in ("number", "val_acc", "size_mb", "gbops", "avg_bits", "epochs", "bits") if c in front]
            out += [f"Pareto front (validation accuracy after {int(front['epochs'].max())} QAT epochs; bits in layer "
                    f"order {'/'.join(c.removeprefix('bits.') for c in bit_cols)}):", "",
                    markdown_table(front[cols], FRONT_FORMAT)]
    return out


def sensitivity_section(run_dir: Path) -> list[str]:
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
        for w in (w for w in priors.get("warm_starts_bops", []) if w.get("multiple") == 1.0):
            what = f"{w['gbops']:.4g} GBOPs" if w.get("feasible") else f"infeasible ({w.get('reason')})"
            out.append(f"* Solver start for {w['base_budget_gbops']:g} GBOPs: {what}")
        out += float_lines(priors.get("float"))
    return out


def float_lines(parts: list[dict[str, Any]] | None) -> list[str]:
    """What stays in float and why (the sensitivity stage's `float_parts`), one line per reason."""
    if not parts:
        return []
    by_why: dict[str, list[dict[str, Any]]] = {}
    for p in parts:
        by_why.setdefault(p["why"], []).append(p)
    lines = ["", "Stays in float (fp32 in the exported file), and why:"]
    for why, ps in by_why.items():
        names = ", ".join(p["name"] for p in ps[:6]) + (f" and {len(ps) - 6} more" if len(ps) > 6 else "")
        lines.append(f"* {why}: {len(ps)} ({sum(p['params'] for p in ps):,} parameters): {names}")
    return lines


def finalized_section(final: pd.DataFrame | None) -> list[str]:
    if final is None:
        return [NOT_RUN]
    cols = ["id", "seed", "label", "roles", "start", "kd", "source", "val_acc", "export_val_acc", "test_acc",
            "size_mb", "file_bytes", "avg_bits", "compression", "search_acc", "node"]
    bad = final[~final["export_ok"].astype(bool)]
    note = ("All exports verified: reloaded from the packed file, each reproduces the trained model's validation "
            "accuracy; the test accuracy is the reloaded file's." if not len(bad) else
            f"**Export check failed for {', '.join(bad['id'] + ' s' + bad['seed'].astype(str))}**: the reloaded "
            "file does not reproduce the trained model's validation accuracy.")
    return [markdown_table(final[[c for c in cols if c in final.columns]],
                           {"val_acc": ".2f", "export_val_acc": ".2f", "test_acc": ".2f", "size_mb": ".4f",
                            "avg_bits": ".2f", "compression": ".1f", "search_acc": ".2f"}), "", note]
