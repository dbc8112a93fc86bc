"""A live view of a running stage, from the files the stage rewrites (never from the stage's memory).

The search rewrites search/results.parquet and summary.json atomically after every trial event, and
finalize rewrites final/progress.json after every epoch, so any process (the driver's reporter thread,
`kdsearch status` in another shell) can render the same one-line view:

    search: 12/32 trials (9 completed, 2 pruned, 1 running, 3 infeasible) best under 1.38 MB: 71.3% @ 1.21 MB  ETA 6m

`ProgressReporter` prints it from a background thread: as a rich live line on a terminal, or as a log
line every `interval_s` seconds (when it changed) in a log file; `stop()` always logs the last line.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .eta import fmt_duration  # noqa: F401  (views and tests format durations from here too)
from .pareto import ACC, SIZE
from .ticker import Ticker

log = logging.getLogger("kdsearch.progress")

FINISHED = ("completed", "pruned", "error")  # launched trials that take no more time
SHOWN = ("completed", "pruned", "running", "error", "infeasible", "duplicate")


@dataclass(frozen=True)
class SearchProgress:
    """What the search's files say right now. `eta_s` is None until a trial has finished."""

    total: int | None  # search.num_trials (launched trials)
    counts: dict[str, int] = field(default_factory=dict)
    budget_mb: float | None = None
    best_acc: float | None = None
    best_size_mb: float | None = None
    eta_s: float | None = None

    def __post_init__(self) -> None:
        if self.total is not None and self.total < 1:
            raise ValueError(f"SearchProgress.total must be >= 1 trial (got {self.total})")

    @property
    def launched(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("running", *FINISHED))


def estimate_eta(df: pd.DataFrame, total: int | None, concurrency: int | None, age_s: float = 0.0) -> float | None:
    """Seconds until `total` launched trials have finished.

    Each unstarted trial is assumed to take the mean wall time of the finished ones (completed and pruned
    alike: later trials get pruned at a similar rate), a running trial the rest of that mean; the work is
    spread over `concurrency` slots (default: the trials running now). `age_s` is the time since the file
    was written, during which the running trials went on.
    """
    if total is None:
        return None
    finished = df[df["status"].isin(FINISHED)]
    walls = pd.to_numeric(finished["wall_s"], errors="coerce").dropna()
    if walls.empty:
        return None
    mean = float(walls.mean())
    running = df[df["status"] == "running"]
    left = max(0, total - int(len(finished)) - int(len(running)))
    run_wall = pd.to_numeric(running["wall_s"], errors="coerce").fillna(0.0)
    work = left * mean + float((mean - run_wall).clip(lower=0.0).sum())
    slots = max(1, concurrency or 0, len(running))
    eta = work / slots
    return max(0.0, eta - age_s) if len(running) else eta


def search_progress(run_dir: str | Path, total: int | None = None, *, concurrency: int | None = None,
                    budget_mb: float | None = None) -> SearchProgress | None:
    """The search's progress from runs/<name>/search/; None before the first results file exists."""
    sdir = Path(run_dir) / "search"
    path = sdir / "results.parquet"
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    if budget_mb is None and (sdir / "summary.json").is_file():
        budget_mb = json.loads((sdir / "summary.json").read_text()).get("budget_mb")
    counts = {s: int((df["status"] == s).sum()) for s in df["status"].unique()}
    done = df[df["status"] == "completed"].dropna(subset=[ACC, SIZE])
    if budget_mb is not None:
        done = done[done[SIZE] <= budget_mb]
    best = done.sort_values([ACC, SIZE], ascending=[False, True]).head(1)
    eta = estimate_eta(df, total, concurrency, age_s=max(0.0, time.time() - path.stat().st_mtime))
    return SearchProgress(total, counts, budget_mb, float(best[ACC].iloc[0]) if len(best) else None,
                          float(best[SIZE].iloc[0]) if len(best) else None, eta)


def format_search(p: SearchProgress) -> str:
    c = p.counts
    parts = [f"{c.get(s, 0)} {s}" for s in SHOWN if c.get(s, 0) or s in ("completed", "pruned", "running")]
    head = f"search: {p.launched}/{p.total if p.total is not None else '?'} trials ({', '.join(parts)})"
    where = f"under {p.budget_mb:g} MB" if p.budget_mb is not None else "so far"
    best = f"{p.best_acc:.1f}% @ {p.best_size_mb:.4g} MB" if p.best_acc is not None else "none yet"
    eta = fmt_duration(p.eta_s) if p.eta_s is not None else "?"
    if p.total is not None and p.launched >= p.total and not c.get("running"):
        eta = "done"
    return f"{head} best {where}: {best}  ETA {eta}"


@dataclass(frozen=True)
class StageEta:
    """What the running models of a stage estimate (`kdsearch.eta`): the stage ends when the last of them does,
    or later if some of its models have not started yet."""

    seconds_left: float
    estimated: int  # models with a live estimate
    last: str  # the model that ends last, and its device
    age_s: float  # how old that model's estimate is


def stage_eta(run_dir: str | Path, stage: str, since: float | None = None) -> StageEta | None:
    """The estimate of `stage` from its models' files (written since `since`, a time.time(), when given); None
    before any model of the stage has estimated itself."""
    from .rundir import RunDir

    now, live = time.time(), []
    for p in RunDir(run_dir).eta_files(stage):
        try:
            e = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):  # being replaced right now
            continue
        if not e.get("done") and (since is None or e.get("updated", 0) >= since):
            live.append(e)
    if not live:
        return None
    last = max(live, key=lambda e: e["ends_at"])
    return StageEta(max(0.0, last["ends_at"] - now), len(live), f"{last['model']} on {last['device']}",
                    max(0.0, now - last["updated"]))


