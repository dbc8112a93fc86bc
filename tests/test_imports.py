"""Import paths wherever a spec takes a name (issue 19): `arch`, `distill.strategy`, `search.sampler`.

A user's package is written to a temporary folder; `kdsearch validate` imports and builds every path once,
and each way that can fail is one line naming the field and the cause, with exit 2.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from kdsearch.checkpoints import load_model, save_model
from kdsearch.cli import main
from kdsearch.imports import ImportPathError, check_import_path, resolve
from kdsearch.models import create_model
from kdsearch.spec import SpecError, builtin_spec_dir, parse_spec

USER_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.dw(torch.relu(self.conv(x))))), 1))


def small(num_classes=10, width=8):
    return Net(num_classes, width)


def not_a_module(num_classes=10):
    return "a string"


def raises(num_classes=10):
    raise RuntimeError("weights file missing")


class NoLayers(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def no_layers(num_classes=10):
    return NoLayers()


NOT_CALLABLE = 42


def mean_strategy(teacher_logits, labels, temperature):
    return torch.softmax(teacher_logits / temperature, -1).mean(0)


def two_arg_strategy(teacher_logits, labels):
    return teacher_logits.mean(0)


def bad_shape_strategy(teacher_logits, labels, temperature):
    return teacher_logits


class NotASampler:
    pass
'''


@pytest.fixture(scope="module")
def userpkg(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A package `kds_user_pkg` (with a module that fails at import) on sys.path for this module's tests."""
    root = tmp_path_factory.mktemp("user")
    pkg = root / "kds_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_CODE)
    (pkg / "broken.py").write_text("raise ImportError('needs libfoo')\n")
    sys.path.insert(0, str(root))
    yield str(root)
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.startswith("kds_user_pkg")]:
        del sys.modules[name]


def _spec(tmp_path: Path, **sections: dict) -> Path:
    data = yaml.safe_load((builtin_spec_dir() / "smoke.yaml").read_text())
    data["search"]["budgets_mb"] = [1.0]
    for dotted, value in sections.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


MALFORMED = [
    # (spec fields, the field named, a phrase of the cause)
    ({"student__arch": "kds_user_pkg.nope:small"}, "student.arch", "no module named 'kds_user_pkg.nope'"),
    ({"student__arch": "kds_nowhere.nets:small"}, "student.arch", "no module named 'kds_nowhere'"),
    ({"student__arch": "kds_user_pkg.nets:missing"}, "student.arch", "has no attribute 'missing'"),
    ({"student__arch": "kds_user_pkg.broken:small"}, "student.arch", "ImportError: needs libfoo"),
    ({"student__arch": "kds_user_pkg.nets:raises"}, "student.arch", "RuntimeError: weights file missing"),
    ({"student__arch": "kds_user_pkg.nets:not_a_module"}, "student.arch", "returned a str, not a torch.nn.Module"),
    ({"student__arch": "kds_user_pkg.nets:no_layers"}, "student.arch", "no quantizable layer"),
    ({"student__arch": "kds_user_pkg.nets:NOT_CALLABLE"}, "student.arch", "is a int, not a callable"),
    ({"student__arch": "kds_user_pkg.nets:small", "student__kwargs": {"depth": 3}}, "student.arch",
     "unexpected keyword argument 'depth'"),
    ({"student__arch": "kds_user_pkg.nets:small", "student__kwargs": {"num_classes": 3}}, "student.kwargs",
     "num_classes comes from the data"),
    ({"student__arch": "kds_user_pkg..nets:small"}, "student.arch", "is not an import path"),
    ({"student__arch": "kds_user_pkg.nets:small:x"}, "student.arch", "is not an import path"),
    ({"teachers__models": [{"arch": "kds_user_pkg.nets:missing"}]}, "teachers.models[0].arch", "has no attribute"),
    ({"student__candidates": ["kds_user_pkg.nets:not_a_module"]}, "student.candidates[0]", "not a torch.nn.Module"),
    ({"distill__strategy": "kds_user_pkg.nets:two_arg_strategy"}, "distill.strategy", "a strategy is called as"),
    ({"distill__strategy": "kds_user_pkg.nets:bad_shape_strategy"}, "distill.strategy", "returns soft targets"),
    ({"distill__strategy": "kds_user_pkg.nets:nothing"}, "distill.strategy", "has no attribute 'nothing'"),
    ({"distill__strategy": "averag"}, "distill.strategy", "unknown strategy 'averag'"),
    ({"search__sampler": "kds_user_pkg.nets:NotASampler"}, "search.sampler", "not an Optuna sampler class"),
    ({"search__sampler": "optuna.samplers:NoSuchSampler"}, "search.sampler", "has no attribute 'NoSuchSampler'"),
    ({"search__sampler": "optuna.samplers:RandomSampler", "search__sampler_kwargs": {"speed": 2}}, "search.sampler",
     "unexpected keyword argument 'speed'"),
    ({"search__sampler": "tpe", "search__sampler_kwargs": {"bogus": 1}}, "search.sampler_kwargs", "bogus"),
]


