"""The bit-width search: space and size arithmetic, the searcher's bookkeeping with Optuna, a real Tune run
with ASHA, and a SIGKILL of a running search followed by a restore (its own Ray, in a subprocess)."""

from __future__ import annotations

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from kdsearch.models import create_model
from kdsearch.quant import BitConfig, model_bops, model_size
from kdsearch.search import (BudgetSearch, build_space, define_space, make_sampler, pareto_table, read_results,
                             run_search, uniform_configs, warm_start_points)
from kdsearch.search.synthetic import SyntheticPayload, synthetic_accuracy, synthetic_trial, toy_space
from kdsearch.spec import QuantConfig, SearchConfig

ROOT = Path(__file__).resolve().parent.parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def resnet8():
    return create_model("resnet8", num_classes=10)


def test_space_size_is_model_size(resnet8) -> None:
    """The constraint's arithmetic equals model_size on random configurations (one size model)."""
    quant = QuantConfig(bits=(8, 4, 2), act_bits=8, pin={"first": 8, "last": 8})
    space = build_space(resnet8, quant, budget_mb=0.06)
    rng = np.random.default_rng(0)
    for _ in range(12):
        bits = {n: int(rng.choice(ch)) for n, ch in zip(space.layers, space.choices)}
        rep = model_size(resnet8, BitConfig(bits), act_bits=8)
        assert space.size_bytes(bits) == rep.total_bytes
        assert space.avg_bits(bits) == pytest.approx(rep.avg_bits)
    assert space.fixed == {space.layers[0]: 8, space.layers[-1]: 8}


def test_feasible_fraction_and_uniform_feasible_samples(resnet8) -> None:
    """The fraction of the space that fits, by sampling, agrees with exhaustive enumeration; the random arm's
    feasible samples all fit and are uniform over the feasible configurations (none favoured, few missed)."""
    import dataclasses
    from collections import Counter

    space = build_space(resnet8, QuantConfig(bits=(8, 4, 2), pin={"first": 8, "last": 8}), budget_mb=0.05)
    configs = list(space.enumerate())
    feasible = [b for b in configs if space.feasible(b)]
    exact = len(feasible) / len(configs)
    assert 0 < exact < 1
    assert space.feasible_fraction(100_000, seed=1) == pytest.approx(exact, abs=0.01)
    n = 4 * len(feasible)
    draws = space.sample_feasible(n, seed=2)
    assert len(draws) == n and all(space.feasible(b) for b in draws) and draws == space.sample_feasible(n, seed=2)
    counts = Counter(tuple(b.values()) for b in draws)
    assert len(counts) > 0.9 * len(feasible)  # 4 draws each on average: a missed one has probability ~e^-4
    assert max(counts.values()) <= 16
    tight = dataclasses.replace(space, budget_mb=space.min_bytes / 1e6)  # only the smallest configuration fits
    with pytest.raises(ValueError, match="draws found"):
        tight.sample_feasible(10**6, max_draws=200_000)


def test_exclusions_pins_and_constraint(resnet8) -> None:
    quant = QuantConfig(bits=(8, 4, 2), pin={"first": 8, "last": 8})
    layer = "layer1.0.conv1"
    space = build_space(resnet8, quant, budget_mb=0.05, excluded={layer: [2, 4]})
    assert dict(zip(space.layers, space.choices))[layer] == (8,)  # only 8 left: fixed, not sampled
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        t = study.ask()
        bits = define_space(t, space)
        assert layer not in t.params and bits[layer] == 8 and bits[space.layers[0]] == 8
        over = t.constraints["size_over_budget_mb"]
        assert (over <= 0) == space.feasible(bits)
        assert over == pytest.approx((space.size_bytes(bits) - space.budget_bytes) / 1e6)
    with pytest.raises(ValueError, match="budgets_mb"):
        build_space(resnet8, quant, budget_mb=0.001)
    with pytest.raises(ValueError, match="unknown layers"):
        build_space(resnet8, quant, budget_mb=0.05, excluded={"nope": [2]})


