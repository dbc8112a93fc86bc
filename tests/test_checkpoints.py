"""Model files load with weights_only=True, carry provenance, and outside checkpoints are accepted."""

from __future__ import annotations

import pytest
import torch

from kdsearch.checkpoints import CheckpointError, load_model, provenance, read_model_file, save_model
from kdsearch.models import create_model


def test_roundtrip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=5)
    path = tmp_path / "m.pt"
    save_model(path, model, arch="tiny_cnn", num_classes=5, metrics={"val_acc": 52.5, "test_acc": 50.0},
               meta=provenance({"name": "x"}, inputs_key="k"))
    obj = torch.load(path, weights_only=True)  # must not need pickle
    assert obj["meta"]["inputs_key"] == "k" and isinstance(obj["meta"]["torch"], str)
    loaded, meta = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), loaded.eval()(x))
    assert meta["metrics"] == {"val_acc": 52.5, "test_acc": 50.0}  # the choosing and the reported accuracy


def test_outside_state_dict_needs_arch(tmp_path):
    model = create_model("tiny_cnn", num_classes=5)
    path = tmp_path / "outside.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="architecture"):
        load_model(path)
    loaded, _ = load_model(path, arch="tiny_cnn", num_classes=5)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(path, arch="resnet8", num_classes=5)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": create_model("tiny_cnn", 5)}, path)  # a whole pickled nn.Module
    with pytest.raises(CheckpointError, match="weights-only"):
        read_model_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_model_file(tmp_path / "missing.pt")
