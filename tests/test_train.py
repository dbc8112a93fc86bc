"""The training loop: learns, resumes exactly from its checkpoint, and schedules the learning rate."""

from __future__ import annotations

import pytest
import torch

from kdsearch.data import EvalLoader, Normalizer, TrainLoader, load_data
from kdsearch.models import create_model
from kdsearch.spec import DataConfig, TrainConfig
from kdsearch.train import TrainingDiverged, evaluate, fit, lr_at

DATA = DataConfig(dataset="synthetic", num_classes=4, train_size=256, test_size=128, num_workers=0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle():
    return load_data(DATA, seed=0)


def _run(bundle, cfg, ckpt=None, init_seed=0):
    torch.manual_seed(init_seed)
    model = create_model("tiny_cnn", num_classes=bundle.num_classes)
    train = TrainLoader(bundle, DATA, batch_size=cfg.batch_size, seed=0)
    test = EvalLoader(bundle.test, batch_size=128)
    return model, fit(model, train, test, cfg, normalizer=Normalizer.from_bundle(bundle), device=CPU,
                      ckpt_path=ckpt, progress=False)


def test_fit_learns_above_chance(bundle):
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32)
    model, res = _run(bundle, cfg)
    assert len(res.history) == 4 and res.epochs_run == 4
    assert res.final["test_acc"] > 2 * 100 / bundle.num_classes  # chance is 25%
    ev = evaluate(model, EvalLoader(bundle.test, batch_size=64), Normalizer.from_bundle(bundle), CPU)
    assert ev["acc"] == pytest.approx(res.final["test_acc"])


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
        fit(model, train, EvalLoader(bundle.test, batch_size=128), cfg, normalizer=Normalizer.from_bundle(bundle),
            device=CPU, ckpt_path=ckpt, progress=False, start_epoch_hook=stop_at)
    assert ckpt.is_file()
    model2, resumed = _run(bundle, cfg, ckpt=ckpt, init_seed=123)  # different init seed: must be overwritten by resume
    assert resumed.epochs_run == 1 and len(resumed.history) == 3
    for a, b in zip(full_model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert resumed.final["test_acc"] == pytest.approx(full.final["test_acc"])


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
        fit(model, TrainLoader(bundle, DATA, batch_size=32, seed=0), None, TrainConfig(epochs=1),
            normalizer=Normalizer.from_bundle(bundle), device=CPU, ckpt_path=ckpt, progress=False)
    assert not ckpt.exists()  # no poisoned checkpoint is written


def test_kd_arguments_go_together(bundle):
    with pytest.raises(ValueError, match="go together"):
        fit(create_model("tiny_cnn", 4), TrainLoader(bundle, DATA, batch_size=32, seed=0), None, TrainConfig(epochs=1),
            normalizer=Normalizer.from_bundle(bundle), device=CPU, kd_loss=lambda s, t, y: s.sum())


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
    test = EvalLoader(bundle.test, batch_size=128)
    fit(model, TrainLoader(bundle, DATA, batch_size=64, seed=0), test, TrainConfig(epochs=1, lr=0.05, batch_size=64),
        normalizer=norm, device=CPU, progress=False)
    evaluate(model, test, norm, CPU)
    expected = ("highest", False, True) if quantized else ("high", True, False)
    assert len(log) >= 2 * 4 + 2 and set(log) == {expected}  # 4 steps (forward + backward), 2 evaluations
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
