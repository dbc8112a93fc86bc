"""Tests for kdsearch.quant: quantizer arithmetic, module swap, BitConfig, size model, packed export."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdsearch.quant import (
    SUPPORTED_BITS,
    BitConfig,
    FoldingBatchNorm2d,
    HalfQuantizer,
    LsqActQuantizer,
    LsqWeightQuantizer,
    QuantConv2d,
    QuantLinear,
    bit_config_of,
    export_quantized,
    is_quantized,
    layer_inventory,
    load_quantized,
    model_size,
    pack_bits,
    quantize,
    quantizer_parameters,
    read_metadata,
    resolve_act_bits,
    storage_plan,
    unpack_bits,
)
from kdsearch.quant.quantizers import INTEGER_BITS, signed_range, weight_range

IMPLS = ("reference", "function", "fused")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module: on a shared 2-core machine, two OpenMP threads contending with
    other processes made the many small ops here up to 100x slower; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyNet(nn.Module):
    """conv-bn-relu, depthwise conv-bn-relu, pointwise conv with bias (unsigned input), pool, fc (signed)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pw = nn.Conv2d(8, 16, 1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.dw(x)))
        return self.fc(torch.flatten(self.pool(self.pw(x)), 1))


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN non-trivial statistics and affine, as a trained checkpoint would have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


def _batch(n: int = 4, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- quantizer arithmetic


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(INTEGER_BITS),
    impl=st.sampled_from(IMPLS),
    step=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_weight_quantizer_error_within_half_step_inside_clip_range(bits, impl, step, seed):
    qn, qp = weight_range(bits)  # the weight quantizer's range (8 bits: narrow)
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(4, 50, generator=g) * (qn + qp) - qn) * step  # inside [-Qn s, Qp s]
    w_out = torch.tensor([[-(qn + 3) * step, (qp + 3) * step]]).repeat(4, 1)  # outside: saturates
    q = LsqWeightQuantizer(bits, 4, impl)
    with torch.no_grad():
        q.set_step(torch.full((4,), step))
        err = (q(w) - w).abs()
        sat = q(w_out)
    assert float(err.max()) <= step / 2 * (1 + 1e-5) + 1e-6
    assert torch.allclose(sat[:, 0], torch.full((4,), -qn * step)) and torch.allclose(sat[:, 1], torch.full((4,), qp * step))
    codes = q.integers(w)
    assert codes.min() >= -qn and codes.max() <= qp
    with torch.no_grad():
        assert torch.equal(codes.float() * q.effective_step().view(-1, 1), q(w))  # codes x step, exactly


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(INTEGER_BITS),
    impl=st.sampled_from(IMPLS),
    signed=st.booleans(),
    step=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_activation_quantizer_error_within_half_step_inside_clip_range(bits, impl, signed, step, seed):
    a = LsqActQuantizer(bits, impl)
    a.set_state(step, signed)
    qn, qp = a.qrange
    assert (qn, qp) == ((2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1))
    x = (torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * (qn + qp) - qn) * step
    with torch.no_grad():
        y = a(x)
        assert float((y - x).abs().max()) <= step / 2 * (1 + 1e-5) + 1e-6
        assert float(a(torch.full((1, 1), -(qn + 2) * step - 1.0))) == pytest.approx(-qn * step)


