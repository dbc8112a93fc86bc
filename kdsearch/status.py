"""`kdsearch status RUN_DIR`: which stages are done, how far the search is, and its current front.

Everything comes from the run directory's files (manifest.json, spec.yaml, search/, final/), so it works
from another shell while a run is going, and on a copied run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .rundir import RunDir, RunDirError, read_json, unreadable  # noqa: F401  (re-exported for the CLI and tests)
from .tables import FRONT_FORMAT, markdown_table, render_table  # noqa: F401  (report.py imports markdown_table here)

# The pipeline's stages in order. Not read from `kdsearch.pipeline.STAGES`: importing the pipeline imports torch,
# and `kdsearch status` must answer at once; tests/test_cli.py keeps the two equal.
STAGE_ORDER = ("teachers", "baselines", "sensitivity", "search", "finalize", "report")


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory as a Path, or a `RunDirError` saying what is wrong and what to give instead."""
    return RunDir(run_dir).check().root


def run_spec(run_dir: Path) -> dict[str, Any]:
    """The run's frozen spec as a plain dict (see `RunDir.spec_dict`)."""
    return RunDir(run_dir).spec_dict()


def stage_names() -> list[str]:
    """The pipeline's stages in order."""
    return list(STAGE_ORDER)


def stage_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    """(stage, state, detail) per stage: done (with finish time and duration), running (with the estimate of its
    running models), in progress, or not run yet."""
    from .progress import eta_text, stage_eta

    done = read_json(run_dir / "manifest.json").get("stages", {})
    names = stage_names() + [n for n in done if n not in stage_names()]
    started = {"search": run_dir / "search" / "results.parquet", "finalize": run_dir / "final" / "progress.json",
               "report": run_dir / "report.md"}
    rows = []
    for name in names:
        eta = None if name in done else stage_eta(run_dir, name)
        if name in done:
            d = done[name]
            secs = d.get("seconds")
            rows.append((name, "done", f"{d.get('finished', '?')}" + (f" ({fmt_seconds(secs)})" if secs else "")))
        elif eta is not None:  # its models' own estimates (kdsearch.eta)
            rows.append((name, "running", eta_text(eta)))
        elif name in started and started[name].exists():
            rows.append((name, "started", f"{started[name].relative_to(run_dir)} exists, not recorded as done"))
        else:
            rows.append((name, "not run yet", ""))
    return rows


def fmt_seconds(s: float) -> str:
    s = float(s)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def running_trials(run_dir: Path, epochs: int | None) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "search" / "results.parquet")
    run = df[df["status"] == "running"].copy()
    bit_cols = [c for c in run.columns if c.startswith("bits.")]
    run["bits"] = run[bit_cols].astype(str).agg("/".join, axis=1) if len(run) else pd.Series(dtype=str)
    run["epoch"] = run["epochs"].astype(str) + f"/{epochs if epochs else '?'}"
    return run[["number", "trial_id", "epoch", "val_acc", "size_mb", "wall_s", "bits"]].reset_index(drop=True)


def run_status(run_dir: str | Path, *, front_rows: int = 10, rich: bool = False) -> str:
    """The multi-line status text of a run (raises `RunDirError` for a path that is not a run directory).

    Tables are markdown, or drawn by rich when `rich` (a terminal; see `kdsearch.tables`).
    """
    from .progress import finalize_line

    p = check_run_dir(run_dir)
    spec = run_spec(p)
    data, search = spec.get("data") or {}, spec.get("search") or {}
    student = (spec.get("student") or {}).get("arch", "?")
    out = [f"run {p} (spec {spec.get('name', '?')}: {data.get('dataset', '?')} data, student {student}, "
           f"budgets {search.get('budgets_mb', '?')} MB"
           + (f", {search['budgets_gbops']} GBOPs" if search.get("budgets_gbops") else "") + ")", "", "stages:"]
    width = max(len(n) for n, _, _ in stage_rows(p))
    for name, state, detail in stage_rows(p):
        out.append(f"  {name:<{width}}  {state:<11} {detail}".rstrip())
    out.append("")
    # A file torn by a copy or an edit is a user-facing error, not a traceback (pyarrow's ArrowInvalid is a ValueError).
    try:
        out += _search_lines(p, search, front_rows, rich)
    except (OSError, ValueError) as err:
        raise unreadable(p / "search", err) from None
    try:
        fin = finalize_line(p)
    except (OSError, ValueError) as err:
        raise unreadable(p / "final" / "progress.json", err) from None
    if fin is not None:
        out += ["", fin]
    if (p / "report.md").is_file():
        out += ["", f"report: {p / 'report.md'}"]
    return "\n".join(out) + "\n"


def _search_lines(p: Path, search: dict[str, Any], front_rows: int, rich: bool) -> list[str]:
    """The search part of the status: the progress line, the running trials and the current front."""
    from .progress import format_search, search_progress
    from .search.results import pareto_table

    prog = search_progress(p, search.get("num_trials"), concurrency=search.get("max_concurrent"))
    if prog is None:
        return ["search: not started (no search/results.parquet yet)"]
    out = [format_search(prog)]
    running = running_trials(p, search.get("trial_epochs"))
    if len(running):
        out += ["", f"running trials ({len(running)}):", render_table(running, rich=rich)]
    front = pareto_table(p)
    more = f", the {front_rows} most accurate shown" if len(front) > front_rows else ""
    out += ["", f"current Pareto front ({len(front)} trials{more}):"]
    if len(front):
        shown = front.sort_values("val_acc", ascending=False).head(front_rows).sort_values("size_mb")
        out.append(render_table(shown.drop(columns=["trial_id"]), FRONT_FORMAT, rich=rich))
    else:
        out.append("(no completed trial yet)")
    return out
