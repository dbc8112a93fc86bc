"""Early training estimates (`kdsearch.eta`): a model's own, the stage's (`progress.stage_eta`), `kdsearch status`."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from kdsearch import eta
from kdsearch.eta import StepClock, eta_path
from kdsearch.progress import EtaReporter, stage_eta
from kdsearch.status import stage_rows


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(eta.time, "perf_counter", c)
    return c


def test_a_long_model_logs_an_early_estimate_then_one_after_a_full_epoch(tmp_path, clock, caplog) -> None:
    path = eta_path(tmp_path / "teachers" / "wrn.ckpt")
    path.parent.mkdir()
    c = StepClock("wrn s0", "cpu", steps_per_epoch=100, total_steps=10_000, path=path)
    steps = [10.0] + [2.0] * 99  # a slow first step (warm-up), then 2 s per step
    with caplog.at_level(logging.INFO, logger="kdsearch.eta"):
        for step, dt in enumerate(steps):
            clock.now += dt
            c.tick(step)
            if step == 10:  # 30 s after the start: one estimate, from the steps after the first
                assert len(caplog.messages) == 1
    early, epoch = caplog.messages
    assert early.startswith("ETA wrn s0 (early estimate): 2 s/step on cpu, 9989 of 10000 steps left: about 5h 33m")
    assert epoch.startswith("ETA wrn s0 (after a full epoch): 2 s/step on cpu, 9900 of 10000 steps left")
    e = json.loads(path.read_text())
    assert e["model"] == "wrn s0" and not e["done"] and e["ends_at"] == pytest.approx(time.time() + 9900 * 2, abs=5)
    c.finish()
    assert json.loads(path.read_text())["done"]


def test_a_first_step_that_alone_takes_the_early_window_gives_the_estimate(tmp_path, clock, caplog) -> None:
    c = StepClock("densenet s0", "cpu", steps_per_epoch=351, total_steps=70_200, path=None)
    with caplog.at_level(logging.INFO, logger="kdsearch.eta"):
        clock.now += 120.0
        c.tick(0)
    assert caplog.messages and "120 s/step" in caplog.messages[0]


def test_short_runs_estimate_nothing(tmp_path, clock, caplog) -> None:
    path = tmp_path / "trial.eta.json"
    c = StepClock("trial 3", "cpu", steps_per_epoch=10, total_steps=20, path=path)
    with caplog.at_level(logging.INFO, logger="kdsearch.eta"):
        for step in range(20):
            clock.now += 1.0
            c.tick(step)
        c.finish()
    assert not caplog.messages and not path.exists()


def _estimate(path, model: str, left_s: float, done: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "device": "cpu", "updated": time.time(), "ends_at": time.time() + left_s,
                                "done": done}))


def test_the_stage_estimate_is_its_last_running_model_and_status_shows_it(tmp_path) -> None:
    rd = tmp_path / "run"
    _estimate(rd / "teachers" / "wrn_28_4.eta.json", "wrn_28_4 s0", 3600)
    _estimate(rd / "teachers" / "wrn_28_10.eta.json", "wrn_28_10 s0", 7 * 3600)
    _estimate(rd / "teachers" / "resnet20.eta.json", "resnet20 s0", 9 * 3600, done=True)  # finished: not counted
    e = stage_eta(rd, "teachers")
    assert e is not None and e.estimated == 2 and e.last == "wrn_28_10 s0 on cpu"
    assert 6.9 * 3600 < e.seconds_left <= 7 * 3600
    assert stage_eta(rd, "baselines") is None and stage_eta(rd, "teachers", since=time.time() + 1) is None
    rows = {name: (state, detail) for name, state, detail in stage_rows(rd)}
    assert rows["teachers"][0] == "running"
    assert rows["teachers"][1].startswith("ETA 7h 00m (the last of 2 running models to end: wrn_28_10 s0 on cpu")


def test_the_driver_logs_the_stage_estimate_when_a_model_adds_one(tmp_path, caplog) -> None:
    rd = tmp_path / "run"
    rep = EtaReporter(rd, "finalize", every_s=3600)
    rep.poll()
    assert rep.lines == []  # nothing estimated yet: nothing said
    _estimate(rd / "final" / "a.s0.eta.json", "finalize a s0", 600)
    rep.poll(), rep.poll()
    _estimate(rd / "final" / "b.s0.eta.json", "finalize b s0", 1200)
    rep.poll()
    assert len(rep.lines) == 2
    assert rep.lines[0].startswith("stage finalize: ETA 10m (1 running model: finalize a s0 on cpu)")
    assert rep.lines[1].startswith("stage finalize: ETA 20m (the last of 2 running models to end: finalize b s0")


def test_fit_writes_its_estimate_beside_the_checkpoint_and_marks_it_done(tmp_path, monkeypatch) -> None:
    from kdsearch.data import EvalLoader, Normalizer, TrainLoader, load_data
    from kdsearch.models import create_model
    from kdsearch.spec import DataConfig, TrainConfig
    from kdsearch.train import FitRun, fit

    monkeypatch.setattr(eta, "LONG_S", 0.0)
    data = DataConfig(dataset="synthetic", num_classes=4, train_size=128, test_size=32, val_size=32, num_workers=0)
    bundle = load_data(data, seed=0)
    model = create_model("tiny_cnn", num_classes=4)
    ckpt = tmp_path / "m.ckpt"
    fit(model, TrainLoader(bundle, data, batch_size=32, seed=0), EvalLoader(bundle.val, batch_size=32),
        FitRun(TrainConfig(epochs=2, lr=0.05, batch_size=32), normalizer=Normalizer.from_bundle(bundle),
               device=torch.device("cpu"), ckpt_path=ckpt, progress=False, desc="tiny s0"))
    e = json.loads((tmp_path / "m.eta.json").read_text())
    assert e["model"] == "tiny s0" and e["done"] and e["total_steps"] == 2 * (96 // 32)