@pytest.mark.parametrize("bits", INTEGER_BITS)
def test_reference_and_fused_forward_agree(bits):
    w = torch.randn(16, 8, 3, 3)
    ref, fused = LsqWeightQuantizer(bits, 16, "reference"), LsqWeightQuantizer(bits, 16, "fused")
    ref.init_from(w)
    fused.load_state_dict(ref.state_dict())
    with torch.no_grad():
        a, b = ref(w), fused(w)
        # identical except where w/s lands on a .5 tie (x/s vs x*(1/s)): then one step apart
        assert (a != b).float().mean() < 1e-3 and float((a - b).abs().max()) <= float(ref.effective_step().max()) * 1.0001


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_init_beats_lsq_and_max_init_on_gaussian_and_laplacian_weights(bits):
    g = torch.Generator().manual_seed(bits)
    for w in (torch.randn(64, 288, generator=g), torch.distributions.Laplace(0.0, 1.0).sample((64, 288))):
        errs = {}
        for method in ("mse", "lsq", "max"):
            q = LsqWeightQuantizer(bits, 64, "reference")
            q.init_from(w, method)
            with torch.no_grad():
                errs[method] = float((q(w) - w).pow(2).mean())
        assert errs["mse"] <= errs["lsq"] and errs["mse"] <= errs["max"], errs
        assert errs["mse"] < 0.98 * max(errs["lsq"], errs["max"]), errs


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_reach_weights_and_step_sizes(impl):
    model = quantize(_trained_like(TinyNet()), BitConfig.uniform(TinyNet(), 4), act_bits=4, impl=impl,
                     calib=_batch())
    model.train()
    model(_batch(seed=2)).pow(2).sum().backward()
    for name, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name
            assert m.weight_quantizer.scale.log_step.grad.abs().sum() > 0, name
            assert m.act_quantizer.scale.log_step.grad.abs().sum() > 0, name
    assert len(quantizer_parameters(model)) == 8  # 4 layers x (weight log-step, act log-step), all below 8 bits
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {impl}


def test_activation_quantizer_sign_from_first_batch_and_lazy_init_once():
    pos, neg = torch.rand(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    a = LsqActQuantizer(4)
    a(pos)
    assert a.is_initialized and not a.is_signed and a.qrange == (0, 15)
    first = float(a.effective_step().detach())
    a(pos * 100)  # not re-initialised by later batches
    assert float(a.effective_step().detach()) == first
    b = LsqActQuantizer(4)
    b(neg)
    assert b.is_signed and b.qrange == (8, 7)
    with torch.no_grad():
        err = (a(pos) - pos).abs()
    assert float(err.max()) <= 15 * first  # within the clip range
    c = LsqActQuantizer(4)
    c.load_state_dict(b.state_dict())  # a checkpoint carries init state and sign
    assert c.is_initialized and c.is_signed and torch.equal(c.effective_step(), b.effective_step())


def test_half_quantizer_rounds_to_fp16_and_passes_gradient():
    x = torch.tensor([1.0 + 2**-12, 1e5, -3.3], requires_grad=True)
    y = HalfQuantizer()(x)
    assert y[0] == 1.0 and y[1] == 65504.0 and y[2] == torch.tensor(-3.3).half().float()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


# ---------------------------------------------------------------- packing


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, seed):
    values = np.random.default_rng(seed).integers(0, 2**bits, size=n, dtype=np.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(n * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, n), values)


def test_pack_layout_and_range_check():
    assert pack_bits(np.array([1, 2, 3]), 4).tolist() == [0x21, 0x03]  # two per byte, low nibble first
    assert pack_bits(np.array([3, 0, 1, 2, 1]), 2).tolist() == [0b10010011, 0b01]
    with pytest.raises(ValueError, match="values must lie"):
        pack_bits(np.array([8]), 3)


# ---------------------------------------------------------------- inventory and BitConfig


def test_layer_inventory_names_kinds_params_macs_and_no_side_effects():
    model = quantize(TinyNet(), BitConfig.uniform(TinyNet(), 4))
    inv = layer_inventory(model, input_size=(3, 8, 8))
    assert [(i.name, i.kind, i.params, i.macs, i.out_channels) for i in inv] == [
        ("conv1", "conv", 216, 64 * 8 * 27, 8),
        ("dw", "dwconv", 72, 64 * 8 * 9, 8),
        ("pw", "conv", 128, 64 * 16 * 8, 16),
        ("fc", "linear", 80, 80, 5),
    ]
    assert model.training and not model.conv1.act_quantizer.is_initialized  # zero batch did not calibrate
    assert int(model.bn1.num_batches_tracked) == 0
    assert layer_inventory(TinyNet(), input_size=(3, 8, 8)) == inv  # same on the float model