def eta_text(e: StageEta) -> str:
    """'ETA 47h 00m (the last of 3 running models to end: wrn_28_10 s0 on cpu)'."""
    models = "1 running model" if e.estimated == 1 else f"the last of {e.estimated} running models to end"
    stale = f"; estimated {fmt_duration(e.age_s)} ago" if e.age_s >= 600 else ""
    return f"ETA {fmt_duration(e.seconds_left)} ({models}: {e.last}{stale})"


def finalize_line(run_dir: str | Path) -> str | None:
    """'finalize: 3/8 models done; running qat_kd_8 s1, trial_00012 s0, ...', from final/progress.json."""
    p = Path(run_dir) / "final" / "progress.json"
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    total, done, running = s.get("total", 0), s.get("done", 0), s.get("running") or []
    if not running:
        return f"finalize: {done}/{total} models done"
    shown = ", ".join(running[:4]) + (f", +{len(running) - 4} more" if len(running) > 4 else "")
    return f"finalize: {done}/{total} models done; queued or training: {shown}"


def spec_total(run_dir: str | Path) -> int | None:
    """search.num_trials from the run's frozen spec.yaml, when there is one."""
    import yaml

    p = Path(run_dir) / "spec.yaml"
    if not p.is_file():
        return None
    d = yaml.safe_load(p.read_text()) or {}
    n = (d.get("search") or {}).get("num_trials")
    return int(n) if n else None


def progress_line(run_dir: str | Path, total: int | None = None, *, stage: str = "search",
                  concurrency: int | None = None) -> str:
    """One line for `stage` ('search' or 'finalize'); a 'waiting' line before its files exist."""
    if stage == "finalize":
        return finalize_line(run_dir) or "finalize: waiting for the first model"
    p = search_progress(run_dir, total if total is not None else spec_total(run_dir), concurrency=concurrency)
    return format_search(p) if p is not None else "search: waiting for the first trial"


class ProgressReporter:
    """Renders `progress_line` from a background thread while a stage runs in the foreground.

        with ProgressReporter(run_dir, total=spec.search.num_trials, interval_s=30):
            search_stage(spec, ctx)

    `live=None` picks a rich live line when stderr is a terminal, log lines otherwise.
    """

    def __init__(self, run_dir: str | Path, total: int | None = None, interval_s: float = 30.0, *,
                 stage: str = "search", concurrency: int | None = None, live: bool | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"ProgressReporter.interval_s must be > 0 seconds (got {interval_s})")
        if stage not in ("search", "finalize"):
            raise ValueError(f"ProgressReporter.stage must be 'search' or 'finalize' (got {stage!r})")
        self.run_dir, self.total, self.interval_s = Path(run_dir), total, float(interval_s)
        self.stage, self.concurrency = stage, concurrency
        self.live = sys.stderr.isatty() if live is None else live
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_logged: str | None = None
        self.lines: list[str] = []  # every line logged, for tests and callers

    def line(self) -> str:
        try:
            return progress_line(self.run_dir, self.total, stage=self.stage, concurrency=self.concurrency)
        except Exception as err:  # a view must never take the stage down
            return f"{self.stage}: progress unavailable ({type(err).__name__}: {err})"

    def _log(self, line: str, force: bool = False) -> None:
        if force or line != self._last_logged:
            log.info("%s", line)
            self.lines.append(line)
            self._last_logged = line

    def _loop(self) -> None:
        if self.live:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            # Its own console: a training bar on the default console must not collide with this live line.
            with Live(Text(self.line()), console=Console(stderr=True), refresh_per_second=2, transient=True,
                      redirect_stdout=False, redirect_stderr=False) as live:
                while not self._stop.wait(min(self.interval_s, 1.0)):
                    live.update(Text(self.line()))
        else:
            self._log(self.line())
            while not self._stop.wait(self.interval_s):
                self._log(self.line())

    def start(self) -> "ProgressReporter":
        if self._thread is not None:
            raise RuntimeError("ProgressReporter.start: already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kdsearch-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and log the final line (in a log file that is the stage's last progress line)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        self._log(self.line(), force=True)

    def __enter__(self) -> "ProgressReporter":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class EtaReporter(Ticker):
    """Logs a stage's estimate (`stage_eta`, from estimates written since the stage started) as soon as its first
    model has one, whenever another model adds one, and every `every_s` seconds after that."""

    def __init__(self, run_dir: str | Path, stage: str, *, interval_s: float = 10.0, every_s: float = 600.0) -> None:
        self.run_dir, self.stage, self.interval_s, self.every_s = Path(run_dir), stage, interval_s, every_s
        self.since = time.time()
        self.lines: list[str] = []
        self._count, self._at = 0, 0.0

    def poll(self) -> None:
        e = stage_eta(self.run_dir, self.stage, self.since)
        now = time.monotonic()
        if e is None or (e.estimated == self._count and now - self._at < self.every_s):
            return
        self._count, self._at = e.estimated, now
        line = f"stage {self.stage}: {eta_text(e)}"
        log.info("%s", line)
        self.lines.append(line)