def test_space_bops_is_model_bops_and_both_budgets_constrain(resnet8) -> None:
    """The BOPs constraint's arithmetic equals model_bops (on the data's image shape); with both budgets a
    configuration is feasible only within both, and Optuna gets one constraint per budget."""
    quant = QuantConfig(bits=(8, 4, 2), act_bits=8, pin={"first": 8, "last": 8})
    space = build_space(resnet8, quant, budget_mb=0.05, budget_gbops=0.45, input_size=(3, 40, 24))
    assert space.cost == "size" and space.budget_bops == 450_000_000
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        t = study.ask()
        bits = define_space(t, space)
        assert space.bops_total(bits) == model_bops(resnet8, BitConfig(bits), act_bits=8,
                                                    input_size=(3, 40, 24)).total_bops
        size_ok = t.constraints["size_over_budget_mb"] <= 0
        bops_ok = t.constraints["bops_over_budget_gbops"] <= 0
        assert bops_ok == (space.bops_total(bits) <= space.budget_bops)
        assert space.feasible(bits) == (size_ok and bops_ok)
        seen.add((size_ok, bops_ok))
    assert len(seen) >= 3  # each budget rules out configurations the other allows
    alone = build_space(resnet8, quant, budget_mb=None, budget_gbops=0.45, input_size=(3, 40, 24))
    assert alone.cost == "bops" and alone.budget == 0.45 and alone.budget_bytes is None
    t = study.ask()
    define_space(t, alone)
    assert list(t.constraints) == ["bops_over_budget_gbops"]
    with pytest.raises(ValueError, match="budgets_gbops.*below the smallest reachable BOPs"):
        build_space(resnet8, quant, budget_mb=None, budget_gbops=0.1)


def test_space_and_writer_pickled_before_bops_restore_as_size_only(tmp_path) -> None:
    """A Tune experiment snapshot from before BOPs holds a space and a writer without the new attributes."""
    from kdsearch.search.results import ResultsWriter

    space = toy_space(layers=4, budget_fraction=0.6)
    old = pickle.loads(pickle.dumps(space))
    for k in ("bops", "budget_gbops"):
        del old.__dict__[k]
    bits = {n: 8 for n in old.layers}
    assert old.cost == "size" and old.violations(bits).keys() == {"size_over_budget_mb"}
    assert old.feasible(bits) == space.feasible(bits) and old.bops_total(bits) is None
    writer = ResultsWriter(tmp_path, space.layers, space.budget_mb)
    state = writer.__getstate__()
    del state["budget_gbops"]
    restored = ResultsWriter.__new__(ResultsWriter)
    restored.__setstate__(state)
    assert restored.cost == "size_mb" and restored.budget == space.budget_mb


def test_warm_starts_are_snapped_and_kept_in_budget(resnet8) -> None:
    quant = QuantConfig(bits=(8, 4, 2), pin={"first": 8, "last": 8})
    layer = "layer1.0.conv1"
    space = build_space(resnet8, quant, budget_mb=0.05, excluded={layer: [4]})
    solver = {n: 4 for n in space.layers} | {"layer2.0.conv1": 2}  # 4 is excluded for `layer`: rounded up to 8
    points, dropped = warm_start_points(space, [solver, solver, *uniform_configs(space, (8, 4, 2))])
    assert dropped == 1  # uniform 8 is over 0.05 MB
    assert len(points) == 3  # the duplicate solver config is dropped
    assert points[0][layer] == 8 and all(layer in p for p in points)
    search = BudgetSearch(space, sampler=make_sampler("tpe", 0, 8), trial_epochs=1, points_to_evaluate=points)
    for i, p in enumerate(points):  # the enqueued warm starts come first, exactly
        cfg = search.suggest(f"t{i}")
        assert {n: cfg["bits"][n] for n in p} == p