def test_bitconfig_uniform_pin_and_conversions():
    cfg = BitConfig.uniform(TinyNet(), 4, pin={"first": 8, "last": 16, "dw": 2})
    assert cfg.to_dict() == {"conv1": 8, "dw": 2, "pw": 4, "fc": 16}
    assert BitConfig.from_json(cfg.to_json()) == cfg and BitConfig.from_dict(cfg.to_dict()) == cfg
    row = cfg.to_row()
    assert row == {"bits.conv1": 8, "bits.dw": 2, "bits.pw": 4, "bits.fc": 16}
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame([{**row, "acc": 0.9}, {**BitConfig.uniform(TinyNet(), 8).to_row(), "acc": 0.8}])
    assert BitConfig.from_row(frame.iloc[0]) == cfg  # numpy ints and extra columns are fine
    assert BitConfig.from_row({"x.conv1": 3.0}, prefix="x.").to_dict() == {"conv1": 3}
    assert hash(cfg) == hash(BitConfig(cfg.to_dict())) and cfg.updated({"pw": 6})["pw"] == 6
    with pytest.raises(AttributeError):
        cfg.bits = ()  # frozen


def test_bitconfig_errors_name_the_problem():
    with pytest.raises(ValueError, match="7"):
        BitConfig({"conv1": 7})
    with pytest.raises(ValueError, match="bits must be one of"):
        BitConfig({"conv1": True})
    with pytest.raises(ValueError, match="unknown layer.*'nope'"):
        BitConfig({"conv1": 8, "dw": 8, "pw": 8, "fc": 8, "nope": 4}).validate(TinyNet())
    with pytest.raises(ValueError, match="missing layer.*'fc'"):
        BitConfig({"conv1": 8, "dw": 8, "pw": 8}).validate(TinyNet())
    with pytest.raises(ValueError, match="pin key 'head'"):
        BitConfig.uniform(TinyNet(), 4, pin={"head": 8})
    assert list(BitConfig({"fc": 8, "pw": 8, "dw": 8, "conv1": 8}).validate(TinyNet())) == ["conv1", "dw", "pw", "fc"]
    assert SUPPORTED_BITS == (2, 3, 4, 5, 6, 8, 16, 32)


# ---------------------------------------------------------------- quantize


def test_quantize_swaps_modules_shares_weights_and_applies_act_rule():
    model = TinyNet()
    w = model.pw.weight
    cfg = {"conv1": 8, "dw": 16, "pw": 4, "fc": 32}
    quantize(model, cfg, act_bits="same")
    assert isinstance(model.conv1, QuantConv2d) and model.conv1.act_bits == 8
    assert isinstance(model.dw.weight_quantizer, HalfQuantizer) and isinstance(model.dw.act_quantizer, HalfQuantizer)
    assert model.pw.weight is w and model.pw.weight_bits == 4 and model.pw.act_bits == 4
    assert type(model.fc) is nn.Linear and isinstance(model.bn1, FoldingBatchNorm2d)
    assert bit_config_of(model).to_dict() == cfg and is_quantized(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, cfg)
    with pytest.raises(ValueError, match="act_bits"):
        quantize(TinyNet(), cfg, act_bits=7)
    assert [resolve_act_bits(b, r) for b, r in [(32, 8), (16, 8), (4, 8), (4, "same"), (4, 16), (4, 32)]] == [
        None, 16, 8, 4, 16, None]  # fmt: skip


def test_qat_step_trains_and_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = quantize(_trained_like(TinyNet()), BitConfig.uniform(TinyNet(), 4, pin={"first": 8}), calib=_batch())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _batch(16, seed=3), torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(0))
    steps0 = [p.detach().clone() for p in quantizer_parameters(model)]
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(steps0, quantizer_parameters(model)))


