"""kdsearch.distill: ensemble strategies on hand-made logits, the KD loss, and the three teacher sources
(in-process, a real local Ray actor pool that survives a killed teacher, the logit cache), plus the
baselines stage end to end on synthetic data."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdsearch.data import Normalizer, TrainLoader, load_data
from kdsearch.distill import (
    CacheMismatch,
    InProcessTeachers,
    KDLoss,
    LogitCache,
    TeacherPool,
    build_logit_cache,
    combine,
    list_strategies,
    register_strategy,
)
from kdsearch.distill.strategies import ca_mkd_weights, entropy_weights
from kdsearch.models import create_model
from kdsearch.spec import DataConfig, TrainConfig, parse_spec
from kdsearch.train import FitRun, fit

CPU = torch.device("cpu")
DATA = DataConfig(dataset="synthetic", num_classes=10, train_size=256, test_size=64, num_workers=0)


# ---- strategies on hand-made logits --------------------------------------------------------------------

def _logits(*rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)  # [T, B, C]


def test_average_is_the_mean_of_tempered_probabilities() -> None:
    z = _logits([[2.0, 0.0, 0.0]], [[0.0, 0.0, 4.0]])
    for t in (1.0, 4.0):
        want = (F.softmax(z[0] / t, -1) + F.softmax(z[1] / t, -1)) / 2
        torch.testing.assert_close(combine("average", z, torch.tensor([0]), t), want)


def test_vote_is_one_hot_on_the_majority_class() -> None:
    # Three teachers, two samples: votes (1, 1, 0) -> class 1; votes (2, 0, 2) -> class 2.
    z = _logits([[0, 5, 0], [0, 0, 5]], [[0, 5, 0], [5, 0, 0]], [[5, 0, 0], [0, 0, 5]])
    out = combine("vote", z, torch.tensor([0, 0]), 4.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_vote_tie_goes_to_the_class_the_average_ranks_higher() -> None:
    # One vote each for classes 0 and 1; teacher 2 is far more confident in class 1.
    z = _logits([[1.0, 0.9, 0.0]], [[0.0, 8.0, 0.0]])
    torch.testing.assert_close(combine("vote", z, torch.tensor([0]), 1.0), torch.tensor([[0.0, 1.0, 0.0]]))


def test_dynamic_weights_match_ca_mkd_formula() -> None:
    z = _logits([[3.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]], [[1.0, 1.0, 1.0]])
    y = torch.tensor([0])
    ce = torch.stack([F.cross_entropy(z[k], y) for k in range(3)])
    want = (1 - F.softmax(ce, 0)) / 2
    w = ca_mkd_weights(z, y)
    torch.testing.assert_close(w[:, 0], want)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    assert w[0, 0] > w[2, 0] > w[1, 0]  # right > uncertain > wrong


def test_dynamic_gives_more_weight_to_the_teacher_that_is_right() -> None:
    # Teacher A is right on sample 0 and wrong on sample 1; teacher B the other way round.
    z = _logits([[4.0, 0.0], [4.0, 0.0]], [[0.0, 4.0], [0.0, 4.0]])
    y = torch.tensor([0, 1])
    w = ca_mkd_weights(z, y)
    assert w[0, 0] > w[1, 0] and w[1, 1] > w[0, 1]
    p = combine("dynamic", z, y, 1.0)
    avg = combine("average", z, y, 1.0)
    # The target leans to the true class more than the plain average does, on both samples.
    assert p[0, 0] > avg[0, 0] and p[1, 1] > avg[1, 1]
    assert p[0, 0] > 0.5 and p[1, 1] > 0.5


def test_entropy_weights_favour_the_confident_teacher() -> None:
    z = _logits([[6.0, 0.0, 0.0]], [[0.2, 0.0, 0.1]])
    w = entropy_weights(z, 1.0)
    assert w[0, 0] > w[1, 0]
    torch.testing.assert_close(w.sum(0), torch.ones(1))


def test_dynamic_ka_ranks_the_label_first_and_only_permutes_wrong_rows() -> None:
    # Sample 0: both teachers right (unchanged from dynamic). Sample 1: both wrong, class 2 on top.
    z = _logits([[4.0, 0.0, 1.0], [0.0, 1.0, 5.0]], [[3.0, 0.5, 0.0], [0.5, 0.0, 4.0]])
    y = torch.tensor([0, 1])
    dyn, ka = combine("dynamic", z, y, 2.0), combine("dynamic_ka", z, y, 2.0)
    torch.testing.assert_close(ka[0], dyn[0])
    assert int(ka[1].argmax()) == 1
    torch.testing.assert_close(ka[1], dyn[1][[0, 2, 1]])  # the label's and the top class's values swapped
    torch.testing.assert_close(ka.sum(-1), torch.ones(2))


@pytest.mark.parametrize("name", ["average", "vote", "dynamic", "entropy", "dynamic_ka"])
def test_every_strategy_returns_distributions(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(3, 16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    p = combine(name, z, y, 4.0)
    assert p.shape == (16, 10) and (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(16))


def test_the_spec_offers_exactly_the_registered_strategies() -> None:
    from kdsearch.spec import DistillConfig
    from kdsearch.strategy_names import STRATEGY_NAMES

    assert sorted(STRATEGY_NAMES) == list_strategies()
    for name in STRATEGY_NAMES:
        assert DistillConfig(strategy=name).strategy == name
    with pytest.raises(ValueError):
        DistillConfig(strategy="median")


def test_strategy_registry_errors() -> None:
    assert set(list_strategies()) >= {"average", "vote", "dynamic", "entropy"}
    with pytest.raises(ValueError, match="unknown ensemble strategy"):
        combine("median", torch.zeros(2, 1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[T, B, C\]"):
        combine("average", torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("average")(lambda z, y, t: z)


# ---- the KD loss ----------------------------------------------------------------------------------------

def test_kd_loss_formula() -> None:
    g = torch.Generator().manual_seed(1)
    s, z, y = torch.randn(8, 10, generator=g), torch.randn(2, 8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss = KDLoss("average", temperature=4.0, alpha=0.7)(s, z, y)
    p = combine("average", z, y, 4.0)
    kl = (p * (p.log() - F.log_softmax(s / 4, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, 0.7 * 16 * kl + 0.3 * F.cross_entropy(s, y))
    torch.testing.assert_close(KDLoss("dynamic", alpha=0.0)(s, z, y), F.cross_entropy(s, y))
    # A student that already matches its single teacher has nothing left to learn from it.
    assert float(KDLoss("average", temperature=2.0, alpha=1.0)(z[0], z[:1], y)) < 1e-5


def test_kd_loss_validates_itself() -> None:
    with pytest.raises(ValueError, match="temperature"):
        KDLoss("average", temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        KDLoss("average", alpha=1.5)
    with pytest.raises(ValueError, match="unknown ensemble strategy"):
        KDLoss("mean")


# ---- teacher sources ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle():
    return load_data(DATA, seed=0)


@pytest.fixture(scope="module")
def teachers() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"tiny_cnn": create_model("tiny_cnn", num_classes=10).eval(),
            "resnet8": create_model("resnet8", num_classes=10).eval()}


def test_inprocess_teachers_answer_per_teacher_logits(bundle, teachers) -> None:
    src = InProcessTeachers(teachers, Normalizer.from_bundle(bundle), CPU, bf16=False)
    loader = TrainLoader(bundle, DATA, batch_size=64, seed=3)
    out = list(src.annotate(loader.epoch(0), 0))
    assert len(out) == len(loader)
    batch, logits = out[0]
    assert logits.shape == (2, 64, 10)
    with torch.no_grad():
        want = teachers["resnet8"](Normalizer.from_bundle(bundle)(batch.images))
    torch.testing.assert_close(logits[1], want, rtol=1e-4, atol=1e-4)


def test_teachers_use_bf16_exactly_where_the_cpu_runs_it_natively(bundle, teachers) -> None:
    from kdsearch.distill.numerics import native_cpu_bf16, teacher_numerics

    src = InProcessTeachers(teachers, Normalizer.from_bundle(bundle), CPU)
    assert src.bf16 == native_cpu_bf16()
    assert teacher_numerics(CPU) == ("bf16" if native_cpu_bf16() else "fp32")
    assert teacher_numerics(CPU, requested=False) == "fp32"
    images = next(iter(TrainLoader(bundle, DATA, batch_size=64, seed=3).epoch(0))).images
    fast = src.logits(images)
    exact = InProcessTeachers(teachers, Normalizer.from_bundle(bundle), CPU, bf16=False).logits(images)
    assert fast.dtype == torch.float32
    # bf16 keeps ~3 significant digits: the soft targets are the same to well under a KD loss's noise.
    torch.testing.assert_close(fast.softmax(-1), exact.softmax(-1), rtol=0, atol=2e-2)
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() > 0.95


class _CountingBatches:
    """An iterable of batches that records how many have been drawn."""

    def __init__(self, batches) -> None:
        self.batches, self.drawn = list(batches), 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


@pytest.fixture(scope="module")
def pool(ray_session, bundle, teachers):
    p = TeacherPool(teachers, bundle.mean, bundle.std, num_cpus=0.5, lookahead=2, max_restarts=3, max_task_retries=3)
    p.wait_ready()
    yield p
    p.shutdown()


def test_pool_matches_inprocess_and_keeps_requests_in_flight(bundle, teachers, pool) -> None:
    loader = TrainLoader(bundle, DATA, batch_size=32, seed=3)
    batches = _CountingBatches(loader.epoch(1))
    local = InProcessTeachers(teachers, Normalizer.from_bundle(bundle), CPU)
    for k, (batch, logits) in enumerate(pool.annotate(batches, 1)):
        # When batch k is handed out, batches k+1 and k+2 were already submitted to the actors.
        assert batches.drawn == min(k + 3, len(loader))
        torch.testing.assert_close(logits, local.logits(batch.images), rtol=1e-4, atol=1e-4)
    assert k == len(loader) - 1


class _KillMidRun:
    """A teacher source that kills one teacher's process while the KD run is using the pool."""

    def __init__(self, pool: TeacherPool, kill_at: int) -> None:
        self.pool, self.kill_at, self.seen, self.killed_pid = pool, kill_at, [], None

    def annotate(self, batches, epoch):
        for i, (batch, logits) in enumerate(self.pool.annotate(batches, epoch)):
            if epoch == 0 and i == self.kill_at:
                self.killed_pid = self.pool.pids()[0]
                os.kill(self.killed_pid, signal.SIGKILL)
            self.seen.append((epoch, batch.index.clone(), logits.shape, bool(torch.isfinite(logits).all())))
            yield batch, logits


