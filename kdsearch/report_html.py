"""report.html: the run's report as one self-contained interactive page, beside report.md.

    write_report_html(run_dir, table)   # runs/<name>/report.html; `kdsearch.report.write_report` calls it

Why these figures: they are Optuna's own plots (`plot_pareto_front`, `plot_param_importances`,
`plot_optimization_history`) drawn over the search's Optuna study, plus a plotly heat map of the sensitivity
table and the seed's results table of report.md (`table`: kdsearch.report builds it and hands it over, so
that the two modules do not import each other). Using Optuna's plots means the page shows what Optuna itself
computes (its Pareto front, its PED-ANOVA importances) instead of a second, hand-drawn reading of the study.

Where the study comes from: the search keeps it in an Optuna journal (search/optuna-journal.log); a run
without one (older runs, or a run whose search has not written it) gets a study rebuilt from
search/results.parquet. Either way the page plots a *view* of it (`view_study`): one trial per search
sample, same numbers, where only trained-to-the-end samples are COMPLETE. The search's own study also tells
Optuna about over-budget samples (accuracy 0) and duplicates as COMPLETE; plotted as is, they would squash
the front onto the x-axis and count twice in the importances.

Why plotly.js is embedded (once, in <head>): the page must open offline, from CI artifacts or a laptop,
and with no CDN reachable. Each part whose input a stage has not written yet reads "not run yet".
"""

from __future__ import annotations

import html
import importlib.util
import logging
import math
import numbers
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .io import atomic_write_text
from .pareto import ACC, BOPS, COST_UNITS, SIZE
from .report_text import NOT_RUN
from .rundir import RunDir

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

log = logging.getLogger("kdsearch.report")