def _drive(search: BudgetSearch, n: int, epochs: int, prune_every: int = 0) -> list[dict]:
    """Play Tune: suggest n trials, report, complete (some stopped early, one failing)."""
    out = []
    for i in range(n):
        cfg = search.suggest(f"trial{i}")
        if cfg == "FINISHED":
            break
        stop = epochs - 1 if prune_every and i % prune_every == 1 else epochs
        for e in range(1, stop + 1):
            res = {"epoch": e, "val_acc": synthetic_accuracy(cfg["bits"], e, epochs), "size_mb": 0.0,
                   "time_total_s": 0.1 * e}
            res["size_mb"] = search.space.size_mb(cfg["bits"])
            search.on_trial_result(f"trial{i}", res)
        search.on_trial_complete(f"trial{i}", result=res, error=(i == 2))
        out.append(cfg)
    return out


def test_searcher_tells_optuna_pruned_infeasible_and_failed(tmp_path) -> None:
    from kdsearch.search.results import ResultsWriter

    space = toy_space(layers=5, budget_fraction=0.45)
    writer = ResultsWriter(tmp_path, space.layers, space.budget_mb)
    search = BudgetSearch(space, sampler=make_sampler("tpe", 1, 12), trial_epochs=3, writer=writer)
    configs = _drive(search, 12, epochs=3, prune_every=3)
    search.flush()  # the tables are rebuilt at most once a second, and at every Tune snapshot (save)
    assert len(configs) == 12
    assert all(space.feasible(c["bits"]) for c in configs)  # nothing over budget was launched
    states = {t.number: t for t in search.study.trials}
    df = read_results(tmp_path).set_index("number")
    assert search.skipped["infeasible"] == (df["status"] == "infeasible").sum() > 0
    for num, row in df.iterrows():
        t = states[num]
        if row["status"] == "pruned":  # stopped early: PRUNED, no values (not COMPLETE with its early acc)
            assert t.state == TrialState.PRUNED and t.values is None and row["epochs"] < 3
        elif row["status"] == "completed":
            assert t.state == TrialState.COMPLETE and t.values[0] == pytest.approx(row["val_acc"]) and row["epochs"] == 3
        elif row["status"] == "error":
            assert t.state == TrialState.FAIL
        elif row["status"] == "infeasible":
            assert t.constraints["size_over_budget_mb"] > 0 and row["size_mb"] > space.budget_mb
    assert (df["status"] == "pruned").sum() == 4 and (df["status"] == "error").sum() == 1
    # a restore with resume_errored=True runs the errored trial again: its outcome lands on a copy
    failed = df.index[df["status"] == "error"][0]
    bits = search.study.trials[failed].user_attrs["bits"]
    search.on_trial_result("trial2", {"epoch": 3, "val_acc": 77.0, "size_mb": space.size_mb(bits)})
    search.on_trial_complete("trial2", {"epoch": 3, "val_acc": 77.0, "size_mb": space.size_mb(bits)})
    search.flush()
    after = read_results(tmp_path).set_index("number")
    copy = after[after["retry_of"] == failed]
    assert after.loc[failed, "status"] == "retried" and copy["status"].tolist() == ["completed"]
    assert search.study.trials[copy.index[0]].values == [77.0, space.size_mb(bits)]
    hv = df.loc[df["status"] == "completed"].sort_values("finished_seq")["hypervolume"].to_numpy()
    assert np.all(np.diff(hv) >= 0) and len(hv) == 7
    assert len(pareto_table(tmp_path)) >= 1


