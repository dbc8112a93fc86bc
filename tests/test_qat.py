"""The QAT recipe (kdsearch.qat + kdsearch.quant): stable steps, calibration, PTQ as a floor, BN re-estimation,
and an export that refuses a dead channel."""

from __future__ import annotations

import math

import pytest
import torch

from kdsearch.checkpoints import save_model
from kdsearch.data import EvalLoader, Normalizer, TrainLoader, load_data
from kdsearch.models import create_model
from kdsearch.quant import (
    BitConfig, DeadChannelError, LsqActQuantizer, LsqWeightQuantizer, calibrate, dead_channels, export_quantized,
    load_quantized, quantize, quantizer_parameters, reestimate_bn,
)
from kdsearch.spec import DataConfig, TrainConfig, parse_spec
from kdsearch.train import FitRun, evaluate, fit

CPU = torch.device("cpu")
DATA = {"dataset": "synthetic", "num_classes": 4, "train_size": 640, "test_size": 64, "val_size": 256,
        "augment": "standard", "num_workers": 0, "eval_batch_size": 256}


def _spec(**quant):
    return parse_spec({
        "name": "qat", "seed": 0, "device": "cpu", "data": DATA,
        "teachers": {"models": ["tiny_cnn"], "gpus": 0}, "student": {"arch": "tiny_cnn", "gpus": 0},
        "quant": {"bits": [8, 4], "pin": {"first": 8, "last": 8}, **quant},
        "search": {"budgets_mb": [0.05]},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny_cnn trained to convergence-ish on fixed synthetic data, saved as a kdsearch model file."""
    spec = _spec()
    bundle = load_data(spec.data)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=4)
    fit(model, TrainLoader(bundle, spec.data, batch_size=64, seed=0), None,
        FitRun(TrainConfig(epochs=6, lr=0.05, batch_size=64), normalizer=Normalizer.from_bundle(bundle), device=CPU,
               progress=False))
    path = tmp_path_factory.mktemp("qat") / "student.pt"
    save_model(path, model, arch="tiny_cnn", num_classes=4)
    return spec, bundle, path


def _steps(model):
    return {n: m.effective_step().detach().clone() for n, m in model.named_modules()
            if isinstance(m, (LsqWeightQuantizer, LsqActQuantizer))}


def test_steps_are_fixed_at_8_bits_and_learned_log_steps_below():
    w = torch.randn(6, 3, 3, 3)
    q8, q4 = LsqWeightQuantizer(8, 6), LsqWeightQuantizer(4, 6)
    assert not q8.learned and [n for n, _ in q8.named_parameters()] == []
    assert q4.learned and [n for n, _ in q4.named_parameters()] == ["scale.log_step"]
    for q in (q8, q4):
        q.init_from(w)
        assert (q.effective_step() > 0).all()
    with torch.no_grad():  # a log-step can go anywhere: the step it encodes stays positive and finite
        q4.scale.log_step.fill_(-200.0)
    assert (q4.effective_step() >= 0).all() and torch.isfinite(q4.effective_step()).all()


def test_calibration_pools_several_eval_mode_batches_and_does_not_train():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=4)
    quantize(model, BitConfig.uniform(model, 8))
    batches = [torch.randn(16, 3, 32, 32) * (1 + i) for i in range(4)]  # ranges grow batch by batch
    bn = model.bn1.running_mean.clone()
    calibrate(model, iter(batches))
    first = model.conv1.act_quantizer
    assert first.is_initialized and first.is_signed
    wide = float(first.effective_step())
    calibrate(model, batches[:1])  # one batch sees a narrower range than all four pooled
    assert float(first.effective_step()) < wide
    assert torch.equal(model.bn1.running_mean, bn) and model.training  # eval-mode forwards; modes restored


def test_bn_reestimation_recomputes_running_statistics():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=4)
    quantize(model, BitConfig.uniform(model, 8), calib=torch.randn(8, 3, 32, 32))
    model.bn1.running_mean.fill_(123.0)
    x = [torch.randn(32, 3, 32, 32) for _ in range(3)]
    assert reestimate_bn(model, iter(x)) == 3
    assert model.bn1.running_mean.abs().max() < 10 and model.bn1.momentum == 0.1 and model.training


def test_aggressive_learning_rate_keeps_every_step_positive_and_every_channel_alive(trained, tmp_path):
    """The issue's failure: learned steps sharing the weights' SGD ran away and clamped whole channels to zero.
    At a learning rate 10x the spec's (and the step optimizer's 20x its default), mixed 8/4 QAT keeps every step
    positive, bounded in drift, and every channel alive, and the export takes the model."""
    spec, bundle, path = trained
    from kdsearch.checkpoints import load_model

    model, _ = load_model(path)
    bits = {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 8}
    quantize(model, bits)
    calibrate(model, [Normalizer.from_bundle(bundle)(bundle.train.images[:128])])
    before = _steps(model)
    assert len(quantizer_parameters(model)) == 2  # the two 4-bit weight log-steps; 8-bit ones are fixed
    cfg = TrainConfig(epochs=3, lr=0.5, batch_size=32, step_lr=0.02, weight_decay=5e-5)
    fit(model, TrainLoader(bundle, spec.data, batch_size=32, seed=1), None,
        FitRun(cfg, normalizer=Normalizer.from_bundle(bundle), device=CPU, progress=False))
    after = _steps(model)
    for name, s in after.items():
        assert torch.isfinite(s).all() and (s > 0).all(), name
        drift = (s / before[name]).log().abs().max()
        assert float(drift) <= 60 * cfg.step_lr + 1e-6, (name, float(drift))  # 60 steps x step_lr bounds Adam
        if name.startswith(("conv1", "fc")):
            assert torch.equal(s, before[name]), name  # 8-bit: fixed
    assert dead_channels(model) == []
    assert export_quantized(model, tmp_path / "m.kdq", arch="tiny_cnn") > 0


def test_8_bit_qat_does_not_end_below_its_own_ptq(trained):
    """On fixed synthetic data, the product's QAT of a trained tiny model at 8 bits ends at or above the same
    model's post-training quantization (quantize + calibrate, no training), both measured on validation."""
    from kdsearch.qat import qat_finetune
    from kdsearch.selection import _uniform_bits

    spec, bundle, path = trained
    model, _ = __import__("kdsearch.checkpoints", fromlist=["load_model"]).load_model(path)
    bits = _uniform_bits(model, spec.quant.pin, 8)
    cfg = TrainConfig(epochs=2, lr=0.005, batch_size=64, weight_decay=5e-5)
    _, ptq = qat_finetune(spec, path, bits, cfg, device=CPU, seed=0, bundle=bundle, train=False)
    qmodel, qat = qat_finetune(spec, path, bits, cfg, device=CPU, seed=0, bundle=bundle)
    assert ptq["epochs_run"] == 0 and qat["epochs_run"] == 2 and qat["bn_reestimated"] == ptq["bn_reestimated"] == 3
    assert qat["val_acc"] >= ptq["val_acc"], (qat["val_acc"], ptq["val_acc"])
    assert ptq["val_acc"] > 2 * 25  # the float model learned the task: the comparison means something
    # the number qat_finetune reports is the returned model's, after BN re-estimation
    acc = evaluate(qmodel, EvalLoader(bundle.val, batch_size=256), Normalizer.from_bundle(bundle), CPU)["acc"]
    assert acc == pytest.approx(qat["val_acc"])


def test_stale_batchnorm_statistics_do_not_spoil_the_calibrated_ranges(trained, tmp_path):
    """A student whose running statistics lag its weights (torchvision's MobileNetV3 averages them with momentum
    0.01) is calibrated on re-estimated ones (PreciseBN first): its 8-bit PTQ and QAT match the healthy model's.
    Without the re-estimation (bn_batches=0 turns it off, and the one after QAT) the same model collapses."""
    from kdsearch.checkpoints import load_model
    from kdsearch.qat import qat_finetune
    from kdsearch.selection import _uniform_bits

    spec, bundle, path = trained
    model, _ = load_model(path)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # as if hardly updated since initialisation
            m.running_mean.zero_()
            m.running_var.fill_(1e4)
    stale = tmp_path / "stale.pt"
    save_model(stale, model, arch="tiny_cnn", num_classes=4)
    bits = _uniform_bits(model, spec.quant.pin, 8)
    cfg = TrainConfig(epochs=1, lr=0.005, batch_size=64, weight_decay=5e-5)
    _, healthy = qat_finetune(spec, path, bits, cfg, device=CPU, seed=0, bundle=bundle, train=False)
    _, ptq = qat_finetune(spec, stale, bits, cfg, device=CPU, seed=0, bundle=bundle, train=False)
    _, qat = qat_finetune(spec, stale, bits, cfg, device=CPU, seed=0, bundle=bundle)
    assert healthy["val_acc"] > 2 * 25
    assert ptq["val_acc"] >= healthy["val_acc"] - 2 and qat["val_acc"] >= healthy["val_acc"] - 2, (ptq, qat, healthy)
    off = _spec(bn_batches=0)
    _, broken = qat_finetune(off, stale, bits, cfg, device=CPU, seed=0, bundle=bundle, train=False)
    assert broken["val_acc"] < healthy["val_acc"] - 10, (broken["val_acc"], healthy["val_acc"])


def test_export_refuses_a_dead_channel(trained, tmp_path):
    from kdsearch.checkpoints import load_model

    _, bundle, path = trained
    model, _ = load_model(path)
    quantize(model, {"conv1": 8, "conv2": 4, "conv3": 8, "fc": 8})
    calibrate(model, [Normalizer.from_bundle(bundle)(bundle.train.images[:64])])
    assert dead_channels(model) == []
    with torch.no_grad():  # a step so large every weight of channel 3 rounds to 0: the channel is dead
        s = model.conv2.weight_quantizer.effective_step().clone()
        s[3] = model.conv2.weight[3].abs().max() * 100
        model.conv2.weight_quantizer.set_step(s)
    with pytest.raises(DeadChannelError, match=r"^export: layer 'conv2' channel 3 is dead: every 4-bit code is 0"):
        export_quantized(model, tmp_path / "dead.kdq", arch="tiny_cnn")
    assert not (tmp_path / "dead.kdq").exists()
    with torch.no_grad():  # a step so small the whole channel clips (what a step clamped at 1e-8 did)
        s[3] = 1e-9
        model.conv2.weight_quantizer.set_step(s)
    with pytest.raises(DeadChannelError, match="channel 3 has a degenerate weight step"):
        export_quantized(model, tmp_path / "dead.kdq", arch="tiny_cnn")


def test_reloaded_export_is_fixed_and_bit_exact(trained, tmp_path):
    """The file holds exp(log_step) of the learned steps; the reloaded model fixes them and reproduces the QAT model."""
    from kdsearch.checkpoints import load_model

    spec, bundle, path = trained
    model, _ = load_model(path)
    quantize(model, {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 8})
    x = Normalizer.from_bundle(bundle)(bundle.val.images[:64])
    calibrate(model, [x])
    export_quantized(model, tmp_path / "m.kdq", arch="tiny_cnn")
    reloaded = load_quantized(tmp_path / "m.kdq")
    assert quantizer_parameters(reloaded) == []
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_qat_spec_warms_up_unless_told_otherwise():
    spec = _spec(qat={"epochs": 4, "lr": 0.01})
    assert spec.quant.qat.warmup_epochs == pytest.approx(0.4) and spec.search.trial.warmup_epochs > 0
    assert _spec(qat={"epochs": 4, "lr": 0.01, "warmup_epochs": 0}).quant.qat.warmup_epochs == 0
    again = parse_spec(spec.to_dict())  # a frozen spec reads back the same
    assert again.quant.qat == spec.quant.qat and math.isclose(again.search.trial.warmup_epochs,
                                                              spec.search.trial.warmup_epochs)