def _on_grid(out: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> bool:
    """``out`` is exactly (integer in [-Qn, Qp]) x step, in fp32."""
    codes = torch.round(out / step)
    return out.dtype == torch.float32 and torch.equal(codes * step, out) and -qn <= codes.min() <= codes.max() <= qp


def test_quantized_layers_compute_in_fp32_under_bf16_autocast():
    """Autocast (CPU bf16 standing in for the GPU's) must not reach the quantized arithmetic: the weight and
    activation fake-quant outputs stay exactly on their integer grids, and each layer's and the model's output
    is bit-identical to the fp32 computation without autocast (what the exported integer model computes)."""
    model = quantize(_trained_like(TinyNet()), {"conv1": 8, "dw": 3, "pw": 4, "fc": 4}, act_bits=4, calib=_batch())
    model.eval()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (input, output) of the last call

    def keep(key: str):
        return lambda mod, inp, out: seen.__setitem__(key, (inp[0].detach(), out.detach()))

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    for name, layer in layers.items():
        layer.register_forward_hook(keep(name))
        layer.weight_quantizer.register_forward_hook(keep(f"{name}.w"))
        layer.act_quantizer.register_forward_hook(keep(f"{name}.a"))
    x = _batch(seed=5)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        for name, layer in layers.items():
            wq, aq = layer.weight_quantizer, layer.act_quantizer
            w_step = wq.effective_step().view(-1, *[1] * (layer.weight.dim() - 1))
            assert _on_grid(seen[f"{name}.w"][1], w_step, wq.qn, wq.qp), name
            assert _on_grid(seen[f"{name}.a"][1], aq.effective_step(), *aq.qrange), name
            inp, y = seen[name]
            assert y.dtype == torch.float32 and torch.equal(y, layer(inp)), name  # layer(inp): no autocast
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_folding_bn_eval_matches_native_bn_and_train_mode_is_native():
    bn = _trained_like(nn.Sequential(nn.BatchNorm2d(6)))[0]
    fold = FoldingBatchNorm2d.from_float(copy.deepcopy(bn))
    x = torch.randn(3, 6, 4, 4)
    assert torch.allclose(fold.eval()(x), bn.eval()(x), atol=1e-5)
    assert torch.equal(fold.train()(x), bn.train()(x))


def test_quantized_checkpoint_restores_into_fresh_quantized_model():
    model = quantize(_trained_like(TinyNet()), BitConfig.uniform(TinyNet(), 3), calib=_batch())
    other = quantize(TinyNet(), BitConfig.uniform(TinyNet(), 3), weight_init="none")
    other.load_state_dict(copy.deepcopy(model).state_dict())
    x = _batch(seed=5)
    assert torch.equal(model.eval()(x), other.eval()(x))


# ---------------------------------------------------------------- size model


def test_model_size_counts_what_the_file_holds_by_hand():
    cfg = {"conv1": 8, "dw": 2, "pw": 4, "fc": 32}
    rep = model_size(TinyNet(), cfg)
    weight_bytes = 216 + math.ceil(72 * 2 / 8) + 128 // 2 + 80 * 4
    other_bytes = 4 * (8 + 1) + 4 * (8 + 1) + 4 * (16 + 1) + 16 * 4 + 5 * 4 + 2 * 4 * (8 + 8)  # scales+act, biases, BN
    assert rep.weight_bits_total == 8 * weight_bytes and rep.other_bits_total == 8 * other_bytes
    assert rep.total_bytes == weight_bytes + other_bytes and rep.total_mb == rep.total_bytes / 1e6
    n = sum(p.numel() for p in TinyNet().parameters())
    assert rep.num_params == n and rep.avg_bits == pytest.approx(8 * rep.total_bytes / n)
    assert rep.fp32_mb == 4 * n / 1e6 and rep.compression == pytest.approx(rep.fp32_mb / rep.total_mb)
    assert model_size(TinyNet()).total_bytes == 4 * n  # float model: params only (BN folds to 2 per channel)
    q = quantize(TinyNet(), cfg, calib=_batch())
    assert model_size(q) == rep  # same on the quantized model
    with pytest.raises(ValueError, match="differs"):
        model_size(q, {**cfg, "pw": 8})


# ---------------------------------------------------------------- export


def _round_trip(model: nn.Module, factory, x: torch.Tensor, tmp_path, **kw):
    path = tmp_path / "m.kdq"
    nbytes = export_quantized(model, path, **kw)
    loaded = load_quantized(path, factory)
    with torch.no_grad():
        diff = float((model.eval()(x) - loaded(x)).abs().max())
    return path, nbytes, loaded, diff


def test_export_load_round_trip_all_bit_widths(tmp_path):
    cfg = {"conv1": 6, "dw": 3, "pw": 5, "fc": 2}
    model = quantize(_trained_like(TinyNet()), cfg, act_bits=4, calib=_batch())
    path, nbytes, loaded, diff = _round_trip(model, TinyNet, _batch(seed=7), tmp_path)
    assert diff <= 1e-4
    assert bit_config_of(loaded).to_dict() == cfg
    assert nbytes == path.stat().st_size
    assert abs(nbytes - model_size(model).total_bytes) <= 0.02 * model_size(model).total_bytes + 16_000
    with open(path, "rb") as f:  # safetensors: 8-byte header length, JSON header, raw data (no pickle)
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    assert header["conv1.weight"]["dtype"] == "U8" and header["conv1.weight"]["shape"] == [math.ceil(216 * 6 / 8)]
    assert header["bn1.affine"]["shape"] == [2, 8]
    assert read_metadata(path)["bit_config"] == cfg


def test_export_refuses_uncalibrated_and_load_refuses_wrong_architecture(tmp_path):
    model = quantize(TinyNet(), BitConfig.uniform(TinyNet(), 4))
    with pytest.raises(ValueError, match="calibrate"):
        export_quantized(model, tmp_path / "a.kdq")
    model(_batch())
    export_quantized(model, tmp_path / "a.kdq")
    with pytest.raises(ValueError, match="no 'arch'"):
        load_quantized(tmp_path / "a.kdq")
    with pytest.raises(ValueError, match="does not fit"):
        load_quantized(tmp_path / "a.kdq", lambda: TinyNet(num_classes=7))


# ---------------------------------------------------------------- registry models (seed arithmetic)

models = pytest.importorskip("kdsearch.models")


def test_seed_size_arithmetic():
    """MobileNetV2/10 and ResNet18/100 (the seed's students): FP32 size, and 4.8 average bits."""
    mbv2 = model_size(models.create_model("mobilenetv2", num_classes=10))
    r18 = model_size(models.create_model("resnet18", num_classes=100))
    assert (mbv2.num_params, r18.num_params) == (2_296_922, 11_220_132)
    assert round(mbv2.fp32_mb, 1) == 9.2 and mbv2.avg_bits == 32.0  # seed: 9.2 MB
    assert r18.fp32_mb == pytest.approx(44.880528)  # seed: 44.8 MB, i.e. 44.88 truncated
    assert round(mbv2.num_params * 4.8 / 8 / 1e6, 2) == 1.38  # seed: 1.38 MB
    assert round(r18.num_params * 4.8 / 8 / 1e6, 3) == 6.732  # seed: 6.72 = 44.8 MB x 4.8 / 32
    assert round(44.8 * 4.8 / 32, 2) == 6.72


def test_mobilenetv2_mixed_8_4_config_reaches_seed_size_and_exports_to_it(tmp_path):
    """A real 8/4 config (first/last pinned at 8, largest layers to 4) with every overhead counted."""
    model = _trained_like(models.create_model("mobilenetv2", num_classes=10))
    inv = layer_inventory(model)
    cfg = BitConfig.uniform(inv, 8, pin={"first": 8, "last": 8})
    for info in sorted(inv[1:-1], key=lambda i: -i.params):
        if model_size(model, cfg).avg_bits <= 4.8:
            break
        cfg = cfg.updated({info.name: 4})
    rep = model_size(model, cfg)
    assert 4.7 < rep.avg_bits <= 4.8 and round(rep.total_mb, 2) == 1.38
    assert rep.weight_avg_bits < 4.3  # BN, scales and steps cost ~0.7 bit per parameter on top
    assert rep.compression == pytest.approx(32 / rep.avg_bits)
    quantize(model, cfg, calib=_batch(4, 32))
    path, nbytes, _, diff = _round_trip(model, None, _batch(4, 32, seed=3), tmp_path, arch="mobilenetv2")
    assert diff <= 1e-4
    assert rep.total_bytes <= nbytes <= rep.total_bytes * 1.02 + 16_000


@pytest.mark.parametrize("arch", ["resnet8", "mobilenetv2_x0_25"])
def test_registry_model_round_trip_and_file_size(tmp_path, arch):
    torch.manual_seed(0)
    model = _trained_like(models.create_model(arch, num_classes=10))
    inv = layer_inventory(model)
    bits = [2, 3, 4, 5, 6, 8, 16, 32]
    cfg = BitConfig({info.name: bits[i % len(bits)] for i, info in enumerate(inv)})
    x = _batch(8, 32, seed=11)
    quantize(model, cfg, calib=x)
    path, nbytes, loaded, diff = _round_trip(model, None, _batch(8, 32, seed=12), tmp_path, arch=arch)
    assert diff <= 1e-4
    total = model_size(model).total_bytes
    assert total <= nbytes <= total * 1.02 + 16_000
    assert sum(t.nbytes for t in storage_plan(model)) == total
