"""Tests for the integer ONNX export (kdsearch.quant.onnx_export) and ORT's fusion of it (onnx_fusion)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kdsearch.quant import export_onnx, export_quantized, input_shape_of, load_quantized, quantize, read_metadata  # noqa: E402
from kdsearch.quant.onnx_fusion import FusionError, check_fusion, optimized_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """The models' initial weights come from torch's global generator: the same models whatever ran before."""
    torch.manual_seed(0)


class ResNetLet(nn.Module):
    """conv-BN-ReLU stem, one residual block (conv-BN-ReLU, conv-BN, + identity, ReLU), pool, fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu3(self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(x))))) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


class Chain(nn.Module):
    """conv-BN-ReLU x2, flatten, fc: every tensor ORT quantizes is one the QAT model quantizes too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(x, 1))


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine (some negative scales, as trained nets have)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.where(torch.rand(m.num_features, generator=g) < 0.2, -1.0, 1.0)
                               * (0.5 + torch.rand(m.num_features, generator=g)))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


def _batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _ort(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def _resnetlet(bits: dict[str, int] | None = None) -> nn.Module:
    bits = bits or {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8}
    model = _trained_like(ResNetLet())
    with torch.no_grad():
        model.bn2.weight[0] = 0.0  # a dead channel (its output is BN's bias): folding must keep it exact
    return quantize(model, bits, act_bits=8, calib=_batch(32)).eval()


def test_export_fuses_every_layer_into_integer_ops(tmp_path):
    """conv+BN+ReLU+residual+linear: ORT's optimized graph holds only integer convs/gemms, the add is QLinearAdd."""
    model = _resnetlet()
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 8, 8), calib=_batch(64, seed=2))
    assert report.ok and report.integer == {"QLinearConv": 3, "QGemm": 1} and not report.by_design
    assert report.other_integer == {"QLinearAdd": 1, "QLinearGlobalAveragePool": 1}
    exported = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(exported, full_check=True)
    assert exported.opset_import[0].version >= 13
    ops = Counter(n.op_type for n in exported.graph.node)
    assert ops["Mul"] == 0 and ops["Add"] == 1  # BatchNorm folded into the convs; the residual add remains
    inits = {t.name: t for t in exported.graph.initializer}
    assert inits["conv2.weight_quantized"].data_type == onnx.TensorProto.INT8
    codes = onnx.numpy_helper.to_array(inits["conv2.weight_quantized"])
    assert codes.min() >= -8 and codes.max() <= 8  # 4-bit codes (negated where BN's scale is negative)
    assert inits["conv1.bias_quantized"].data_type == onnx.TensorProto.INT32
    q_types = {inits[n.input[2]].data_type for n in exported.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {onnx.TensorProto.UINT8}
    optimized = Counter(n.op_type for n in optimized_model(tmp_path / "m.onnx").graph.node)
    assert optimized["Conv"] == 0 and optimized["Gemm"] == 0 and optimized["QLinearAdd"] == 1
    x = _batch(64, seed=3)
    with torch.no_grad():
        want = model(x).numpy()
    got = _ort(tmp_path / "m.onnx", x)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9  # the added requantizations move logits a little
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


def test_fusion_check_fails_on_signed_activations_and_names_the_nodes(tmp_path):
    """int8 activations hold the same numbers, but ORT's x86 CPU provider leaves such convs in float."""
    model = _resnetlet()
    with pytest.raises(FusionError, match=r"conv1 \(conv1\): signed int8 activations") as err:
        export_onnx(model, tmp_path / "s.onnx", input_shape=(3, 8, 8), calib=_batch(64, seed=2), activations="int8")
    assert "did not fuse" in str(err.value)
    assert not (tmp_path / "s.onnx").exists()  # refused: nothing written
    export_onnx(model, tmp_path / "s.onnx", input_shape=(3, 8, 8), calib=_batch(64, seed=2), activations="int8",
                check=False)
    report = check_fusion(tmp_path / "s.onnx")
    assert not report.ok and "conv1" in {f.layer for f in report.unfused}


@pytest.mark.parametrize("act_bits", [8, 4])
def test_export_without_added_requantization_matches_the_qat_model(tmp_path, act_bits):
    """Where every quantized tensor is one the QAT model quantizes (conv -> ReLU -> next layer), the integer
    graph computes the QAT model up to the int32 bias (rounded to input step x weight step): a signed input grid
    is uint8 with zero point 128, sub-8-bit grids are clipped, nothing is calibrated."""
    model = quantize(_trained_like(Chain()), {"conv1": 8, "conv2": 3, "fc": 4}, act_bits=act_bits, calib=_batch(32))
    model.eval()
    report = export_onnx(model, tmp_path / "c.onnx", input_shape=(3, 8, 8))  # no calib needed: nothing added
    assert report.ok and report.integer == {"QLinearConv": 2, "QGemm": 1}
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "c.onnx")).metadata_props}
    assert meta["kdsearch.requantized"] == "[]"
    x = _batch(256, seed=5)
    with torch.no_grad():
        want = model(x).numpy()
    got = _ort(tmp_path / "c.onnx", x)
    # typical images differ by the int32 bias rounding (up to half of input step x weight step: coarse for
    # 4-bit inputs and weights); a float sum on the other side of a rounding boundary flips one code in a few
    assert np.median(np.abs(got - want).max(1)) <= 0.02 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95  # 4-bit inputs: a few near-ties flip


