"""The searcher: Ray Tune's OptunaSearch, taught three things the two-objective bit-width search needs.

1. Over-budget samples never become Tune trials. `suggest` asks Optuna, and when the sample is above the
   size budget it tells Optuna at once (the constraint `define_space` set makes it infeasible to the
   sampler) and asks again. Such samples cost microseconds, so they do not count against
   `search.num_trials`, which counts launched (trained) trials.
2. Configurations already evaluated are not trained again: the sample is told the known outcome.
3. A trial that ASHA stopped early reaches `on_trial_complete` with its last (early) result and no error;
   Ray's OptunaSearch would tell Optuna COMPLETE with that early accuracy, teaching the sampler that
   the configuration is worse than it is. Here it is told PRUNED (no values), as Optuna's own pruning
   does (its TPE ranks pruned trials after the completed ones; NSGA-II ignores them).

Infeasible samples are told COMPLETE with values (0 %, size) plus a positive constraint: constraint-aware
samplers rank them by violation before any value (c-TPE, Watanabe & Hutter 2023; NSGA-II constrained
domination, Deb et al. 2002), and only COMPLETE trials enter NSGA-II's population at all.

With a `journal`, the study lives in an Optuna journal file (see `storage`): Tune's snapshot of the searcher
(`save`) flushes it and records its size, and a restored searcher cuts it back to that size before first
use, so the study on disk is always the study of the restored search. The result tables are rebuilt at
most once a second (and at every snapshot), not after every event: the rebuild grows with the study.
"""

from __future__ import annotations

import inspect
import logging
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ..imports import ImportPathError, call_failed, is_import_path, resolve
from ..pareto import ACC, BOPS, COST_COLUMNS, SIZE
from .results import ResultsWriter
from .space import SearchSpace, space_function
from .storage import STUDY_NAME, SnapshotJournal, reopen

log = logging.getLogger("kdsearch.search")

REPORTED = ("epoch", ACC, SIZE, BOPS, "avg_bits", "epoch_s", "wall_s")


