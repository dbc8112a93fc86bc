"""report.html on the real tiny run of test_finalize, on a journal-backed search, on partial runs, and in a browser."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from kdsearch import report_html
from kdsearch.report import _float_student, seed_table, write_report
from kdsearch.report_html import JOURNAL, load_view_study, render_html
from test_finalize import BUDGET, SMALL_BUDGET, build_run, tiny_spec

pytest.importorskip("plotly")

FIGURES = ["pareto", "pareto_bops", "importance", "history", "hypervolume", "sensitivity"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    return build_run(tmp_path_factory.getbasetemp() / "shared_run")


@pytest.fixture(scope="module")
def page(run) -> Path:
    """report.html of the tiny run, written the way `kdsearch report` writes it."""
    _, ctx = run
    write_report(ctx.run_dir)
    return ctx.run_dir / "report.html"


def _render(run_dir: Path) -> str:
    """report.html's text, with report.md's table as write_report hands it over."""
    from kdsearch.status import run_spec

    return render_html(run_dir, seed_table(run_dir, run_spec(run_dir), _float_student(run_dir)))


def _figures(text: str) -> list[str]:
    return re.findall(r'data-figure="(\w+)"', text)


def test_report_html_beside_report_md_with_every_part(run, page) -> None:
    text = page.read_text()
    assert page.with_name("report.md").is_file()
    assert _figures(text) == FIGURES
    assert "not run yet" not in text
    assert re.search(r"<script[^>]*\bsrc=", text) is None  # plotly.js is embedded: the page works offline
    assert text.count("<script") == 1 + len(FIGURES)  # the library once, then one script per figure
    assert text.count("Plotly.newPlot") == len(FIGURES)
    for row in ("Baseline (Scratch)", "KD (FP32)", "QAT KD", "Mixed 16/8-bit", "final/qat_kd_8.s*.kdq"):
        assert row in text  # the seed's table of report.md, as HTML
    assert "rebuilt from search/results.parquet" in text  # this run has no journal
    assert "conv1 8, conv2 16, conv3 8, fc 8" in text  # trial 1's per-layer bits, in the Pareto hover text
    assert "pruned (last accuracy)" in text and "trial 2 (pruned)" in text  # trial 2 stopped early: drawn too
    for budget in (BUDGET, SMALL_BUDGET):  # the spec's size budgets, drawn on the front
        assert f"budget {budget:g} MB" in text
    assert "Search: accuracy vs BOPs" in text and "BOPs (GBOPs)" in text and ">GBOPs</th>" in text


def test_view_study_keeps_numbers_and_only_trained_trials_count(run) -> None:
    from optuna.trial import TrialState

    _, ctx = run
    study, source = load_view_study(ctx.run_dir)
    results = pd.read_parquet(ctx.run_dir / "search" / "results.parquet").set_index("number")
    assert source == "rebuilt from search/results.parquet"
    assert [t.number for t in study.trials] == list(range(int(results.index.max()) + 1))
    want = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
    for t in study.trials:
        r = results.loc[t.number]
        assert t.state == want.get(r["status"], TrialState.FAIL)  # infeasible/running: not plotted
        if t.state == TrialState.COMPLETE:
            assert t.values == [r["val_acc"], r["size_mb"]]
        assert set(t.params) == {"conv2", "conv3"}  # conv1/fc are pinned to 8: no parameter


def test_journal_study_is_read_when_the_search_wrote_one(run, tmp_path) -> None:
    """A search that keeps its study in an Optuna journal: that study is plotted (over-budget and duplicate
    samples, which the search tells Optuna as COMPLETE, are left out)."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState, create_trial

    _, ctx = run
    run_dir = tmp_path / "tiny"
    (run_dir / "search").mkdir(parents=True)
    shutil.copy(ctx.run_dir / "spec.yaml", run_dir / "spec.yaml")
    storage = JournalStorage(JournalFileBackend(str(run_dir / "search" / JOURNAL)))
    study = optuna.create_study(storage=storage, study_name="kdsearch", directions=["maximize", "minimize"])
    dists = {n: CategoricalDistribution((16, 8, 4)) for n in ("conv2", "conv3")}
    for status, acc, size, b2 in (("completed", 40.0, 0.03, 8), ("infeasible", 0.0, 0.09, 16),
                                  ("completed", 45.0, 0.04, 16), ("duplicate", 45.0, 0.04, 16)):
        bits = {"conv1": 8, "conv2": b2, "conv3": 4, "fc": 8}
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[acc, size], distributions=dists,
                                     params={"conv2": b2, "conv3": 4},
                                     user_attrs={"status": status, "bits": bits, "val_acc": acc, "size_mb": size}))
    view, source = load_view_study(run_dir)
    assert source.startswith("the search's Optuna journal")
    assert [t.state for t in view.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                                              TrialState.FAIL]
    assert view.trials[2].user_attrs["bits"] == "conv1 8, conv2 16, conv3 4, fc 8"
    text = _render(run_dir)
    assert _figures(text) == ["pareto", "importance", "history"]
    assert "the search's Optuna journal (search/optuna-journal.log)" in text


