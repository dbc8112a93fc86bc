"""Tests for kdsearch.quant.integer_graph: the QAT model computes what the deployed integer graph computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdsearch.models import create_model
from kdsearch.models.residual import ResidualAdd
from kdsearch.quant import BitConfig, export_quantized, load_quantized, model_size, quantize, read_metadata, storage_plan
from kdsearch.quant.api import _set_module
from kdsearch.quant.integer_graph import bind
from kdsearch.quant.layers import QuantResidualAdd


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _trained_like(model: nn.Module) -> nn.Module:
    """Running statistics from a few train-mode batches, a fifth of the BatchNorm scales negative, fc biases != 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(torch.where(torch.rand(m.num_features, generator=g) < 0.2, -1.0, 1.0))
                m.bias.add_(0.2 * torch.randn(m.num_features, generator=g))
            elif isinstance(m, nn.Linear):
                m.bias.copy_(0.3 * torch.randn(m.out_features, generator=g))
    return model


def _images(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _resnet8(bits: int | dict[str, int] = 8) -> nn.Module:
    model = _trained_like(create_model("resnet8", num_classes=10))
    cfg = BitConfig.uniform(model, bits) if isinstance(bits, int) else BitConfig(bits)
    return quantize(model, cfg, act_bits=8, calib=_images())


def _integer(t: torch.Tensor, tol: float = 1e-4) -> bool:
    """Whole numbers, up to fp32's rounding of the product k x step (relative 2^-24)."""
    return bool(((t - t.round()).abs() <= tol + 1e-6 * t.abs()).all())


def test_bind_shares_grids_and_quantizes_residual_adds():
    """An identity shortcut reads its block's first conv's input grid; a 1x1 shortcut conv shares that conv's input
    quantizer (one grid per tensor); a strided block's add has a grid of its own for its conv shortcut."""
    model = _resnet8()
    b0, b1 = model.layer1[0], model.layer2[0]  # resnet8: one block per stage; layer2's is strided
    assert isinstance(b0.add, QuantResidualAdd) and isinstance(b1.add, QuantResidualAdd)
    assert b0.add.shortcut_grid is b0.conv1.act_quantizer
    assert b1.add.shortcut_grid is b1.add.shortcut_quantizer
    assert b1.shortcut[0].act_quantizer is b1.conv1.act_quantizer
    linked = bind(model, _images(2))  # idempotent: binding again links the same modules
    assert linked["shortcut"] == {"layer1.0.add": "layer1.0.conv1", "layer2.0.add": None, "layer3.0.add": None}
    assert linked["shared_input"] == {"layer2.0.shortcut.0": "layer2.0.conv1", "layer3.0.shortcut.0": "layer3.0.conv1"}
    assert linked["bn"]["layer2.0.shortcut.1"] == "layer2.0.shortcut.0" and len(linked["bn"]) == 9  # stem, 2 per block, 2 shortcuts


def test_eval_biases_lie_on_the_int32_accumulator_grid():
    """A BatchNorm after an integer layer adds a bias that is a whole number of input step x weight step x |a|
    (what the folded int32 bias of the deployed graph holds); the fc's own bias a whole number of its
    accumulator step. Training mode is untouched BatchNorm."""
    model = _resnet8({**BitConfig.uniform(create_model("resnet8"), 4).to_dict(), "conv1": 8, "fc": 8}).eval()
    conv, bn = model.layer1[0].conv2, model.layer1[0].bn2
    a, b = bn.folded_affine()
    assert _integer(b.double() / (conv.accumulator_step() * a.double().abs()))
    raw = bn.bias.float() - bn.running_mean.float() * a
    assert not _integer(raw.double() / (conv.accumulator_step() * a.double().abs()))  # it did round something
    assert _integer(model.fc._bias().double() / model.fc.accumulator_step())
    x = _images(8, seed=2)
    bn.train()
    assert torch.equal(bn(x[:, :1].repeat(1, 16, 1, 1)), nn.functional.batch_norm(
        x[:, :1].repeat(1, 16, 1, 1), None, None, bn.weight, bn.bias, True, 0.0, bn.eps))


def test_residual_add_reads_both_inputs_on_their_grids():
    model = _resnet8().eval()
    add = model.layer2[0].add
    seen = {}
    for which in ("branch", "shortcut"):
        add.grid(which).register_forward_hook(lambda m, i, o, w=which: seen.__setitem__(w, (o, m.effective_step())))
    with torch.no_grad():
        model(_images(4, seed=3))
    for which, (out, step) in seen.items():
        assert _integer(out.double() / step.double(), 1e-4), which
    assert add.grid("branch").is_signed  # a conv + BN output before the ReLU


def test_a_checkpoint_loaded_into_a_fresh_model_binds_on_its_first_forward():
    model = _resnet8({**BitConfig.uniform(create_model("resnet8"), 4).to_dict(), "conv1": 8, "fc": 8})
    fresh = quantize(create_model("resnet8", num_classes=10),
                     BitConfig.from_dict({k: v for k, v in model_bits(model).items()}), act_bits=8, weight_init="none")
    fresh.load_state_dict(copy.deepcopy(model).state_dict())
    x = _images(8, seed=4)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))


def model_bits(model: nn.Module) -> dict[str, int]:
    from kdsearch.quant import bit_config_of

    return bit_config_of(model).to_dict()


def test_kdq_holds_the_add_steps_and_reloads_bit_exactly(tmp_path):
    """Two fp32 steps per quantized add, in the size model before quantizing and in the file; the reloaded
    model is the QAT model's eval function bit for bit."""
    cfg = {**BitConfig.uniform(create_model("resnet8"), 4).to_dict(), "conv1": 8, "fc": 8}
    planned = model_size(create_model("resnet8", num_classes=10), cfg, act_bits=8).total_bytes
    model = _resnet8(cfg).eval()
    adds = [e for e in storage_plan(model) if e.role == "add_step"]
    assert [e.key for e in adds] == [f"layer{i}.0.add.{k}_step" for i in (1, 2, 3) for k in ("branch", "shortcut")]
    assert model_size(model).total_bytes == planned
    nbytes = export_quantized(model, tmp_path / "m.kdq", arch="resnet8", input_shape=(3, 32, 32))
    assert read_metadata(tmp_path / "m.kdq")["adds"]["layer2.0.add"] == {"branch": True, "shortcut": True}
    loaded = load_quantized(tmp_path / "m.kdq")
    assert isinstance(loaded.layer1[0].add, QuantResidualAdd) and nbytes >= planned
    x = _images(16, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_file_without_quantized_adds_loads_with_float_adds(tmp_path):
    """Files written before residual adds were quantized (no ``adds`` in the metadata) load as they were made."""
    model = _resnet8().eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantResidualAdd):
            _set_module(model, name, ResidualAdd())
    export_quantized(model, tmp_path / "old.kdq", arch="resnet8", input_shape=(3, 32, 32))
    loaded = load_quantized(tmp_path / "old.kdq")
    assert not any(isinstance(m, QuantResidualAdd) for m in loaded.modules())
    x = _images(8, seed=6)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_no_integer_layer_no_quantized_add():
    """A 16-bit model computes in float (fp16-rounded): its adds stay float, and the size model holds no steps."""
    model = quantize(create_model("resnet8", num_classes=10), BitConfig.uniform(create_model("resnet8"), 16))
    assert not any(isinstance(m, QuantResidualAdd) for m in model.modules())
    assert not [e for e in storage_plan(model) if e.role == "add_step"]