@pytest.mark.parametrize("size_fraction", [None, 0.7])
def test_searcher_under_a_bops_budget(tmp_path, size_fraction) -> None:
    """A BOPs budget alone (the second objective becomes GBOPs) or beside a size budget (both constrain)."""
    from kdsearch.search.results import ResultsWriter, read_summary

    space = toy_space(layers=5, budget_fraction=size_fraction, gbops_fraction=0.45)
    writer = ResultsWriter(tmp_path, space.layers, space.budget_mb, budget_gbops=space.budget_gbops)
    search = BudgetSearch(space, sampler=make_sampler("tpe", 1, 10), trial_epochs=2, writer=writer)
    configs = _drive(search, 10, epochs=2)
    search.flush()
    assert configs and all(space.feasible(c["bits"]) for c in configs)
    df = read_results(tmp_path)
    done = df[df["status"] == "completed"]
    assert len(done) and (done["gbops"] <= space.budget_gbops).all()
    assert done["gbops"].tolist() == [space.gbops(BitConfig.from_row(r)) for _, r in done.iterrows()]
    cost = "gbops" if size_fraction is None else "size_mb"
    states = {t.number: t for t in search.study.trials}
    for _, row in done.iterrows():
        assert states[row["number"]].values[1] == pytest.approx(row[cost])
    for _, row in df[df["status"] == "infeasible"].iterrows():
        c = states[row["number"]].constraints
        assert row["gbops"] > space.budget_gbops or row["size_mb"] > space.budget_mb
        assert c["bops_over_budget_gbops"] > 0 or c["size_over_budget_mb"] > 0
    summary = read_summary(tmp_path)
    assert summary["cost"] == cost and summary["budget_gbops"] == space.budget_gbops
    assert summary["reference_point"][1] == pytest.approx(1.1 * (space.budget_gbops if size_fraction is None
                                                                 else space.budget_mb))
    assert pd.read_parquet(tmp_path / "pareto.parquet")[cost].is_monotonic_increasing
    by_bops, by_size = pareto_table(tmp_path, cost="bops"), pareto_table(tmp_path, cost="size")
    assert by_bops["gbops"].is_monotonic_increasing and by_size["size_mb"].is_monotonic_increasing
    assert by_bops["val_acc"].is_monotonic_increasing and by_size["val_acc"].is_monotonic_increasing
    assert len(pareto_table(tmp_path)) == len(by_bops if size_fraction is None else by_size)
    with pytest.raises(ValueError, match="cost must be one of"):
        pareto_table(tmp_path, cost="flops")


def test_searcher_skips_duplicates_and_stops_when_exhausted() -> None:
    space = toy_space(layers=2, budget_fraction=1.0, bits=(8, 4))  # 4 configurations, all feasible
    search = BudgetSearch(space, sampler=make_sampler("random", 0, 10), trial_epochs=1)
    configs = _drive(search, 10, epochs=1)
    keys = [tuple(c["bits"].values()) for c in configs]
    assert len(keys) == len(set(keys)) == 4  # each configuration trained once, then FINISHED
    dups = [t for t in search.study.trials if t.user_attrs.get("status") == "duplicate"]
    assert len(dups) == search.skipped["duplicate"]
    for t in dups:  # told the known outcome of the trial that trained it (PRUNED when it has none)
        first = search.study.trials[t.user_attrs["duplicate_of"]]
        if first.state == TrialState.COMPLETE:
            assert t.state == TrialState.COMPLETE and t.values == first.values
        else:
            assert t.state == TrialState.PRUNED


