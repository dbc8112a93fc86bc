"""Running the search with Ray Tune, and restoring it: `run_search` (any trainable; `kdsearch.stages.search` is the stage).

Tune owns scheduling (ASHA on accuracy per epoch), retries (FailureConfig) and the experiment snapshot;
the searcher (`BudgetSearch`) owns sampling and the result tables. A rerun restores the experiment with
`Tuner.restore(..., resume_unfinished=True, resume_errored=True)`: finished trials are kept, unfinished
ones continue from their checkpoints and the Optuna study keeps its history (the searcher state holds the
journal size at the snapshot; the study in the journal is cut back to it).

Tune snapshots the experiment every >= 10 s by default; after a SIGKILL, work since the last snapshot is
redone. The period is lowered to `snapshot_s` (1 s) here, and the trial records (`trial.py`) make the
redone work cheap: a trial that had finished is replayed from its record, not retrained.

The Optuna study is kept in out_dir/optuna-journal.log (`storage`), where optuna-dashboard and
`optuna.load_study` read it. Tune's own files (experiment state, per-trial result.json and TensorBoard
event files) live in out_dir/tune/, inside the run directory, so `tensorboard --logdir runs/<name>` shows
every trial's curves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..pareto import ACC
from ..spec import SearchConfig
from .quiet import quiet_library_loggers, tune_environment
from .results import ResultsWriter, read_summary
from .searcher import BudgetSearch, make_sampler
from .space import SearchSpace, warm_start_points
from .storage import STUDY_NAME, journal_path, remove_journal

log = logging.getLogger("kdsearch.search")

EXPERIMENT = "tune"  # runs/<name>/search/tune/: Tune's experiment directory
ASHA_REDUCTION = 2  # keep the better half at each rung: trials are only a few epochs long


def trial_dirname(trial: Any) -> str:
    """Short trial directory names (Tune's default embeds every layer's bits in the name)."""
    return f"trial_{trial.trial_id}"


def max_concurrent_trials(cfg: SearchConfig, *, use_gpu: bool, reserved_cpus: float = 0.0) -> int:
    """search.max_concurrent, else what the cluster holds: GPUs / gpus_per_trial, or CPUs / cpus_per_trial."""
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    res = ray.cluster_resources()
    if use_gpu and cfg.gpus_per_trial > 0:
        return max(1, int(res.get("GPU", 0.0) / cfg.gpus_per_trial + 1e-9))
    return max(1, int((res.get("CPU", 1.0) - reserved_cpus) / cfg.cpus_per_trial + 1e-9))


def make_scheduler(cfg: SearchConfig) -> Any:
    """ASHA (Li et al. 2020) on accuracy per epoch; FIFO when off or when trials are too short to prune."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if not cfg.asha or cfg.trial_epochs <= cfg.grace_period:
        return FIFOScheduler()
    return AsyncHyperBandScheduler(time_attr="epoch", metric=ACC, mode="max", max_t=cfg.trial_epochs,
                                   grace_period=cfg.grace_period, reduction_factor=ASHA_REDUCTION)


def run_search(space: SearchSpace, cfg: SearchConfig, *, out_dir: str | Path, trainable: Any, payload: Any,
               seed: int, warm_starts: Sequence[dict[str, int]] = (), use_gpu: bool = False,
               reserved_cpus: float = 0.0, verbose: int = 0, snapshot_s: float = 1.0) -> dict[str, Any]:
    """Run (or restore and finish) a search of `space` with `trainable(config, payload)`; return the summary.

    Ray must be initialised. `out_dir` receives Tune's experiment (tune/), the trial records (trials/),
    the Optuna study (optuna-journal.log) and the tables (results.parquet, pareto.parquet, summary.json).
    `verbose` is Tune's own verbosity (0: kdsearch's lines only).
    """
    from ray import tune

    quiet_library_loggers()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    exp = out_dir / EXPERIMENT
    journal = journal_path(out_dir)
    fn = tune.with_parameters(trainable, payload=payload)
    fn = tune.with_resources(fn, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial if use_gpu else 0.0})
    t0 = time.perf_counter()
    with tune_environment(snapshot_s):
        if tune.Tuner.can_restore(str(exp)):
            log.info("search: restoring the experiment in %s", exp)
            tuner = tune.Tuner.restore(str(exp), trainable=fn, resume_unfinished=True, resume_errored=True)
        else:
            if remove_journal(journal):  # from a search killed before its first snapshot: nothing to restore
                log.info("search: no experiment snapshot in %s; starting the study afresh", exp)
            points, dropped = warm_start_points(space, warm_starts)
            budgets = " and ".join(f"{b:.4g} {unit}" for b, unit in ((space.budget_mb, "MB"),
                                                                      (space.budget_gbops, "GBOPs")) if b is not None)
            log.info("search: %d searchable layers (%d fixed), %s configurations, budget %s, "
                     "%d warm starts (%d over budget dropped)", len(space.searchable), len(space.fixed),
                     f"{space.cardinality:,}", budgets, len(points), dropped)
            writer = ResultsWriter(out_dir, space.layers, space.budget_mb, budget_gbops=space.budget_gbops)
            searcher = BudgetSearch(space, sampler=make_sampler(cfg.sampler, seed, cfg.num_trials, cfg.sampler_kwargs),
                                    trial_epochs=cfg.trial_epochs, points_to_evaluate=points, writer=writer,
                                    journal=journal)
            searcher.writer.write(searcher.study)  # tables exist (empty) from the start
            tuner = tune.Tuner(
                fn,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=make_scheduler(cfg), num_samples=cfg.num_trials,
                    max_concurrent_trials=max_concurrent_trials(cfg, use_gpu=use_gpu, reserved_cpus=reserved_cpus),
                    reuse_actors=True, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=str(out_dir), verbose=verbose,
                    failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
            )
        grid = tuner.fit()
    summary = read_summary(out_dir)
    summary["seconds"] = time.perf_counter() - t0
    summary["tune_errors"] = len(grid.errors)
    if grid.errors:
        log.warning("search: %d trial(s) failed after %d retries; see %s", len(grid.errors), cfg.max_failures, exp)
    log.info("search: every trial's curves are in %s: tensorboard --logdir %s", exp, out_dir)
    log.info("search: the Optuna study '%s' is in %s (kdsearch dashboard, or optuna.load_study)", STUDY_NAME, journal)
    return summary