JOURNAL = "optuna-journal.log"  # search/<this>: where the search keeps its Optuna study
OLD_ACC = "acc"  # what runs searched before validation accuracy got its own name call it
VALUE_NAMES = ["size (MB)", "validation accuracy (%)"]  # the Pareto plot's axes: x = size, y = accuracy
COST_AXIS = {SIZE: "size (MB)", BOPS: "BOPs (GBOPs)"}  # x of the plot against each cost
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.note{color:#555;font-size:.92em}.missing{color:#a33;font-style:italic}
table.results{border-collapse:collapse;font-size:.9em}table.results th,table.results td{border:1px solid #ccc;
padding:.3em .6em;text-align:right}table.results th,table.results td:nth-child(-n+2),
table.results td:last-child{text-align:left}
table.results tr:nth-child(even){background:#f6f6f6}"""


def have_plotly() -> bool:
    """Whether plotly is importable (a dependency, but an install without it must still get report.md)."""
    return importlib.util.find_spec("plotly") is not None


# -- the study -------------------------------------------------------------------------------------------

def _journal_samples(path: Path) -> list[dict[str, Any]]:
    """One sample per trial of the (only) study in an Optuna journal file, as the search recorded it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    names = optuna.study.get_all_study_names(storage)
    if not names:
        return []
    study = optuna.load_study(study_name=names[0], storage=storage)
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        status = a.get("status") or {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "error"}.get(
            t.state.name, t.state.name.lower())
        acc = a.get(ACC, a.get(OLD_ACC, t.values[0] if t.values else math.nan))
        out.append({"number": t.number, "status": status, ACC: acc,
                    SIZE: a.get(SIZE, math.nan), BOPS: a.get(BOPS, math.nan), "avg_bits": a.get("avg_bits", math.nan),
                    "bits": dict(a.get("bits") or t.params), "params": dict(t.params),
                    "distributions": dict(t.distributions)})
    return out


def _table_samples(results: pd.DataFrame) -> list[dict[str, Any]]:
    """The samples of search/results.parquet, with one categorical per layer over the widths seen there;
    a layer with one width seen (a pinned layer) is no parameter: nothing to learn about it."""
    from optuna.distributions import CategoricalDistribution

    cols = [c for c in results.columns if c.startswith("bits.")]
    dists = {c.removeprefix("bits."): CategoricalDistribution(sorted({int(v) for v in results[c]}, reverse=True))
             for c in cols if results[c].nunique() > 1}
    out = []
    for r in results.sort_values("number").to_dict("records"):
        bits = {c.removeprefix("bits."): int(r[c]) for c in cols}
        out.append({"number": int(r["number"]), "status": str(r["status"]), ACC: r.get(ACC, r.get(OLD_ACC, math.nan)),
                    SIZE: r.get(SIZE, math.nan), BOPS: r.get(BOPS, math.nan), "avg_bits": r.get("avg_bits", math.nan),
                    "bits": bits,
                    "params": {n: b for n, b in bits.items() if n in dists}, "distributions": dists})
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and math.isfinite(v)


def view_study(samples: Iterable[dict[str, Any]], cost: str = SIZE) -> "optuna.Study":
    """An in-memory study (accuracy max, `cost` min: SIZE or BOPS) with one trial per sample number, in order: completed
    samples COMPLETE with their values, pruned ones PRUNED, everything else (infeasible, duplicate, running,
    error, retried, a number with no sample) FAIL, so Optuna's plots ignore it and trial numbers still match."""
    import optuna
    from optuna.trial import TrialState, create_trial

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" in the run's log
    try:
        study = optuna.create_study(directions=["maximize", "minimize"], study_name="kdsearch-report")
    finally:
        optuna.logging.set_verbosity(level)
    by_number = {int(s["number"]): s for s in samples}
    for n in range(max(by_number, default=-1) + 1):
        s = by_number.get(n, {"status": "not sampled", "bits": {}, "params": {}, "distributions": {}})
        attrs = {"bits": ", ".join(f"{k} {v}" for k, v in s["bits"].items())}
        if _finite(s.get("avg_bits")):
            attrs["avg_bits"] = round(float(s["avg_bits"]), 3)
        done = s["status"] == "completed" and _finite(s.get(ACC)) and _finite(s.get(cost))
        state = TrialState.COMPLETE if done else TrialState.PRUNED if s["status"] == "pruned" else TrialState.FAIL
        if not done:  # kept for the pruned points of the Pareto plot, and for anyone reading the view
            attrs.update({"status": s["status"], **{k: float(s[k]) for k in (ACC, cost) if _finite(s.get(k))}})
        study.add_trial(create_trial(state=state, values=[float(s[ACC]), float(s[cost])] if done else None,
                                     params=s["params"], distributions=s["distributions"], user_attrs=attrs))
    return study


def load_view_study(run_dir: Path, cost: str = SIZE) -> tuple["optuna.Study | None", str]:
    """The view study of the run's search against `cost` and a sentence saying where it came from; (None, why)
    before one. Against BOPS, None also when the search recorded no BOPs (a search from before them)."""
    search = RunDir(run_dir).search_dir
    journal, table = search / JOURNAL, search / "results.parquet"
    samples = _journal_samples(journal) if journal.is_file() else []
    source = f"the search's Optuna journal (search/{JOURNAL})"
    if not samples and table.is_file():  # a run from before the journal, or a journal with no trial in it yet
        samples, source = _table_samples(pd.read_parquet(table)), "rebuilt from search/results.parquet"
    if not samples:
        return None, NOT_RUN
    if not any(_finite(s.get(cost)) for s in samples):
        return None, f"the search recorded no {COST_AXIS[cost]}"
    return view_study(samples, cost), source


def _completed(study: "optuna.Study") -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# -- the figures -----------------------------------------------------------------------------------------

def pareto_figure(study: "optuna.Study", budgets: list[float], cost: str = SIZE) -> "go.Figure":
    """Optuna's Pareto front with size (or BOPs: `cost`) on x: hovering a point shows its per-layer bits (its
    `bits` user attribute); pruned samples (their last accuracy) and the spec's budgets (dashed) are drawn
    over it."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_pareto_front(study, targets=lambda t: (t.values[1], t.values[0]),
                                                     target_names=[COST_AXIS[cost], VALUE_NAMES[1]])
    front = []
    for trace in fig.data:  # Optuna colours points by trial number (white for trial 0): one colour per kind
        best = "Best Trial" in (trace.hovertemplate or "")
        trace.update(name="Pareto front" if best else "Trial", showlegend=True)
        trace.marker = {"color": "#d62728" if best else "#1f77b4", "size": 10 if best else 7,  # no colour bar
                        "opacity": 1.0 if best else 0.6, "line": {"color": "white", "width": 0.5}}
        if best:
            front = sorted(zip(trace.x, trace.y))
    if front:  # the front as a staircase, as in search/pareto.png
        fig.add_scatter(x=[x for x, _ in front], y=[y for _, y in front], mode="lines", line_shape="hv",
                        line={"color": "#d62728", "width": 1}, hoverinfo="skip", showlegend=False)
    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
              if _finite(t.user_attrs.get(ACC)) and _finite(t.user_attrs.get(cost))]
    if pruned:
        fig.add_scatter(x=[t.user_attrs[cost] for t in pruned], y=[t.user_attrs[ACC] for t in pruned],
                        mode="markers", name="pruned (last accuracy)",
                        marker={"symbol": "x", "color": "#999", "size": 8},
                        text=[f"trial {t.number} (pruned)<br>{t.user_attrs['bits']}" for t in pruned],
                        hovertemplate="%{text}<extra></extra>")
    for b in budgets:
        fig.add_vline(x=b, line_dash="dash", line_color="#333", annotation_text=f"budget {b:g} {COST_UNITS[cost]}",
                      annotation_position="top left")
    fig.update_layout(legend={"orientation": "h", "x": 0, "y": -0.2})
    fig.update_layout(title=f"Search: validation accuracy vs {'size' if cost == SIZE else 'BOPs'} "
                            "(hover a point for its bits per layer)")
    return fig


def importance_figure(study: "optuna.Study") -> "go.Figure":
    """Optuna's parameter importances for validation accuracy. Its default evaluator (PED-ANOVA) ranks what
    it takes to reach *low* target values, so the target is minus the accuracy: the bars then say which
    layers' widths matter for reaching the most accurate trials."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA's "computes importances for low target" reminder
        fig = optuna.visualization.plot_param_importances(study, target=lambda t: -t.values[0],
                                                          target_name=ACC)
    fig.update_layout(title="Which layers' bit-widths matter for validation accuracy (PED-ANOVA)")
    return fig


def history_figure(study: "optuna.Study") -> "go.Figure":
    """Optuna's optimization history of validation accuracy, per trial number."""
    import optuna

    fig = optuna.visualization.plot_optimization_history(study, target=lambda t: t.values[0], target_name=ACC)
    fig.update_layout(title="Search history: validation accuracy per trial")
    return fig


def hypervolume_figure(results: pd.DataFrame) -> "go.Figure | None":
    """The search's own progress measure: the hypervolume of the (accuracy, size) front after each completed
    trial. It is recorded in the order trials finished, which is not their number order (trials run in
    parallel), so it is drawn against that order: drawn per trial number it would seem to go down."""
    import plotly.graph_objects as go

    if "hypervolume" not in results.columns:
        return None
    hv = results.dropna(subset=["hypervolume"])
    hv = hv.sort_values("finished_seq" if "finished_seq" in hv.columns else "number")
    if not len(hv):
        return None
    fig = go.Figure(go.Scatter(x=list(range(1, len(hv) + 1)), y=hv["hypervolume"], mode="lines+markers",
                               line_shape="hv", customdata=hv["number"], name="hypervolume",
                               hovertemplate="after trial %{customdata} finished: %{y:.4g}<extra></extra>"))
    fig.update_layout(title="Search history: hypervolume of the front", xaxis_title="completed trials, in the "
                      "order they finished", yaxis_title="hypervolume (accuracy % x MB)", height=380)
    return fig


def sensitivity_figure(table: pd.DataFrame) -> "go.Figure":
    """One heat map per omega: layers (network order, top to bottom) x bit-widths, colour = log10(omega),
    since omegas span orders of magnitude; hover shows the value itself. A non-positive omega (a Hutchinson
    estimate can dip below 0) has no log and is left blank."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    order = table.sort_values("layer_index") if "layer_index" in table.columns else table
    layers = list(dict.fromkeys(order["layer"]))
    bits = sorted(table["bits"].unique(), reverse=True)
    metrics = [c for c in ("omega_kl", "omega_hessian") if c in table.columns]
    titles = {"omega_kl": "omega_kl: KL increase", "omega_hessian": "omega_hessian: HAWQ-V2 estimate"}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[titles[m] for m in metrics],
                        horizontal_spacing=0.16)
    for i, m in enumerate(metrics):
        omega = table.pivot_table(index="layer", columns="bits", values=m, aggfunc="first").reindex(
            index=layers, columns=bits)
        z = np.log10(omega.where(omega > 0))
        fig.add_trace(go.Heatmap(z=z.to_numpy(), x=[f"{b}-bit" for b in bits], y=layers, customdata=omega.to_numpy(),
                                 colorscale="YlOrRd", colorbar={"title": "log10", "len": 0.9,
                                                                "x": fig.get_subplot(1, i + 1).xaxis.domain[1] + 0.01},
                                 hovertemplate="%{y} at %{x}<br>omega %{customdata:.3g}<extra></extra>"),
                      row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
    fig.update_layout(title="Layer sensitivity: log10(omega) per layer and bit-width",
                      height=max(360, 60 + 26 * len(layers)))
    return fig


# -- the page --------------------------------------------------------------------------------------------

def _missing(why: str) -> str:
    return f'<p class="missing">{html.escape(why)}</p>'


def _figure(fig: "go.Figure", name: str) -> str:
    """A figure as a <div> (plotly.js is in the page's head once); data-figure counts it for the tests."""
    body = fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True, "displaylogo": False})
    return f'<div class="figure" data-figure="{name}">{body}</div>'


def _bops_section(run_dir: Path, budgets_gbops: list[float]) -> list[str]:
    """The front against BOPs (GBOPs = 10^9 MACs x weight bits x activation bits), when the search recorded them."""
    study, why = load_view_study(run_dir, BOPS)
    n = _completed(study) if study is not None else 0
    return ["<h2>Search: accuracy vs BOPs</h2>",
            _figure(pareto_figure(study, budgets_gbops, BOPS), "pareto_bops") if n
            else _missing(why if study is None else "no completed trial yet")]


def _search_sections(run_dir: Path, budgets: list[float], budgets_gbops: Sequence[float] = ()) -> list[str]:
    study, source = load_view_study(run_dir)
    if study is None:
        return ["<h2>Search: accuracy vs size</h2>", _missing(NOT_RUN), "<h2>Search: accuracy vs BOPs</h2>",
                _missing(NOT_RUN), "<h2>Which layers matter</h2>", _missing(NOT_RUN), "<h2>Search history</h2>",
                _missing(NOT_RUN)]
    n = _completed(study)
    table_path = RunDir(run_dir).search_dir / "results.parquet"
    results = pd.read_parquet(table_path) if table_path.is_file() else None
    out = ["<h2>Search: accuracy vs size</h2>",
           f'<p class="note">Study: {html.escape(source, quote=False)}; {len(study.trials)} samples, {n} trained '
           "to the end (the other samples were pruned, over budget, duplicates, failed or still running).</p>",
           _figure(pareto_figure(study, budgets), "pareto") if n else _missing("no completed trial yet"),
           *_bops_section(run_dir, list(budgets_gbops)),
           "<h2>Which layers matter</h2>"]
    if n >= 2:
        out += ['<p class="note">Optuna\'s parameter importances (PED-ANOVA) of each searched layer\'s bit-width '
                "for reaching the most accurate completed trials (validation accuracy).</p>",
                _figure(importance_figure(study), "importance")]
    else:
        out.append(_missing(f"needs at least 2 completed trials ({n} so far)"))
    hv = hypervolume_figure(results) if results is not None else None
    out += ["<h2>Search history</h2>",
            _figure(history_figure(study), "history") if n else _missing("no completed trial yet"),
            _figure(hv, "hypervolume") if hv is not None else ""]
    return out


def render_html(run_dir: str | Path, table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The whole page (see the module doc); `table` is report.md's results table and ``notes`` its lines
    below it (`kdsearch.report.results_table`: the latency column and speed-up line, after `kdsearch bench`)."""
    import plotly.offline

    from .status import check_run_dir, run_spec

    p = check_run_dir(run_dir)
    spec = run_spec(p)
    budgets = [float(b) for b in (spec.get("search") or {}).get("budgets_mb") or []]
    budgets_gbops = [float(b) for b in (spec.get("search") or {}).get("budgets_gbops") or []]
    sens = p / "sensitivity" / "sensitivity.parquet"
    name = html.escape(str(spec.get("name", p.name)))
    parts = [f"<h1>kdsearch report: {name}</h1>",
             f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M:%S")} from the run directory; the full '
             'text report is <a href="report.md">report.md</a>. Every choice was made on the validation split; '
             "test accuracy is read once per listed model.</p>",
             "<h2>Results</h2>", table.to_html(index=False, classes="results", border=0, escape=True),
             '<p class="note">Test acc.: mean ± sample std over the n seeds; Val acc.: what ranked the model; '
             "Size: the size model (MB = 10^6 bytes); File: the exported .kdq on disk; GBOPs: 10^9 bit operations "
             "(MACs x weight bits x activation bits, HAWQ-V3) on one image.</p>",
             *(f'<p class="note">{html.escape(n.replace("**", "").replace("`", ""))}</p>' for n in notes if n),
             *_search_sections(p, budgets, budgets_gbops),
             "<h2>Layer sensitivity</h2>",
             _figure(sensitivity_figure(pd.read_parquet(sens)), "sensitivity") if sens.is_file() else _missing(NOT_RUN)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>kdsearch report: {name}</title>'
            f"<style>{CSS}</style>\n<script>{plotly.offline.get_plotlyjs()}</script></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report_html(run_dir: str | Path, table: pd.DataFrame, notes: Sequence[str] = ()) -> Path | None:
    """Write runs/<name>/report.html atomically; None (and a log line) where plotly is not installed."""
    if not have_plotly():
        log.info("report: plotly is not installed; skipping report.html (pip install 'plotly>=5.18')")
        return None
    out = RunDir(run_dir).report_html
    atomic_write_text(out, render_html(run_dir, table, notes))
    log.info("report: %s", out)
    return out
