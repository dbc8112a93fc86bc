"""The training loop: learns, resumes exactly from its checkpoint, and schedules the learning rate."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from kdsearch.data import EvalLoader, Normalizer, TrainLoader, load_data
from kdsearch.models import create_model
from kdsearch.spec import DataConfig, TrainConfig
from kdsearch.train import FitRun, TrainingDiverged, evaluate, fit, lr_at

DATA = DataConfig(dataset="synthetic", num_classes=4, train_size=256, test_size=128, val_size=64, num_workers=0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle():
    b = load_data(DATA, seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (192, 64, 128)
    return b


def _run(bundle, cfg, ckpt=None, init_seed=0, resume_key=None, on_epoch=None):
    torch.manual_seed(init_seed)
    model = create_model("tiny_cnn", num_classes=bundle.num_classes)
    train = TrainLoader(bundle, DATA, batch_size=cfg.batch_size, seed=0)
    val = EvalLoader(bundle.val, batch_size=128)
    return model, fit(model, train, val, FitRun(cfg, normalizer=Normalizer.from_bundle(bundle), device=CPU,
                      ckpt_path=ckpt, progress=False, resume_key=resume_key, on_epoch=on_epoch))


def test_fit_learns_above_chance(bundle):
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32)
    model, res = _run(bundle, cfg)
    assert len(res.history) == 4 and res.epochs_run == 4
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    for h in res.history:  # every epoch is measured on the validation split, never on test
        assert {"val_acc", "val_loss", "train_loss", "train_acc", "lr"} <= set(h) and not any("test" in k for k in h)
    assert res.final["val_acc"] > 2 * 100 / bundle.num_classes  # chance is 25%
    norm = Normalizer.from_bundle(bundle)
    ev = evaluate(model, EvalLoader(bundle.val, batch_size=64), norm, CPU)
    assert ev["acc"] == pytest.approx(res.final["val_acc"]) and ev["loss"] == pytest.approx(res.final["val_loss"])


def test_resume_equals_uninterrupted(bundle, tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=32)
    full_model, full = _run(bundle, cfg)
    ckpt = tmp_path / "m.ckpt"
    # "Crash" after 2 epochs: a run with epochs=2 would change the schedule, so emulate with a hook.
    class Stop(Exception):
        pass

    def stop_at(epoch):
        if epoch == 2:
            raise Stop

    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=bundle.num_classes)
    train = TrainLoader(bundle, DATA, batch_size=32, seed=0)
    with pytest.raises(Stop):
        fit(model, train, EvalLoader(bundle.val, batch_size=128), FitRun(cfg, normalizer=Normalizer.from_bundle(bundle),
            device=CPU, ckpt_path=ckpt, progress=False, start_epoch_hook=stop_at, resume_key="k"))
    assert ckpt.is_file()
    # different init seed: must be overwritten by resume
    model2, resumed = _run(bundle, cfg, ckpt=ckpt, init_seed=123, resume_key="k")
    assert resumed.epochs_run == 1 and len(resumed.history) == 3
    for a, b in zip(full_model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert resumed.final["val_acc"] == pytest.approx(full.final["val_acc"])
    assert resumed.final["val_loss"] == pytest.approx(full.final["val_loss"])


class Crash(Exception):
    pass


def _crash_after_first_epoch(metrics):
    if metrics["epoch"] == 1:
        raise Crash  # after epoch 1's checkpoint was written, as a killed worker would leave it


def test_checkpoint_resumes_only_under_the_same_resume_key(bundle, tmp_path, caplog):
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=32)
    full_model, full = _run(bundle, cfg)  # uninterrupted, from init seed 0
    crashed = tmp_path / "crashed.ckpt"
    with pytest.raises(Crash):
        _run(bundle, cfg, ckpt=crashed, resume_key="a", on_epoch=_crash_after_first_epoch)
    assert torch.load(crashed, weights_only=True)["epoch"] == 1
    other, same = tmp_path / "other.ckpt", tmp_path / "same.ckpt"
    shutil.copy(crashed, other)
    shutil.copy(crashed, same)

    # another key (an edited spec): the checkpoint is not used, training starts over from this call's model
    seen = []
    with caplog.at_level(logging.WARNING, logger="kdsearch.train"):
        model_b, res_b = _run(bundle, cfg, ckpt=other, init_seed=0, resume_key="b", on_epoch=seen.append)
    assert any("starting over" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert res_b.epochs_run == cfg.epochs == 2
    assert [h["epoch"] for h in res_b.history] == [1, 2] and res_b.history == seen  # all from this call
    for a, b in zip(full_model.state_dict().values(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b)  # from scratch: the very run an uninterrupted fit makes
    assert torch.load(other, weights_only=True)["epoch"] == 2  # and it now holds the key-"b" run

    # the same key: resumes after epoch 1, whatever the init of this call (it is overwritten)
    caplog.clear()
    seen = []
    with caplog.at_level(logging.INFO, logger="kdsearch.train"):
        model_a, res_a = _run(bundle, cfg, ckpt=same, init_seed=123, resume_key="a", on_epoch=seen.append)
    assert not any("starting over" in r.getMessage() for r in caplog.records)
    assert any("resumed" in r.getMessage() for r in caplog.records)
    assert res_a.epochs_run == cfg.epochs - 1 == 1 and len(res_a.history) == 2
    assert [h["epoch"] for h in res_a.history] == [1, 2] and seen == res_a.history[1:]  # epoch 1 came from the file
    for a, b in zip(full_model.state_dict().values(), model_a.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert res_a.final["val_acc"] == pytest.approx(full.final["val_acc"])

    # no key is a key of its own: a key-"a" checkpoint is not resumed by a caller that gives none
    shutil.copy(crashed, same)
    _, res_none = _run(bundle, cfg, ckpt=same)
    assert res_none.epochs_run == 2


def test_checkpoint_of_other_training_settings_starts_over(bundle, tmp_path, caplog):
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=32)
    ckpt = tmp_path / "m.ckpt"
    with pytest.raises(Crash):
        _run(bundle, cfg, ckpt=ckpt, resume_key="a", on_epoch=_crash_after_first_epoch)
    with caplog.at_level(logging.WARNING, logger="kdsearch.train"):
        _, res = _run(bundle, cfg.model_copy(update={"lr": 0.02}), ckpt=ckpt, resume_key="a")
    assert res.epochs_run == 2 and any("starting over" in r.getMessage() for r in caplog.records)
    # same cfg and key but another number of steps per epoch (a different batch size of the loader)
    with pytest.raises(Crash):
        _run(bundle, cfg, ckpt=ckpt, resume_key="a", on_epoch=_crash_after_first_epoch)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=bundle.num_classes)
    res = fit(model, TrainLoader(bundle, DATA, batch_size=64, seed=0), EvalLoader(bundle.val, batch_size=128), FitRun(cfg,
              normalizer=Normalizer.from_bundle(bundle), device=CPU, ckpt_path=ckpt, progress=False, resume_key="a"))
    assert res.epochs_run == 2


def test_lr_schedules():
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_epochs=1)
    total = 1000
    assert lr_at(0, total, cfg) == pytest.approx(0.1 / 100)
    assert lr_at(99, total, cfg) == pytest.approx(0.1)
    assert lr_at(total, total, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(550, total, cfg) == pytest.approx(0.05, rel=1e-6)
    one = TrainConfig(epochs=10, lr=0.1, schedule="onecycle")
    assert lr_at(250, total, one) == pytest.approx(0.1) and lr_at(0, total, one) < 0.01
    assert lr_at(total, total, one) == pytest.approx(0.0)


def test_divergence_is_an_error(bundle, tmp_path):
    model = create_model("tiny_cnn", num_classes=bundle.num_classes)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")  # poisons every logit, as an exploding run would
    ckpt = tmp_path / "m.ckpt"
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        fit(model, TrainLoader(bundle, DATA, batch_size=32, seed=0), None, FitRun(TrainConfig(epochs=1),
            normalizer=Normalizer.from_bundle(bundle), device=CPU, ckpt_path=ckpt, progress=False))
    assert not ckpt.exists()  # no poisoned checkpoint is written


def test_kd_arguments_go_together(bundle):
    with pytest.raises(ValueError, match="go together"):
        fit(create_model("tiny_cnn", 4), TrainLoader(bundle, DATA, batch_size=32, seed=0), None, FitRun(TrainConfig(epochs=1),
            normalizer=Normalizer.from_bundle(bundle), device=CPU, kd_loss=lambda s, t, y: s.sum()))


# ---- precision: QAT phases compute as the exported model does (strict fp32), float phases may not -----------


@pytest.fixture
def one_thread_and_tf32_allowed():
    """One torch thread (shared 2-core machine), and TF32/bf16-reduced fp32 math switched *on* for the test, so
    that a phase which leaves it on is seen; the process settings come back afterwards."""
    threads, matmul, cudnn = torch.get_num_threads(), torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def _precision_log(model):
    """Records (fp32 matmul precision, cuDNN TF32, strict fp32 block) at every forward and every backward."""
    from kdsearch.quant import strict_fp32_active

    log = []

    def note(*_):
        log.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, strict_fp32_active()))

    def on_output(mod, inp, out):
        note()
        if out.requires_grad:
            out.register_hook(note)  # runs inside loss.backward(), before the model's own backward ops

    model.register_forward_hook(on_output)
    return log


@pytest.mark.parametrize("quantized", [True, False])
def test_qat_phases_run_in_strict_fp32_and_float_phases_do_not(bundle, one_thread_and_tf32_allowed, quantized):
    from kdsearch.quant import BitConfig, quantize

    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=bundle.num_classes)
    if quantized:
        quantize(model, BitConfig.uniform(model, 4))
    log = _precision_log(model)
    norm = Normalizer.from_bundle(bundle)
    val = EvalLoader(bundle.val, batch_size=128)
    train = TrainLoader(bundle, DATA, batch_size=64, seed=0)
    res = fit(model, train, val, FitRun(TrainConfig(epochs=1, lr=0.05, batch_size=64), normalizer=norm, device=CPU,
              progress=False))
    evaluate(model, val, norm, CPU)
    expected = ("highest", False, True) if quantized else ("high", True, False)
    assert len(train) == 3 and len(val) == 1 and "val_acc" in res.final
    assert len(log) == 2 * 3 + 2 and set(log) == {expected}  # 3 steps (forward + backward), 2 evaluations
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)  # restored


def test_no_bf16_autocast_inside_a_strict_fp32_phase():
    """On CUDA the loop autocasts float phases to bf16; inside a QAT phase it must not (bf16 would round the
    products the exported integer model computes in fp32)."""
    import contextlib
    import warnings

    from kdsearch.quant import strict_fp32
    from kdsearch.train import _autocast

    cuda, cfg = torch.device("cuda"), TrainConfig(bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast("cuda") warns on a machine without CUDA
        assert isinstance(_autocast(cuda, cfg), torch.autocast)
        with strict_fp32():
            assert isinstance(_autocast(cuda, cfg), contextlib.nullcontext)