def test_sixteen_bit_layers_stay_float_by_design_and_reload_from_kdq(tmp_path):
    """A 16-bit layer is float in ORT (no fp16 conv on CPU): listed as by design, not a failure. The .kdq file's
    input shape reaches the ONNX graph; a missing calibration set is one clear error."""
    model = _resnetlet({"conv1": 8, "conv2": 16, "conv3": 4, "fc": 8})
    export_quantized(model, tmp_path / "m.kdq", input_shape=(3, 8, 8))
    loaded = load_quantized(tmp_path / "m.kdq", ResNetLet)
    assert input_shape_of(loaded) == (3, 8, 8) and read_metadata(tmp_path / "m.kdq")["input_shape"] == [3, 8, 8]
    with pytest.raises(ValueError, match="pass calib="):
        export_onnx(loaded, tmp_path / "m.onnx")
    report = export_onnx(loaded, tmp_path / "m.onnx", calib=_batch(64, seed=2))
    assert report.ok and [f.layer for f in report.by_design] == ["conv2"]
    assert report.integer["QLinearConv"] == 2
    assert ort.InferenceSession(str(tmp_path / "m.onnx")).get_inputs()[0].shape[1:] == [3, 8, 8]
    with pytest.raises(ValueError, match="disagree"):
        export_onnx(loaded, tmp_path / "bad.onnx", torch.zeros(1, 3, 32, 32), calib=_batch())
    assert not (tmp_path / "bad.onnx").exists()
    all16 = _resnetlet({"conv1": 16, "conv2": 16, "conv3": 16, "fc": 16})  # no integer layer: nothing quantized
    report = export_onnx(all16, tmp_path / "f.onnx", input_shape=(3, 8, 8))
    assert report.ok and not report.integer and len(report.by_design) == 4
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "f.onnx")).graph.node)


@pytest.mark.parametrize("bits", [8, 4])
def test_zoo_residual_blocks_export_the_qat_models_own_graph(tmp_path, bits):
    """The zoo's residual blocks quantize their adds in QAT (`integer_graph`): ORT's integer model reads every add
    input at its QAT grid and computes the QAT model's function. Nothing is calibrated: the last block's add and
    the pooling, whose outputs QAT does not quantize, run in float (no calib images needed); top-1 agrees on every
    image and the logits agree to a few accumulator steps (fp32 sum order)."""
    from kdsearch.models import create_model
    from kdsearch.quant import BitConfig

    torch.manual_seed(0)
    model = _trained_like(create_model("resnet8", num_classes=10))
    cfg = {**BitConfig.uniform(model, bits).to_dict(), "conv1": 8, "fc": 8}
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = quantize(model, cfg, act_bits=8, calib=calib).eval()
    report = export_onnx(model, tmp_path / "r.onnx", input_shape=(3, 32, 32))
    assert report.ok and report.integer == {"QLinearConv": 9, "QGemm": 1} and report.other_integer == {"QLinearAdd": 2}
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "r.onnx")).metadata_props}
    assert meta["kdsearch.requantized"] == "[]"
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x).numpy()
    got = _ort(tmp_path / "r.onnx", x)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.median(np.abs(got - want).max(1)) <= 0.01 * np.abs(want).max()


def test_an_integer_layer_read_only_by_a_float_layer_hands_it_float(tmp_path):
    """A 16-bit layer right after an integer one reads that layer's float output in QAT; the export leaves the
    integer conv unfused on purpose (fp32 on its integer operands, listed as float by design) instead of
    requantizing its output to 8 bits, and the ORT model stays the QAT model's function."""
    from kdsearch.models import create_model
    from kdsearch.quant import BitConfig

    torch.manual_seed(0)
    model = _trained_like(create_model("resnet8", num_classes=10))
    cfg = {**BitConfig.uniform(model, 8).to_dict(), "layer1.0.conv2": 16}
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = quantize(model, cfg, act_bits=8, calib=calib).eval()
    report = export_onnx(model, tmp_path / "f.onnx", input_shape=(3, 32, 32), calib=calib)
    why = {f.layer: f.reason for f in report.by_design}
    assert report.ok and set(why) == {"layer1.0.conv1", "layer1.0.conv2"}
    assert "read only by float layers" in why["layer1.0.conv1"] and report.integer["QLinearConv"] == 7
    notes = __import__("json").loads({p.key: p.value for p in onnx.load(str(tmp_path / "f.onnx")).metadata_props}
                                     ["kdsearch.requantized"])
    assert not [n for n in notes if "integer layer output" in n]
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x).numpy()
    assert (_ort(tmp_path / "f.onnx", x).argmax(1) == want.argmax(1)).all()