def test_tune_search_with_asha(ray_session, tmp_path) -> None:
    """A real Tune run: ASHA stops trials early and Optuna (in the searcher's saved state) sees them PRUNED."""
    space = toy_space(layers=6, budget_fraction=0.55)
    cfg = SearchConfig(budgets_mb=(space.budget_mb,), num_trials=8, trial_epochs=3, grace_period=1, sampler="tpe",
                       cpus_per_trial=1, max_concurrent=2)
    payload = SyntheticPayload(str(tmp_path / "trials"), space, epochs=3, epoch_s=0.02, fail_at=2)
    summary = run_search(space, cfg, out_dir=tmp_path, trainable=synthetic_trial, payload=payload, seed=0)
    df = read_results(tmp_path)
    launched = df[df["trial_id"] != ""]
    assert summary["launched"] == len(launched) == 8
    assert (launched["size_mb"] <= space.budget_mb).all()
    assert set(launched["status"]) <= {"completed", "pruned"} and (launched["status"] == "pruned").any()
    state = pickle.loads(Path(glob.glob(str(tmp_path / "tune" / "searcher-state-*.pkl"))[0]).read_bytes())
    trials = {t.number: t for t in state["_ot_study"].trials}
    for _, row in launched.iterrows():
        t = trials[row["number"]]
        if row["status"] == "pruned":
            assert t.state == TrialState.PRUNED and row["epochs"] < 3
        else:
            assert t.state == TrialState.COMPLETE and row["epochs"] == 3
    assert (tmp_path / "pareto.parquet").is_file() and summary["hypervolume"] > 0
    attempts = {n: json.loads((tmp_path / "trials" / f"{n:05d}" / "trial.json").read_text())["attempts"]
                for n in launched["number"]}
    retried = {n: a for n, a in attempts.items() if len(a) > 1}
    assert len(retried) == 1  # one trial failed in epoch 2; Tune retried it from its epoch-1 checkpoint
    (a,) = retried.values()
    assert [x["start_epoch"] for x in a] == [0, 1] and a[0]["trained"] == 1


def _counts(out: Path) -> int:
    try:
        df = pd.read_parquet(out / "results.parquet")
    except (FileNotFoundError, OSError, ValueError):
        return 0
    return int(df["status"].isin(["completed", "pruned"]).sum())


def test_sigkill_then_restore(tmp_path) -> None:
    """Kill -9 a running search (driver and its Ray), rerun it: exactly num_trials trials, none trained twice."""
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "kdsearch.search.synthetic", str(out), "--trials", "6", "--epochs", "3",
           "--epoch-s", "0.25", "--cpus", "2", "--no-asha"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    log1 = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while _counts(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its raylet/GCS and the trial workers: one process group
    proc.wait()
    finished_before = {int(Path(p).parent.name) for p in glob.glob(str(out / "trials" / "*" / "trial.json"))
                       if json.loads(Path(p).read_text())["final"] is not None}
    assert finished_before and _counts(out) < 6

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "restoring the experiment" in rerun.stdout + rerun.stderr
    df = pd.read_parquet(out / "results.parquet")
    launched = df[df["status"].isin(["running", "completed", "pruned", "error"])]
    assert len(launched) == 6 and (launched["status"] == "completed").all()
    for number in launched["number"]:
        rec = json.loads((out / "trials" / f"{number:05d}" / "trial.json").read_text())
        trained = sum(a["trained"] for a in rec["attempts"])
        assert trained <= 3 and rec["final"]["epoch"] == 3  # no epoch trained twice; resumed ones finished
        if number in finished_before:  # finished before the kill: never trained again
            assert all(a["trained"] == 0 for a in rec["attempts"][1:])


def test_hypervolume_history_is_the_prefix_history_and_starts_over_when_not_extended() -> None:
    """The writer's remembered history equals pareto.hypervolume_history at every rebuild."""
    from kdsearch.pareto import hypervolume_history, reference_point
    from kdsearch.search.results import HypervolumeHistory

    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(40, 90, 40), rng.uniform(0.01, 0.05, 40)])
    ref = reference_point(0.05)
    hist = HypervolumeHistory(ref)
    for n in (0, 1, 7, 8, 25, 40):  # the completed trials so far, in finished order
        assert hist(pts[:n]) == pytest.approx(hypervolume_history(pts[:n], ref))
    other = pts[::-1][:10]  # not an extension of what it saw (a restored, shorter study): recomputed
    assert hist(other) == pytest.approx(hypervolume_history(other, ref))