def test_killing_a_teacher_actor_mid_run_loses_no_batch(bundle, pool, tmp_path) -> None:
    loader = TrainLoader(bundle, DATA, batch_size=32, seed=5)
    src = _KillMidRun(pool, kill_at=1)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=32)
    student = create_model("tiny_cnn", num_classes=10)
    result = fit(student, loader, None, FitRun(cfg, normalizer=Normalizer.from_bundle(bundle), device=CPU,
                 teacher=src, kd_loss=KDLoss("dynamic"), progress=False))
    assert result.epochs_run == 2 and math.isfinite(result.final["train_loss"])
    assert len(src.seen) == 2 * len(loader)  # every batch of both epochs was distilled
    assert all(shape == (2, 32, 10) and finite for _, _, shape, finite in src.seen)
    for e in (0, 1):
        idx = torch.cat([i for ep, i, _, _ in src.seen if ep == e])
        torch.testing.assert_close(idx, loader.order(e)[: len(idx)])
    assert src.killed_pid is not None and pool.pids()[0] != src.killed_pid  # restarted in a new process


# ---- the logit cache ------------------------------------------------------------------------------------

def _build(bundle, teachers, root, *, seed=7, epochs=2, calls=None):
    src = InProcessTeachers(teachers, Normalizer.from_bundle(bundle), CPU)
    if calls is not None:
        inner = src.annotate

        def counting(batches, epoch):
            calls.append(epoch)
            return inner(batches, epoch)

        src.annotate = counting  # type: ignore[method-assign]
    return build_logit_cache(src, bundle, DATA, root, key="k1", seed=seed, epochs=epochs,
                             teachers=list(teachers), device=CPU, batch_size=100)