def _partial_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    tiny_spec().save(run_dir / "spec.yaml")
    return run_dir


def test_partial_runs_say_not_run_yet(tmp_path) -> None:
    run_dir = _partial_run(tmp_path)
    text = _render(run_dir)
    assert _figures(text) == []
    for part in ("Search: accuracy vs size", "Search: accuracy vs BOPs", "Which layers matter", "Search history",
                 "Layer sensitivity"):
        assert re.search(f"<h2>{part}</h2>\\s*<p class=\"missing\">not run yet</p>", text), part
    assert "Baseline (Scratch)" in text  # the table is there, its rows say "not run yet"
    # one completed trial so far: a front and a history, but no importances yet
    (run_dir / "search").mkdir()
    bits = {"bits.conv1": 8, "bits.conv2": 8, "bits.conv3": 4, "bits.fc": 8}
    pd.DataFrame([{"number": 0, "status": "completed", "val_acc": 40.0, "size_mb": 0.03, "avg_bits": 7.0, **bits},
                  {"number": 1, "status": "running", "val_acc": float("nan"), "size_mb": 0.04, "avg_bits": 8.0,
                   **bits}]).to_parquet(run_dir / "search" / "results.parquet")
    text = _render(run_dir)
    assert _figures(text) == ["pareto", "history"]
    assert "needs at least 2 completed trials (1 so far)" in text


def test_without_plotly_report_md_is_still_written(tmp_path, monkeypatch, caplog) -> None:
    run_dir = _partial_run(tmp_path)
    monkeypatch.setattr(report_html, "have_plotly", lambda: False)
    with caplog.at_level(logging.INFO, logger="kdsearch.report"):
        write_report(run_dir)
    assert (run_dir / "report.md").is_file() and not (run_dir / "report.html").exists()
    assert "plotly is not installed; skipping report.html" in caplog.text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_every_figure_is_drawn_in_a_browser(page, tmp_path) -> None:
    """Headless Chromium runs the page's scripts (plotly.js from the page itself: no network) and draws one
    plot per figure."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=240).stdout
    figures = dom.split('data-figure="')[1:]
    assert [f.split('"', 1)[0] for f in figures] == FIGURES
    for f in figures:  # each figure's own div holds a drawn plot
        assert 'class="plot-container plotly"' in f and 'class="main-svg"' in f
    assert dom.count('class="plot-container plotly"') == len(FIGURES)


def test_runs_searched_before_the_val_acc_name_still_plot(tmp_path) -> None:
    """Older runs (and search branches) record validation accuracy as `acc`: read it under that name too."""
    from kdsearch.report_html import _table_samples, view_study

    bits = {"bits.conv1": 8, "bits.conv2": 8, "bits.conv3": 4, "bits.fc": 8}
    old = pd.DataFrame([{"number": 0, "status": "completed", "acc": 40.0, "size_mb": 0.03, "avg_bits": 7.0, **bits},
                        {"number": 1, "status": "pruned", "acc": 20.0, "size_mb": 0.03, "avg_bits": 7.0, **bits}])
    study = view_study(_table_samples(old))
    assert study.trials[0].values == [40.0, 0.03] and study.trials[1].user_attrs["val_acc"] == 20.0


def test_a_bops_budgeted_search_draws_its_front_and_budget_against_gbops(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    spec = tiny_spec()
    spec = type(spec).model_validate({**spec.to_dict(), "search": {**spec.to_dict()["search"], "budgets_mb": [],
                                                                   "budgets_gbops": [0.05]}})
    spec.save(run_dir / "spec.yaml")
    (run_dir / "search").mkdir()
    bits = {"bits.conv1": 8, "bits.conv2": 8, "bits.conv3": 4, "bits.fc": 8}
    pd.DataFrame([{"number": i, "status": "completed", "val_acc": acc, "size_mb": 0.03, "gbops": g, "avg_bits": 7.0,
                   **bits} for i, (acc, g) in enumerate(((40.0, 0.04), (45.0, 0.03), (30.0, 0.045)))]
                 ).to_parquet(run_dir / "search" / "results.parquet")
    text = _render(run_dir)
    assert _figures(text)[:2] == ["pareto", "pareto_bops"]
    assert "budget 0.05 GBOPs" in text and "budget 0.05 MB" not in text
    view, _ = load_view_study(run_dir, "gbops")
    assert [t.values for t in view.trials] == [[40.0, 0.04], [45.0, 0.03], [30.0, 0.045]]
