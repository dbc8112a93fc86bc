"""Tests for kdsearch.models: the registry, published parameter counts, and the zoo-wide contract.

Parameter counts are taken on the meta device (no memory, no init cost); every model also runs a real
CPU forward (batch 2 for small/student models, batch 1 in eval mode for teachers: the slowest, DenseNet-BC-190-40,
takes ~0.2 s on the 2-core dev machine, so no teacher forward is skipped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from kdsearch.models import (
    KNOWN_TAGS,
    UnknownModelError,
    create_model,
    is_model,
    list_models,
    model_tags,
    register_model,
)
from kdsearch.models import registry as registry_module
from kdsearch.models.densenet import DenseNet

# The zoo's names are written once, in kdsearch/model_names.py (the torch-free list the spec checks against);
# tests/test_spec.py keeps that list equal to the registry.
from kdsearch.model_names import MODEL_NAMES  # noqa: E402

EXPECTED_MODELS = set(MODEL_NAMES)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Batch-1/2 forwards gain nothing from intra-op threads, and with other jobs on the 2 cores the
    thread pool's synchronisation made the DenseNet-BC-190-40 forward ~15x slower (3.5 s vs 0.2 s).
    Restored afterwards, so other test modules keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(name: str, num_classes: int = 10, **kw: object) -> int:
    """Parameter count without allocating or initialising weights."""
    with torch.device("meta"):
        model = create_model(name, num_classes, **kw)
    return sum(p.numel() for p in model.parameters())


def fp32_mb(params: int) -> float:
    return params * 4 / 1e6


# ---------------------------------------------------------------- registry


def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(names) == EXPECTED_MODELS
    assert all(is_model(n) for n in names)
    assert not is_model("resnet1000")


def test_tags_filter_models() -> None:
    assert list_models("teacher") == sorted(
        ["densenet121", "densenet_bc_190_40", "resnext29_8x64d", "wrn_16_2", "wrn_16_4", "wrn_28_10", "wrn_28_4"]
    )
    assert list_models("student") == ["mobilenetv2", "resnet18", "resnet20"]
    assert set(list_models("small")) == {
        "mobilenetv2_x0_25", "mobilenetv2_x0_5", "resnet20", "resnet8", "tiny_cnn", "wrn_16_2", "wrn_16_4"
    }
    assert model_tags("resnet20") == ("small", "student")
    assert model_tags("wrn_28_10") == ("teacher",)
    for name in list_models():
        assert model_tags(name), f"{name} has no tag"
        assert set(model_tags(name)) <= set(KNOWN_TAGS)
    with pytest.raises(ValueError, match="allowed tags"):
        list_models("teachers")


def test_unknown_model_error_lists_available_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        create_model("resnet1000", num_classes=10)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "resnet1000" in message
    for name in list_models():
        assert name in message
    with pytest.raises(UnknownModelError, match="wrn_28_10"):
        model_tags("nope")


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "10"])
def test_create_model_rejects_bad_num_classes(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("tiny_cnn", num_classes=bad)  # type: ignore[arg-type]


def test_register_model_defaults_name_and_rejects_duplicates_and_bad_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_MODELS", dict(registry_module._MODELS))

    @register_model(tags=("small",))
    def my_test_net(num_classes: int = 10, **kw: object) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert is_model("my_test_net") and "my_test_net" in list_models("small")
    assert create_model("my_test_net", num_classes=7).out_features == 7
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(my_test_net)
    with pytest.raises(ValueError, match="allowed tags"):
        register_model("other_net", tags=("huge",))(my_test_net)
    with pytest.raises(ValueError, match="tuple"):
        register_model("other_net", tags="teacher")(my_test_net)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_model("Bad-Name")(my_test_net)
    assert not is_model("other_net")


def test_registry_is_restored_after_monkeypatch() -> None:
    assert not is_model("my_test_net")


# ---------------------------------------------------------------- parameter counts


def test_mobilenetv2_exact_params_and_seed_size() -> None:
    params = n_params("mobilenetv2", 10)
    assert params == 2_296_922
    assert round(fp32_mb(params), 2) == 9.19  # 9.187688 MB
    assert round(fp32_mb(params), 1) == 9.2  # the seed's "Original Size (FP32): 9.2 MB"


def test_resnet18_exact_params_and_seed_size() -> None:
    params = n_params("resnet18", 100)
    assert params == 11_220_132
    assert round(fp32_mb(params), 2) == 44.88  # 44.880528 MB; round(., 1) would be 44.9, not the seed's 44.8
    # The seed's 44.8 (and its 9.2 for MobileNetV2) are params rounded to 0.1 M, times 4 bytes:
    # 11.2 M x 4 = 44.8 and 2.3 M x 4 = 9.2 (flooring to 0.1 MB would give 9.1 for MobileNetV2).
    assert round(params / 1e6, 1) * 4 == pytest.approx(44.8)
    assert round(n_params("mobilenetv2", 10) / 1e6, 1) * 4 == pytest.approx(9.2)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("wrn_28_10", 36.5e6),  # Zagoruyko & Komodakis 2016, Table 1
        ("wrn_28_4", 5.9e6),
        ("densenet_bc_190_40", 25.6e6),  # Huang et al. 2017, Table 2
        ("resnext29_8x64d", 34.4e6),  # Xie et al. 2017, Table 7
        ("densenet121", 7.0e6),  # kuangliu/pytorch-cifar's CIFAR DenseNet-121 (6,956,298)
    ],
)
def test_params_within_1pct_of_published(name: str, published: float) -> None:
    params = n_params(name, 10)
    assert abs(params - published) / published < 0.01, f"{name}: {params:,} vs published {published:,.0f}"


def test_small_wrn_params_match_published_digits() -> None:
    # Published to 2 significant figures (2.7 M, 0.69 M), so compare at that precision, not within 1%.
    assert round(n_params("wrn_16_4", 10) / 1e6, 1) == 2.7  # 2,748,890
    assert round(n_params("wrn_16_2", 10) / 1e6, 2) == 0.69  # 691,674


def test_resnet20_option_b_shortcut_count() -> None:
    # He et al.'s ResNet-20 (option A) has 269,722 params; option-B adds the two 1x1 conv+BN shortcuts.
    shortcuts = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params("resnet20", 10) == 269_722 + shortcuts == 272_474


def test_mobilenetv2_width_mult() -> None:
    assert n_params("mobilenetv2", 10, width_mult=1.0) == 2_296_922
    half, quarter = n_params("mobilenetv2_x0_5"), n_params("mobilenetv2_x0_25")
    assert quarter < half < 2_296_922
    assert n_params("mobilenetv2", 10, width_mult=0.5) == half
    with pytest.raises(ValueError, match="width_mult"):
        create_model("mobilenetv2", width_mult=0.0)
    with pytest.raises(ValueError, match="activation"):
        create_model("mobilenetv2_x0_25", activation="gelu")
    relu6 = create_model("mobilenetv2_x0_25", activation="relu6")
    assert any(isinstance(m, nn.ReLU6) for m in relu6.modules())


# ---------------------------------------------------------------- the contract every model keeps


class _CountQuantizableCalls(TorchFunctionMode):
    """Counts conv2d / linear calls, to check each layer is one module called exactly once per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (F.conv2d, torch.conv2d, F.linear, torch._C._nn.linear):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _check_structure(name: str, model: nn.Module, num_classes: int) -> None:
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == num_classes, name
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 3, name
    all_modules = list(model.named_modules(remove_duplicate=False))
    assert len(all_modules) == len(list(model.named_modules())), f"{name} reuses a module object"
    for mod_name, m in all_modules:
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            assert m.inplace is False, f"{name}.{mod_name} is an inplace activation"
        assert not isinstance(m, (nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU)), f"{name}.{mod_name}"


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS))
def test_model_contract(name: str) -> None:
    is_small = bool({"small", "student"} & set(model_tags(name)))
    # A real CPU forward at 10 classes (teachers: batch 1 in eval mode, as BN on one sample is degenerate;
    # the rest: batch 2 in train mode), and a meta-device build + forward at 100 classes, which checks the
    # same shapes without paying for a second initialisation and forward of a 36 M-parameter teacher.
    for num_classes, device in ((10, "cpu"), (100, "meta")):
        batch = 2 if is_small else 1
        torch.manual_seed(0)
        with torch.device(device):
            model = create_model(name, num_classes)
            x = torch.randn(batch, 3, 32, 32)
        _check_structure(name, model, num_classes)
        model.train(is_small)
        counter = _CountQuantizableCalls()
        with torch.no_grad(), counter:
            out = model(x)
        assert out.shape == (batch, num_classes), name
        assert out.dtype == torch.float32, name
        if device == "cpu":
            assert torch.isfinite(out).all(), name
        n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        assert counter.calls == n_layers, f"{name}: {counter.calls} conv/linear calls for {n_layers} layers"