@pytest.mark.parametrize(("fields", "field", "cause"), MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_every_malformed_import_path_is_one_line_naming_the_field(fields, field, cause, userpkg, tmp_path, capsys):
    assert main(["validate", str(_spec(tmp_path, **fields)), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"spec field '{field}'" in err and cause in err, err


def test_import_paths_validate_and_build(userpkg, tmp_path, capsys):
    spec = _spec(tmp_path, student__arch="kds_user_pkg.nets:small", student__kwargs={"width": 4},
                 teachers__models=[{"arch": "kds_user_pkg.nets:small", "kwargs": {"width": 16}}, "resnet8"],
                 distill__strategy="kds_user_pkg.nets:mean_strategy",
                 search__sampler="optuna.samplers:QMCSampler", search__sampler_kwargs={"scramble": True})
    assert main(["validate", str(spec), "--run-dir", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    model = create_model("kds_user_pkg.nets:small", num_classes=5, width=4)
    assert model.fc.out_features == 5 and model.conv.out_channels == 4


def test_registered_names_validate_without_importing_torch(tmp_path):
    """A spec of registered names (and a well-formed import path) parses in a process that never imports torch."""
    code = textwrap.dedent("""
        import sys
        from kdsearch.spec import load_spec
        load_spec("smoke", {"distill.strategy": "average", "search.sampler": "nsga2"})
        load_spec("smoke", {"student.arch": "somepkg.nets:factory"})
        assert "torch" not in sys.modules, "torch imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_import_path_arch_and_kwargs_round_trip_through_the_model_file(userpkg, tmp_path):
    model = create_model("kds_user_pkg.nets:small", num_classes=7, width=6)
    path = tmp_path / "m.pt"
    save_model(path, model, arch="kds_user_pkg.nets:small", num_classes=7, kwargs={"width": 6})
    back, obj = load_model(path)
    assert obj["kwargs"] == {"width": 6} and back.conv.out_channels == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


def test_resolve_errors_are_one_line():
    with pytest.raises(ValueError, match="not an import path"):
        check_import_path("a b:c")
    with pytest.raises(ImportPathError, match="no module named"):
        resolve("kds_absent_pkg:x")
    assert resolve("torch.nn:Conv2d") is torch.nn.Conv2d


def test_spec_error_for_a_bad_arch_names_import_paths():
    with pytest.raises(SpecError, match="or an import path"):
        parse_spec({**yaml.safe_load((builtin_spec_dir() / "smoke.yaml").read_text()),
                    "student": {"arch": "resnet_unknown"}})


def test_kwargs_are_part_of_a_models_inputs_key_and_leave_other_keys_alone():
    """A finished model is reused only under the same key: another `kwargs:` builds another model."""
    from kdsearch.io import stable_hash
    from kdsearch.recipes import data_key, float_model_key, model_seed
    from kdsearch.spec import load_spec

    plain = load_spec("smoke")
    wide = load_spec("smoke", {"student.kwargs": {"width": 2}})
    cfg = plain.student.train
    assert float_model_key(plain, "tiny_cnn", cfg, 0) != float_model_key(wide, "tiny_cnn", cfg, 0)
    assert float_model_key(plain, "tiny_cnn", cfg, 0) == stable_hash(
        {"data": data_key(plain), "arch": "tiny_cnn", "train": cfg.model_dump(mode="json"),
         "seed": model_seed("tiny_cnn", 0), "extra": None})  # the key of a run made before kwargs existed
    assert float_model_key(wide, "resnet8", cfg, 0) == float_model_key(plain, "resnet8", cfg, 0)  # a teacher's


def test_a_candidate_takes_kwargs_beside_its_arch(userpkg, tmp_path, capsys):
    from kdsearch.spec import load_spec

    cands = ["resnet8", {"arch": "kds_user_pkg.nets:small", "kwargs": {"width": 5}}]
    spec = load_spec("smoke", {"student.candidates": cands})
    assert spec.student.candidates == ("resnet8", "kds_user_pkg.nets:small")
    assert spec.model_kwargs("kds_user_pkg.nets:small") == {"width": 5} and spec.model_kwargs("resnet8") == {}
    assert parse_spec(spec.to_dict()) == spec  # what every Ray task parses
    bad = _spec(tmp_path, student__candidates=[{"arch": "kds_user_pkg.nets:small", "kwargs": {"depth": 2}}])
    assert main(["validate", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "spec field 'student.candidates[0]'" in err and "unexpected keyword argument 'depth'" in err, err


def test_train_distill_takes_an_import_path_and_checks_it_first(userpkg, tmp_path, capsys):
    args = ["train", str(_spec(tmp_path)), "--run-dir", str(tmp_path / "run"), "--model", "student", "--distill"]
    assert main([*args, "kds_user_pkg.nets:two_arg_strategy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'--distill'" in err and "a strategy is called as" in err, err
