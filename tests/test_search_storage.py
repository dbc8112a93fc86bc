"""The search's Optuna study on disk (optuna-journal.log), its agreement with the restored searcher after a
SIGKILL, `kdsearch dashboard`, and a search's console output (no library noise, no ANSI codes)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from kdsearch.pareto import ACC, SIZE
from kdsearch.search import BudgetSearch, make_sampler
from kdsearch.search.storage import JOURNAL, STUDY_NAME, SnapshotJournal, journal_storage
from kdsearch.search.synthetic import synthetic_accuracy, toy_space

ROOT = Path(__file__).resolve().parent.parent
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _on_disk(path: Path) -> optuna.Study:
    return optuna.load_study(storage=journal_storage(path), study_name=STUDY_NAME)


def _rows(study: optuna.Study) -> list[tuple]:
    """What must agree between two views of a study: number, params, state, values, the Tune trial."""
    return [(t.number, t.params, t.state, t.values, t.user_attrs.get("trial_id"))
            for t in study.get_trials(deepcopy=False)]


def _finish(search: BudgetSearch, trial_id: str, bits: dict[str, int]) -> None:
    res = {"epoch": 1, ACC: synthetic_accuracy(bits, 1, 1), SIZE: search.space.size_mb(bits)}
    search.on_trial_result(trial_id, res)
    search.on_trial_complete(trial_id, res)


def test_snapshot_journal_writes_at_flush_and_cuts_back_to_a_mark(tmp_path) -> None:
    path = tmp_path / JOURNAL
    backend = SnapshotJournal(path, flush_s=3600)
    study = optuna.create_study(storage=optuna.storages.JournalStorage(backend), study_name=STUDY_NAME,
                                directions=["maximize", "minimize"])
    for i in range(3):
        study.tell(study.ask({"x": optuna.distributions.IntDistribution(0, 9)}), [float(i), 1.0])
    assert path.stat().st_size == 0 and len(study.trials) == 3  # buffered: the file has nothing yet
    mark = backend.flush()
    assert [t.values for t in _on_disk(path).trials] == [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
    study.tell(study.ask(), state=TrialState.PRUNED)
    pickle.dumps(study)  # pickling flushes: a pickled study never refers to logs that are not on disk
    assert len(_on_disk(path).trials) == 4 and path.stat().st_size > mark
    assert backend.truncate(mark) > 0
    assert len(_on_disk(path).trials) == 3
    with pytest.raises(RuntimeError, match="fewer than"):
        backend.truncate(mark + 1)


def test_restored_searcher_and_journal_hold_the_snapshot(tmp_path) -> None:
    """Tune's restore, played by hand: unpickle the searcher Tune pickled at the start (tuner.pkl), restore the
    snapshot state into it. Work after the snapshot, flushed to the journal before the 'crash', is cut."""
    path = tmp_path / JOURNAL
    space = toy_space(layers=5, budget_fraction=0.5)
    search = BudgetSearch(space, sampler=make_sampler("tpe", 0, 12), trial_epochs=1, journal=path)
    at_start = pickle.dumps(search)  # what tuner.pkl holds
    for i in range(4):
        _finish(search, f"t{i}", search.suggest(f"t{i}")["bits"])
    running = search.suggest("running")  # a trial running at the snapshot
    search.save(str(tmp_path / "searcher-state.pkl"))
    snapshot = _rows(search.study)
    after = [search.suggest(f"late{i}") for i in range(3)]  # sampled after the snapshot ...
    _finish(search, "running", running["bits"])  # ... and a tell Tune will replay
    search.flush()  # the journal went on past the snapshot, then the driver died
    assert len(_on_disk(path).trials) > len(snapshot)

    restored = pickle.loads(at_start)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    assert _rows(restored.study) == snapshot
    assert _rows(_on_disk(path)) == snapshot  # cut back on first use, before anything read the study
    assert restored.study.trials[running["number"]].state == TrialState.RUNNING
    again = [restored.suggest(f"late{i}") for i in range(3)]
    assert again == after  # the restored sampler draws the same samples (their trial records are reused)
    _finish(restored, "running", running["bits"])  # Tune resumes the running trial: told once
    restored.flush()
    assert _rows(_on_disk(path)) == _rows(restored.study)
    assert len({r[0] for r in _rows(restored.study)}) == len(_rows(restored.study))  # no number twice

    only_start = pickle.loads(at_start)  # no searcher snapshot at all: back to the journal of tuner.pkl
    assert _rows(only_start.study) == [] and _rows(_on_disk(path)) == []


# ---- SIGKILL of a running search, resume, and the storage on disk ---------------------------------------

def _snapshot_mark(exp: Path) -> int | None:
    """The journal mark in the searcher snapshot a restore would use (Tune restores the newest file)."""
    files = sorted(exp.glob("searcher-state-*.pkl"))
    try:
        return pickle.loads(files[-1].read_bytes())["_journal_mark"] if files else None
    except (EOFError, pickle.UnpicklingError, KeyError, OSError):  # Tune's syncer is writing it
        return None


def _completed(out: Path) -> int:
    try:
        return int((pd.read_parquet(out / "results.parquet")["status"] == "completed").sum())
    except (FileNotFoundError, OSError, ValueError):
        return 0


def _search_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _kill_while_journal_ahead(cmd: list[str], out: Path, env: dict[str, str], log: Path, min_done: int) -> int:
    """Start (or resume) the search and SIGKILL it once >= `min_done` trials completed and the journal holds
    writes after the snapshot a restore would use; return by how many bytes (0: a snapshot won the race)."""
    journal = out / JOURNAL
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 150
    while proc.poll() is None and time.monotonic() < deadline:
        if _completed(out) >= min_done:
            mark = _snapshot_mark(out / "tune")
            if mark is not None and journal.is_file() and journal.stat().st_size > mark:
                break
        time.sleep(0.05)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its raylet/GCS and the trial workers
    proc.wait()
    assert alive, log.read_text()[-3000:]
    mark = _snapshot_mark(out / "tune")
    return journal.stat().st_size - mark if mark is not None else 0


def test_sigkill_resume_storage_holds_the_restored_searchers_trials(tmp_path) -> None:
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "kdsearch.search.synthetic", str(out), "--trials", "8", "--epochs", "3",
           "--epoch-s", "0.3", "--cpus", "2", "--no-asha"]
    env, log = _search_env(), tmp_path / "killed.log"
    ahead = 0
    for attempt in range(3):  # a snapshot landing between the check and the kill leaves nothing to cut: again
        ahead = _kill_while_journal_ahead(cmd, out, env, log, min_done=2 + attempt)
        if ahead > 0:
            break
    assert ahead > 0, "never killed the search while its journal was ahead of the snapshot"
    assert _completed(out) < 8

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert re.search(r"study restored from .*: \d+ samples; dropped \d+ bytes", rerun.stderr), rerun.stderr[-3000:]

    study = _on_disk(out / JOURNAL)
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == list(range(len(trials)))
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # the restored searcher's view: its tables, rebuilt from its own (in-memory) study at its last snapshot
    table = pd.read_parquet(out / "results.parquet").set_index("number")
    assert sorted(table.index) == sorted(trials)
    state_of = {"completed": TrialState.COMPLETE, "infeasible": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                "error": TrialState.FAIL}
    for number, row in table.iterrows():
        t = trials[number]
        assert t.params == {n: int(row[f"bits.{n}"]) for n in t.params}
        assert t.user_attrs.get("trial_id", "") == row["trial_id"]
        if row["status"] in state_of:
            assert t.state == state_of[row["status"]], (number, row["status"], t.state)
        if row["status"] == "completed":
            assert t.values == pytest.approx([row[ACC], row[SIZE]])
    # the restored searcher's own bookkeeping (plain data in its final snapshot) and Tune's trials
    state = pickle.loads(sorted((out / "tune").glob("searcher-state-*.pkl"))[-1].read_bytes())
    launched = {t.user_attrs["trial_id"]: t.number for t in study.trials if t.user_attrs.get("trial_id")}
    assert {tid: ot.number for tid, ot in state["_ot_trials"].items()} == launched
    assert set(state["_completed_trials"]) == set(launched) and len(launched) == 8
    tune_trials = {}
    for f in (out / "tune").glob("trial_*/result.json"):
        last = json.loads(f.read_text().strip().splitlines()[-1])
        tune_trials[last["trial_id"]] = last
    assert set(tune_trials) == set(launched)
    for tid, last in tune_trials.items():  # each Tune trial is one Optuna trial, told its last result once
        t = trials[launched[tid]]
        assert last["config"]["number"] == t.number and t.state == TrialState.COMPLETE
        assert t.values == pytest.approx([last[ACC], last[SIZE]])


# ---- the dashboard command ---------------------------------------------------------------------------------

def _run_dir_with_study(tmp_path: Path, trials: int = 3) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "search").mkdir(parents=True)
    (run_dir / "spec.yaml").write_text("name: run\n")
    space = toy_space(layers=4, budget_fraction=0.6)
    search = BudgetSearch(space, sampler=make_sampler("random", 0, trials), trial_epochs=1,
                          journal=run_dir / "search" / JOURNAL)
    for i in range(trials):
        _finish(search, f"t{i}", search.suggest(f"t{i}")["bits"])
    search.flush()
    return run_dir


def test_dashboard_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch, capsys) -> None:
    from kdsearch.cli import main

    run_dir = _run_dir_with_study(tmp_path)
    capsys.readouterr()  # what building the study logged is not the command's output
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # unimportable, whether installed here or not
    assert main(["dashboard", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == ['kdsearch: error: the dashboard needs optuna-dashboard: '
                                                      'pip install "kdsearch[dashboard]"']
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "spec.yaml").write_text("name: run2\n")
    for bad, says in ((tmp_path / "nope", "not found"), (tmp_path, "not a kdsearch run directory"),
                      (tmp_path / "run2", "no Optuna study yet")):
        assert main(["dashboard", str(bad)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and says in err, err


def test_dashboard_serves_the_runs_study(tmp_path) -> None:
    pytest.importorskip("optuna_dashboard")
    run_dir = _run_dir_with_study(tmp_path, trials=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kdsearch", "dashboard", str(run_dir), "--port", str(port)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, studies = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    studies = json.loads(resp.read())["study_summaries"]
                break
            except OSError:
                time.sleep(0.2)
        assert studies is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        (study,) = studies
        assert study["study_name"] == STUDY_NAME
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=5) as resp:
            assert len(json.loads(resp.read())["trials"]) == len(_on_disk(run_dir / "search" / JOURNAL).trials) >= 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- a search's console output -------------------------------------------------------------------------------

NOISE = ("Configuration for experiment", "View detailed results here", "To visualize your results with TensorBoard",
         "Checkpoint successfully created", "Restored on", "Token authentication is enabled",
         "A new study created", "Trial status:")


def test_search_console_is_ours_and_tensorboard_files_are_in_the_run_dir(tmp_path) -> None:
    """A small search in a subprocess (output to pipes, not a terminal), with Ray's default token auth."""
    out = tmp_path / "search"
    env = _search_env()
    env.pop("RAY_AUTH_MODE", None)  # Ray's default: token auth, which logs its banner at every ray.init
    env.pop("RAY_COLOR_PREFIX", None)
    env["HOME"] = str(tmp_path / "home")  # Ray keeps the token it generates in ~/.ray
    (tmp_path / "home").mkdir()
    driver = (  # Ray as `kdsearch run` starts it, one line printed by a worker (Ray prefixes it), then the search
        "import ray; from kdsearch.raycluster import ensure_ray; from kdsearch.search.synthetic import main\n"
        "ensure_ray('local', num_cpus=2)\n"
        "ray.get(ray.remote(lambda: print('hello from a worker', flush=True)).remote())\n"
        f"main([{str(out)!r}, '--trials', '3', '--epochs', '2', '--epoch-s', '0.05', '--no-asha'])\n")
    r = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                       start_new_session=True)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert re.search(r"^\(<lambda> pid=\d+\) hello from a worker$", text, re.M), text[-3000:]
    assert "\x1b[" not in text
    assert [n for n in NOISE if n in text] == []
    assert len(re.findall(r"kdsearch\.search: search: trial \d+ \(\w+\) completed", text)) == 3
    assert f"tensorboard --logdir {out}" in text
    events = list((out / "tune").glob("trial_*/events.out.tfevents.*"))
    assert len(events) == 3  # one per launched trial, in the run directory (not Ray's session folder)
