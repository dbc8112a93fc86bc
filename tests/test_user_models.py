"""Any model's layers (issue 19): the quantizable layers of any nn.Module, what stays float and why, and a size
model that counts a user's model exactly, on a model no zoo test uses (torchvision's MobileNetV3-Small)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdsearch.io import atomic_write_json
from kdsearch.models import create_model
from kdsearch.quant import (BitConfig, calibrate, export_quantized, float_parts, load_quantized, model_size,
                            quantizable_layers, quantize)
from kdsearch.report_sections import sensitivity_section

MNV3 = "torchvision.models:mobilenet_v3_small"
CYCLE = (8, 4, 2, 16, 6, 32)


def independent_bytes(model: nn.Module, bits: dict[str, int], act_bits: int = 8) -> int:
    """The model's parameters at their bit-widths, counted from `named_parameters` alone (not the storage plan):
    a Conv2d/Linear weight at b <= 8 bits packs to ceil(n * b / 8) bytes plus one fp32 step per output channel
    and, its input being quantized to act_bits <= 8, one fp32 activation step; at 16 bits 2 bytes each; every other
    parameter (biases, BatchNorm's weight and bias = its folded y*a+b) 4 bytes each."""
    total = 0
    for mod_name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            b = bits.get(mod_name, 32) if pname == "weight" and isinstance(m, (nn.Conv2d, nn.Linear)) else 32
            if b <= 8:
                total += math.ceil(p.numel() * b / 8) + 4 * p.shape[0] + (4 if act_bits <= 8 else 0)
            else:
                total += p.numel() * b // 8
    return total


@pytest.fixture(scope="module")
def mnv3() -> nn.Module:
    torch.manual_seed(0)
    return create_model(MNV3, num_classes=10).eval()


def test_mobilenet_v3_small_size_model_equals_an_independent_count(mnv3, tmp_path):
    layers = [n for n, _ in quantizable_layers(mnv3)]
    kinds = {type(m).__name__ for _, m in quantizable_layers(mnv3)}
    assert kinds == {"Conv2d", "Linear"} and len(layers) == 54 and mnv3.classifier[3].out_features == 10
    assert any(m.groups > 1 for _, m in quantizable_layers(mnv3) if isinstance(m, nn.Conv2d))  # depthwise
    bits = {n: CYCLE[i % len(CYCLE)] for i, n in enumerate(layers)}
    cfg = BitConfig(bits)
    want = independent_bytes(mnv3, bits)
    assert model_size(mnv3, cfg, act_bits=8).total_bytes == want
    assert model_size(mnv3).total_bytes == 4 * sum(p.numel() for p in mnv3.parameters())  # fp32: 4 B each
    # ... and the quantized model, its exported file and the reloaded model agree with it
    x = torch.randn(4, 3, 32, 32)
    q = quantize(create_model(MNV3, num_classes=10).eval(), cfg, 8, calib=x)
    q.load_state_dict(mnv3.state_dict(), strict=False)
    calibrate(q, x)
    assert model_size(q).total_bytes == want
    path = tmp_path / "mnv3.kdq"
    file_bytes = export_quantized(q, path, arch=MNV3, num_classes=10)
    assert want < file_bytes <= want * 1.02 + 16_384
    back = load_quantized(path)
    torch.testing.assert_close(back(x), q(x))
    assert model_size(back).total_bytes == want


class Odd(nn.Module):
    """Grouped and depthwise convs (quantizable) beside parts kdsearch has no integer kernel for."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv1d(8, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.gain = nn.Parameter(torch.ones(1))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.dw(self.grouped(torch.relu(self.conv(x))))).flatten(2)  # [B, 8, HW]
        h = self.mix(h).mean(-1)
        return self.fc(self.norm(h) * self.gain)


def test_any_module_grouped_and_depthwise_convs_quantize_and_the_rest_is_listed_as_float(tmp_path):
    model = Odd().eval()
    assert [n for n, _ in quantizable_layers(model)] == ["conv", "grouped", "dw", "fc"]
    parts = {p.name: p for p in float_parts(model, {"conv": 8, "grouped": 4, "dw": 32, "fc": 8})}
    assert set(parts) == {"conv.bias", "dw", "bn", "mix", "norm", "(model)", "fc.bias"}
    assert "Conv1d is not an nn.Conv2d" in parts["mix"].why and "LayerNorm" in parts["norm"].why
    assert parts["(model)"].params == 1 and "32 bits" in parts["dw"].why and "folded" in parts["bn"].why
    bits = {"conv": 8, "grouped": 4, "dw": 2, "fc": 8}
    x = torch.randn(4, 3, 8, 8)
    q = quantize(Odd().eval(), BitConfig(bits), 8, calib=x)
    q.load_state_dict(model.state_dict(), strict=False)
    calibrate(q, x)
    export_quantized(q, tmp_path / "odd.kdq")
    back = load_quantized(tmp_path / "odd.kdq", model_factory=Odd)
    torch.testing.assert_close(back(x), q(x))
    assert model_size(back).total_bytes == model_size(Odd(), BitConfig(bits)).total_bytes == \
        independent_bytes(model, bits)


def test_the_report_lists_what_stays_float(tmp_path):
    parts = [{"name": "bn", "kind": "BatchNorm2d", "params": 16, "why": "BatchNorm: folded"},
             {"name": "norm", "kind": "LayerNorm", "params": 16, "why": "LayerNorm is not an nn.Conv2d"}]
    atomic_write_json(tmp_path / "sensitivity" / "priors.json", {"metric": "kl", "float": parts})
    text = "\n".join(sensitivity_section(tmp_path))
    assert "Stays in float" in text and "* LayerNorm is not an nn.Conv2d: 1 (16 parameters): norm" in text


def test_a_model_without_second_derivatives_gets_omega_kl_and_no_hessian():
    """torchvision's MobileNetV3 uses hardsigmoid, which has no double backward: HAWQ's trace cannot be computed,
    omega_kl can; the table says so instead of failing the stage."""
    from kdsearch.sensitivity import sensitivity_table

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardsigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    table, t = sensitivity_table(model, torch.randn(8, 3, 8, 8), torch.arange(8) % 3, {"0": [8, 4], "4": [8]},
                                 hutchinson_samples=2)
    assert table["omega_hessian"].isna().all() and table["omega_kl"].notna().all()
    assert "derivative for" in t.hessian_skipped and "hardsigmoid" in t.hessian_skipped
