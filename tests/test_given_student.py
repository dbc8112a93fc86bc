"""A trained student as the start (issue 19): `student.checkpoint` is the FP32 row, measured on the run's splits,
and the start of KD, QAT and the search; the report says it was given, not trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdsearch.cli import main
from kdsearch.data import load_data
from kdsearch.fp32 import given_student_weights, import_student, kd_model_key
from kdsearch.io import atomic_write_json
from kdsearch.models import create_model
from kdsearch.report import seed_table, write_report
from kdsearch.spec import builtin_spec_dir, load_spec

TINY = {"data.train_size": 256, "data.test_size": 128}


def _accuracy(model: torch.nn.Module, split, mean, std) -> float:
    """Top-1 (%) by hand: (x / 255 - mean) / std, argmax; independent of kdsearch's evaluate loop."""
    x = split.images.float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    return 100.0 * (pred == split.labels).float().mean().item()


@pytest.fixture(scope="module")
def given(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny_cnn trained for a few steps outside kdsearch, saved as a bare state_dict (a user's own file)."""
    tmp = tmp_path_factory.mktemp("given")
    spec = load_spec("smoke", TINY)
    bundle = load_data(spec.data)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = (bundle.train.images.float() / 255.0 - torch.tensor(bundle.mean).view(1, 3, 1, 1)) / \
        torch.tensor(bundle.std).view(1, 3, 1, 1)
    for step in range(30):
        i = torch.arange(step * 32, step * 32 + 32) % len(bundle.train)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), bundle.train.labels[i]).backward()
        opt.step()
    path = tmp / "mine.pt"
    torch.save({"model": model.state_dict()}, path)
    accs = {"val_acc": _accuracy(model, bundle.val, bundle.mean, bundle.std),
            "test_acc": _accuracy(model, bundle.test, bundle.mean, bundle.std)}
    return path, accs


def test_the_fp32_row_is_the_given_model_measured_on_this_runs_splits(given, tmp_path):
    path, accs = given
    spec = load_spec("smoke", {**TINY, "student.checkpoint": str(path)})
    m = import_student(spec, tmp_path / "students" / "s0" / "scratch.pt", seed=0, device=torch.device("cpu"))
    assert m["kind"] == "given" and m["epochs"] == 0 and m["source"] == str(path)
    assert m["val_acc"] == pytest.approx(accs["val_acc"], abs=1e-6)
    assert m["test_acc"] == pytest.approx(accs["test_acc"], abs=1e-6)
    assert accs["val_acc"] > 15  # it learned something: the equality is not two chance levels


def test_kd_starts_from_the_given_weights_and_its_key_names_them(given):
    path, _ = given
    spec = load_spec("smoke", {**TINY, "student.checkpoint": str(path)})
    weights = given_student_weights(spec, 10)
    mine = torch.load(path, weights_only=True)["model"]
    assert weights is not None and all(torch.equal(weights[k], v) for k, v in mine.items())
    assert given_student_weights(load_spec("smoke", TINY), 10) is None
    assert kd_model_key(spec, 0, "dynamic", "t", "cache") != kd_model_key(load_spec("smoke", TINY), 0, "dynamic", "t",
                                                                            "cache")


def test_the_report_says_the_student_was_given_not_trained(given, tmp_path):
    path, accs = given
    spec = load_spec("smoke", {**TINY, "student.checkpoint": str(path)})
    spec.save(tmp_path / "spec.yaml")
    atomic_write_json(tmp_path / "students" / "s0" / "scratch.json",
                      {"arch": "tiny_cnn", "kind": "given", "seed": 0, "source": str(path), **accs})
    table = seed_table(tmp_path, spec.to_dict(), {})
    assert table.iloc[0, 0] == "Baseline (given)"
    report = write_report(tmp_path).read_text()
    assert f"given as `{path}`, not trained" in report


def test_an_unreadable_or_mismatched_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("resnet8", num_classes=10).state_dict(), wrong)
    data = yaml.safe_load((builtin_spec_dir() / "smoke.yaml").read_text())
    for ckpt, cause in ((bad, "cannot read"), (wrong, "does not fit tiny_cnn"), (tmp_path / "no.pt", "not found")):
        data["student"]["checkpoint"] = str(ckpt)
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
        assert main(["validate", str(tmp_path / "s.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "spec field 'student.checkpoint'" in err and cause in err, err