@pytest.fixture(scope="module")
def cache(bundle, teachers, tmp_path_factory) -> LogitCache:
    return _build(bundle, teachers, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("strategy", ["average", "vote", "dynamic"])
def test_cache_replays_the_soft_targets_of_live_serving(bundle, teachers, cache, strategy) -> None:
    live = InProcessTeachers(teachers, Normalizer.from_bundle(bundle), CPU)
    loader = cache.train_loader(bundle, DATA, batch_size=48, device=CPU)  # another batch size than the build
    assert loader.inner.seed == cache.seed == 7
    for epoch in (0, 1, 3):  # epoch 3 replays cached epoch 1
        (batch, cached), = [next(iter(cache.annotate(loader.epoch(epoch), epoch)))]
        assert cached.dtype == torch.float16 and cached.shape == (2, 48, 10)
        fresh = TrainLoader(bundle, DATA, batch_size=48, seed=7).views(epoch % 2, batch.index)
        assert torch.equal(batch.images, fresh)
        want = combine(strategy, live.logits(batch.images), batch.labels, 4.0)
        got = combine(strategy, cached.float(), batch.labels, 4.0)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_cache_rejects_a_loader_with_another_seed(bundle, cache) -> None:
    wrong = TrainLoader(bundle, DATA, batch_size=64, seed=8)
    with pytest.raises(CacheMismatch, match="seed"):
        list(cache.annotate(wrong.epoch(0), 0))


def test_cache_build_resumes_per_epoch(bundle, teachers, tmp_path) -> None:
    root = tmp_path / "cache"
    calls: list[int] = []
    _build(bundle, teachers, root, epochs=2, calls=calls)
    assert calls == [0, 1]
    (root / "epoch_001.npy").unlink()  # as if interrupted while writing epoch 1
    with pytest.raises(FileNotFoundError, match="lacks epochs"):
        LogitCache(root)
    calls.clear()
    cache = _build(bundle, teachers, root, epochs=3, calls=calls)
    assert calls == [1, 2] and cache.epochs == 3
    assert not list(root.glob("*.tmp"))
    assert np.load(root / "epoch_002.npy").dtype == np.float16


# ---- the baselines stage --------------------------------------------------------------------------------

def _stage_setup(tmp_path, **distill):
    from kdsearch.checkpoints import save_model
    from kdsearch.context import RunContext
    from kdsearch.rundir import RunDir

    spec = parse_spec({
        "name": "kdtest", "device": "cpu",
        "data": DATA.model_dump(mode="json"),
        "teachers": {"models": ["tiny_cnn", "resnet8"], "gpus": 0, "cpus": 0.5},
        "student": {"arch": "tiny_cnn", "train": {"epochs": 2, "lr": 0.05, "batch_size": 64}, "gpus": 0},
        "distill": {"strategy": "dynamic", "source": "cache", "cache_epochs": 2, **distill},
        "search": {"budgets_mb": [0.05]},
    })
    ctx = RunContext.create(tmp_path / "run", device="cpu", progress=False)
    for arch in ("tiny_cnn", "resnet8"):
        torch.manual_seed(1)
        save_model(RunDir(ctx.run_dir).teacher(arch), create_model(arch, num_classes=10), arch=arch, num_classes=10,
                   meta={"inputs_key": f"t-{arch}"})
    return spec, ctx


def _kd(spec, ctx, strategy="dynamic", source="cache"):
    from kdsearch.fp32 import train_kd_student
    from kdsearch.rundir import RunDir
    from kdsearch.stages.baselines import kd_kind

    out = RunDir(ctx.run_dir).student(kd_kind(spec, strategy), 0)
    return train_kd_student(spec, ctx.run_dir, out, seed=0, strategy=strategy, source=source,
                            device=torch.device("cpu")), out


def test_kd_student_with_alpha_zero_is_the_scratch_student(tmp_path) -> None:
    """Same initialisation, same augmented views (cache seed = student seed), CE only: identical runs."""
    from kdsearch.fp32 import train_float_model
    from kdsearch.rundir import RunDir

    spec, ctx = _stage_setup(tmp_path, alpha=0.0)
    kd, _ = _kd(spec, ctx)
    scratch = train_float_model(spec, "tiny_cnn", spec.student.train, RunDir(ctx.run_dir).student("scratch", 0),
                                seed=0, device=torch.device("cpu"))
    assert [h["train_loss"] for h in kd["history"]] == [h["train_loss"] for h in scratch["history"]]
    assert kd["val_acc"] == scratch["val_acc"] and kd["test_acc"] == scratch["test_acc"]


def test_train_kd_student_writes_resumable_model_files(tmp_path) -> None:
    from kdsearch.checkpoints import read_model_file

    spec, ctx = _stage_setup(tmp_path)
    m, out = _kd(spec, ctx)
    assert out.name == "kd.pt" and out.parent.name == "s0" and out.is_file() and not out.with_suffix(".ckpt").exists()
    assert m["strategy"] == "dynamic" and len(m["history"]) == 2 and 0 <= m["val_acc"] <= 100
    assert (ctx.run_dir / "cache" / "logits" / "s0" / "epoch_001.npy").is_file()
    stamp = out.stat().st_mtime_ns
    assert _kd(spec, ctx)[0]["val_acc"] == m["val_acc"] and out.stat().st_mtime_ns == stamp  # skipped
    assert read_model_file(out)["meta"]["inputs_key"]
    # Another strategy gets its own file, here served by in-process teachers.
    v, vout = _kd(spec, ctx, strategy="vote", source="inprocess")
    assert vout.name == "kd_vote.pt" and v["source"] == "inprocess" and vout.is_file()


def test_baselines_stage_trains_every_seed_as_ray_tasks(tmp_path, ray_session) -> None:
    """seeds [0, 1]: a scratch and a KD student per seed, each a Ray task that records its node."""
    from kdsearch.rundir import RunDir
    from kdsearch.stages.baselines import train_baselines

    spec, ctx = _stage_setup(tmp_path)
    spec = parse_spec({**spec.to_dict(), "seeds": [0, 1]})
    out = train_baselines(spec, ctx)
    assert sorted(out) == ["kd s0", "kd s1", "scratch s0", "scratch s1"]
    rd = RunDir(ctx.run_dir)
    for s in (0, 1):
        for kind in ("scratch", "kd"):
            m = out[f"{kind} s{s}"]
            assert rd.student(kind, s).is_file() and m["seed"] == s and m["node"]["node_id"]
    assert out["kd s0"]["history"] != out["kd s1"]["history"]  # other seed, other initialisation and views