class _ConvTwice(nn.Module):
    """Breaks the convention on purpose: one conv module used twice, an inplace ReLU, a functional conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(self.conv1(x)))
        x = F.conv2d(x, torch.ones(3, 3, 1, 1))
        return self.fc(x.mean((2, 3)))


def test_contract_checks_catch_violations() -> None:
    model = _ConvTwice()
    with pytest.raises(AssertionError, match="inplace"):
        _check_structure("bad", model, 10)
    counter = _CountQuantizableCalls()
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 8, 8))
    assert counter.calls == 4 != 2  # conv1 twice + functional conv + fc, for two layers


def test_init_conventions_and_determinism() -> None:
    torch.manual_seed(123)
    a = create_model("resnet20", 100)
    torch.manual_seed(123)
    b = create_model("resnet20", 100)
    torch.manual_seed(124)
    c = create_model("resnet20", 100)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layer3.0.conv2.weight"], c.state_dict()["layer3.0.conv2.weight"])
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
    # Kaiming-normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    w = a.layer3[1].conv1.weight  # 64 x 64 x 3 x 3 = 36,864 samples
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self) -> None:
        self.bytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.bytes += t.numel() * t.element_size()
            return t

        super().__init__(pack, lambda t: t)


def test_densenet_memory_efficient_matches_and_saves_memory() -> None:
    # A small DenseNet-BC (the same classes as densenet_bc_190_40 / densenet121) keeps this fast.
    x = torch.randn(2, 3, 32, 32)
    runs = {}
    for efficient in (False, True):
        torch.manual_seed(0)
        model = DenseNet((4, 4), growth_rate=12, num_classes=10, memory_efficient=efficient)
        saved = _SavedBytes()
        with saved:
            out = model(x)
        out.square().sum().backward()
        runs[efficient] = (model, out, saved.bytes)
    (plain, out_p, bytes_p), (eff, out_e, bytes_e) = runs[False], runs[True]
    torch.testing.assert_close(out_e, out_p)
    for (name, p_plain), p_eff in zip(plain.named_parameters(), eff.parameters()):
        torch.testing.assert_close(p_eff.grad, p_plain.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert bytes_e < 0.8 * bytes_p, (bytes_e, bytes_p)
    # The recomputed BN forward must not update the running statistics a second time.
    for bn_p, bn_e in zip(plain.modules(), eff.modules()):
        if isinstance(bn_p, nn.BatchNorm2d):
            assert int(bn_e.num_batches_tracked) == int(bn_p.num_batches_tracked) == 1
            torch.testing.assert_close(bn_e.running_mean, bn_p.running_mean)
            torch.testing.assert_close(bn_e.running_var, bn_p.running_var)