def make_sampler(kind: str, seed: int, num_trials: int,
                 kwargs: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler: multivariate TPE (default), NSGA-II, random, or an Optuna sampler class by import path.

    ``kwargs`` (the spec's ``search.sampler_kwargs``) override the built-ins' settings and build an imported
    class; seeded unless ``kwargs`` says otherwise (an imported class gets ``seed=`` when it takes one).
    """
    kw = dict(kwargs or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if is_import_path(kind):
            return _imported_sampler(kind, seed, kw)
        if kind == "tpe":
            # constant_liar: trials still running count as bad, so parallel workers do not all sample
            # the same promising region (Optuna's recommendation for distributed TPE).
            return optuna.samplers.TPESampler(**{"seed": seed, "multivariate": True, "constant_liar": True,
                                                 "n_startup_trials": max(3, min(10, num_trials // 4)), **kw})
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(**{"seed": seed,
                                                    "population_size": max(4, min(50, num_trials // 4)), **kw})
        if kind == "random":
            return optuna.samplers.RandomSampler(**{"seed": seed, **kw})
    raise ValueError(f"search.sampler must be one of tpe, nsga2, random or an import path (got {kind!r})")


def _imported_sampler(path: str, seed: int, kw: dict[str, Any]) -> optuna.samplers.BaseSampler:
    cls = resolve(path)
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise ImportPathError(f"{path} is not an Optuna sampler class (a subclass of optuna.samplers.BaseSampler)")
    if "seed" not in kw and "seed" in inspect.signature(cls).parameters:
        kw["seed"] = seed
    try:
        return cls(**kw)
    except Exception as err:  # noqa: BLE001  (any error of the user's class is one line)
        raise call_failed(f"{path}({', '.join(f'{k}={v!r}' for k, v in kw.items())})", err) from None


class BudgetSearch(OptunaSearch):
    """OptunaSearch over a `SearchSpace` with (accuracy max, cost min) objectives, the cost being size (MB) when
    the space has a size budget, else BOPs (GBOPs); see the module doc.

    `journal`: the Optuna journal file the study lives in (None: in memory, for tests and the benchmark's
    searcher-only loop).
    """

    # class defaults: a searcher state pickled before these existed restores with an in-memory study
    _journal: SnapshotJournal | None = None
    _journal_mark: int | None = None  # set by a restore: the journal size to cut back to before first use
    _dirty = False  # the tables lag the study

    def __init__(self, space: SearchSpace, *, sampler: optuna.samplers.BaseSampler, trial_epochs: int,
                 points_to_evaluate: list[dict[str, int]] | None = None, writer: ResultsWriter | None = None,
                 max_skips: int = 200, journal: str | Path | None = None) -> None:
        self.space = space
        self.trial_epochs = int(trial_epochs)
        self.writer = writer
        self.max_skips = int(max_skips)
        self.finished_seq = 0
        self.seen: dict[tuple[int, ...], int] = {}  # configuration -> number of the trial that trained it
        self.skipped = {"infeasible": 0, "duplicate": 0}
        self.revived: dict[str, dict[str, Any]] = {}  # errored trials a restore resumed: their new results
        self._feasible_total: int | None = None
        self._journal = SnapshotJournal(journal) if journal is not None else None
        storage = optuna.storages.JournalStorage(self._journal) if self._journal is not None else None
        super().__init__(space=space_function(space), metric=[ACC, self.cost_column], mode=["max", "min"],
                         points_to_evaluate=points_to_evaluate or None, sampler=sampler, study_name=STUDY_NAME,
                         storage=storage)

    @property
    def cost_column(self) -> str:
        """The user attribute (and results column) of the second objective."""
        return COST_COLUMNS[self.space.cost]

    @property
    def study(self) -> optuna.Study:
        self._attach()
        return self._ot_study

    # -- the study on disk ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._journal is not None:  # the state refers to the journal as of now: put it on disk, mark it
            state["_journal_mark"] = self._journal.flush()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        """Tune's experiment snapshot: tables and journal brought up to date, then the state with the mark."""
        self.flush()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def flush(self) -> None:
        """The journal's buffered operations, and the tables if they lag the study: at once when no trial is
        running (the end of a search, a test), else as the writer's spacing allows (snapshots come every second,
        and rebuilding the tables grows with the study)."""
        self._attach()
        if self._dirty:
            self._write(force=len(self._completed_trials) >= len(self._ot_trials))
        if self._journal is not None:
            self._journal.flush()

    def _attach(self) -> None:
        """First use after a restore: cut the journal back to the snapshot's mark, then re-read the study."""
        if self._journal_mark is None:
            return
        mark, self._journal_mark = self._journal_mark, None
        dropped = self._journal.truncate(mark)
        reopen(self._storage)
        n = len(self._ot_study.get_trials(deepcopy=False))
        log.info("search: study restored from %s: %d samples%s", self._journal.path, n,
                 f"; dropped {dropped} bytes written after the last snapshot" if dropped else "")

    # -- sampling ------------------------------------------------------------------------------------------
    def _exhausted(self) -> bool:
        """True once every feasible configuration has been launched (only counted for small spaces)."""
        if self._feasible_total is None:
            card = self.space.cardinality
            self._feasible_total = (sum(self.space.feasible(b) for b in self.space.enumerate())
                                    if card <= 100_000 else -1)
        return 0 <= self._feasible_total <= len(self.seen)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self._attach()
        if trial_id in self._ot_trials:  # asked again for the same trial: same answer
            t = self._ot_trials[trial_id]
            return {"number": t.number, "bits": dict(t.user_attrs["bits"])}
        for _ in range(self.max_skips):
            if self._exhausted():
                log.info("search: every feasible configuration has been tried; stopping")
                return Searcher.FINISHED
            ot_trial = self._ot_study.ask()
            bits = self._space(ot_trial)  # define_space: suggests and sets the budgets' constraints
            for k, v in (("bits", bits), (SIZE, self.space.size_mb(bits)), (BOPS, self.space.gbops(bits)),
                         ("avg_bits", self.space.avg_bits(bits))):
                if k != BOPS or math.isfinite(v):  # a space restored from before BOPs has none
                    ot_trial.set_user_attr(k, v)
            key = tuple(bits[n] for n in self.space.layers)
            if not self.space.feasible(bits):
                self._tell_skipped(ot_trial, "infeasible", TrialState.COMPLETE, [0.0, self.space.cost_of(bits)])
                continue
            if key in self.seen:
                self._tell_duplicate(ot_trial, self.seen[key])
                continue
            self.seen[key] = ot_trial.number
            ot_trial.set_user_attr("trial_id", trial_id)
            ot_trial.set_user_attr("status", "running")
            self._ot_trials[trial_id] = ot_trial
            self._write(force=False)
            return {"number": ot_trial.number, "bits": bits}
        log.warning("search: %d samples in a row were over budget or already evaluated; stopping the search "
                    "early (raise the budget or widen quant.bits)", self.max_skips)
        return Searcher.FINISHED

    def _tell_skipped(self, ot_trial: Any, status: str, state: TrialState, values: list[float] | None) -> None:
        ot_trial.set_user_attr("status", status)
        self._ot_study.tell(ot_trial, values, state=state)
        self.skipped[status] += 1
        self._write(force=False)

    def _tell_duplicate(self, ot_trial: Any, number: int) -> None:
        prev = self._frozen(number)
        ot_trial.set_user_attr("duplicate_of", number)
        for k in (ACC, "epoch"):
            if k in prev.user_attrs:
                ot_trial.set_user_attr(k, prev.user_attrs[k])
        if prev.state == TrialState.COMPLETE and prev.values is not None:
            self._tell_skipped(ot_trial, "duplicate", TrialState.COMPLETE, list(prev.values))
        else:  # still running, pruned or failed: nothing new to learn from it
            self._tell_skipped(ot_trial, "duplicate", TrialState.PRUNED, None)

    # -- results -------------------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._attach()
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        if trial_id in self._completed_trials:
            if self._failed(ot_trial):  # an errored trial resumed by Tuner.restore(resume_errored=True)
                self.revived.setdefault(trial_id, {}).update(result)
            return
        self._record(ot_trial, result)
        self._write(force=False)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._attach()
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        if trial_id in self._completed_trials:
            if self._failed(ot_trial) and not error and trial_id in self.revived:
                self._add_revived(trial_id, ot_trial, {**self.revived.pop(trial_id), **(result or {})})
            return
        if result:
            self._record(ot_trial, result)
        attrs = ot_trial.user_attrs
        acc, epoch = attrs.get(ACC), int(attrs.get("epoch", 0))
        if error:
            status, state, values = "error", TrialState.FAIL, None
        elif acc is not None and math.isfinite(acc) and epoch >= self.trial_epochs:
            status, state, values = "completed", TrialState.COMPLETE, [float(acc), float(attrs[self.cost_column])]
        else:  # stopped early by the scheduler (ASHA): not a measurement of the configuration
            status, state, values = "pruned", TrialState.PRUNED, None
        self.finished_seq += 1
        ot_trial.set_user_attr("status", status)
        ot_trial.set_user_attr("finished_seq", self.finished_seq)
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except Exception as err:  # noqa: BLE001 - e.g. a NaN accuracy: keep the search going
            log.warning("search: could not tell trial %s to Optuna: %s", ot_trial.number, err)
        self._completed_trials.add(trial_id)
        log.info("search: trial %d (%s) %s: val_acc=%s size=%.4f MB, %.4g GBOPs after %d epoch(s)", ot_trial.number,
                 trial_id, status, f"{acc:.2f}" if acc is not None else "-", attrs[SIZE], attrs.get(BOPS, math.nan),
                 epoch)
        self._write(force=False)

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        return next(t for t in self._ot_study.get_trials(deepcopy=False) if t.number == number)

    def _failed(self, ot_trial: Any) -> bool:
        return self._frozen(ot_trial.number).state == TrialState.FAIL

    def _add_revived(self, trial_id: str, old: Any, result: dict[str, Any]) -> None:
        """Optuna cannot re-tell a FAIL trial: add a finished copy (`retry_of` the old number) instead."""
        frozen = self._frozen(old.number)
        acc, epoch = result.get(ACC), int(result.get("epoch", 0))
        done = acc is not None and math.isfinite(acc) and epoch >= self.trial_epochs
        self.finished_seq += 1
        attrs = {**frozen.user_attrs, "status": "completed" if done else "pruned", "retry_of": frozen.number,
                 "finished_seq": self.finished_seq, **{k: result[k] for k in REPORTED if k in result}}
        self._ot_study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE if done else TrialState.PRUNED,
            values=[float(acc), float(attrs[self.cost_column])] if done else None, params=frozen.params,
            distributions=frozen.distributions, user_attrs=attrs, constraints=frozen.constraints))
        log.info("search: errored trial %d (%s) was resumed and %s", frozen.number, trial_id, attrs["status"])
        self._write(force=False)

    def _record(self, ot_trial: Any, result: dict[str, Any]) -> None:
        for k in REPORTED:
            if k in result and result[k] is not None:
                ot_trial.set_user_attr(k, float(result[k]) if k != "epoch" else int(result[k]))
        if "wall_s" not in result and "time_total_s" in result:
            ot_trial.set_user_attr("wall_s", float(result["time_total_s"]))

    def _write(self, force: bool) -> None:
        """Rebuild the tables (at most once per `writer.min_interval_s` unless forced); `flush` catches up."""
        self._dirty = True
        if self.writer is not None:
            try:
                if self.writer.write(self._ot_study, force=force) is not None:
                    self._dirty = False
            except OSError as err:  # a full disk must not kill the search; the next write retries
                log.warning("search: could not write results: %s", err)
