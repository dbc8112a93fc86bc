"""Spec loading: the shipped specs validate, and every kind of mistake is one line naming the field."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from kdsearch.spec import SpecError, builtin_spec_dir, list_builtin_specs, load_spec, parse_override, parse_spec


@pytest.fixture()
def smoke() -> dict:
    return yaml.safe_load((builtin_spec_dir() / "smoke.yaml").read_text())


def test_builtin_specs_load():
    names = list_builtin_specs()
    assert {"smoke", "cifar10", "cifar100"} <= set(names)
    for name in names:
        assert load_spec(name).name


def test_seed_settings_are_carried():
    c10, c100 = load_spec("cifar10"), load_spec("cifar100")
    assert [t.arch for t in c10.teachers.models] == ["densenet_bc_190_40", "wrn_28_10", "wrn_28_4"]
    assert c10.student.arch == "mobilenetv2" and c10.search.budgets_mb[0] == 1.38
    assert [t.arch for t in c100.teachers.models] == ["resnext29_8x64d", "wrn_28_10", "densenet121"]
    assert c100.student.arch == "resnet18" and c100.search.budgets_mb[0] == 6.72
    assert c10.quant.bits == c100.quant.bits == (16, 8, 4)
    assert c10.data.augment == "autoaugment" and c10.data.cutout > 0


BAD = [
    (("data", "augmnt"), "standard", "data.augmnt", "unknown key"),
    (("data", "augment"), "autoaug", "data.augment", "randaugment"),
    (("data", "dataset"), "imagenet", "data.dataset", "cifar10"),
    (("student", "arch"), "resnet99", "student.arch", "resnet18"),
    (("teachers", "models"), ["resnet20", "resnet20"], "teachers.models", "unique"),
    (("quant", "bits"), [8, 7], "quant.bits", "choose from"),
    (("quant", "act_bits"), 9, "quant.act_bits", "same"),
    (("teachers", "train", "epochs"), "many", "teachers.train.epochs", "integer"),
    (("teachers", "train", "epochs"), 0, "teachers.train.epochs", "greater than or equal"),
    (("search", "budgets_mb"), [-1], "search.budgets_mb", "> 0"),
    (("data", "num_classes"), 100, "data", "num_classes"),
    (("name",), "has space", "name", "pattern"),
]


@pytest.mark.parametrize("path,value,field,hint", BAD, ids=[b[2] + ":" + str(b[1]) for b in BAD])
def test_bad_values_name_the_field(smoke, path, value, field, hint):
    d = copy.deepcopy(smoke)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    if path == ("data", "num_classes"):  # a fixed-class dataset with a contradicting num_classes
        d["data"]["dataset"] = "cifar10"
    with pytest.raises(SpecError) as ei:
        parse_spec(d)
    msg = str(ei.value)
    assert "\n" not in msg
    assert f"'{field}" in msg and hint in msg, msg


def test_missing_section_and_synthetic_classes(smoke):
    d = copy.deepcopy(smoke)
    del d["search"]
    with pytest.raises(SpecError, match="'search': required"):
        parse_spec(d)
    d = copy.deepcopy(smoke)
    del d["data"]["num_classes"]
    with pytest.raises(SpecError, match="num_classes is required"):
        parse_spec(d)


def test_yaml_scientific_notation_and_overrides(smoke):
    d = copy.deepcopy(smoke)
    d["student"]["train"]["lr"] = "1e-4"  # PyYAML reads this as a string
    assert parse_spec(d).student.train.lr == pytest.approx(1e-4)
    spec = parse_spec(smoke, dict([parse_override("search.num_trials=3"), parse_override("data.cutout=8")]))
    assert spec.search.num_trials == 3 and spec.data.cutout == 8
    with pytest.raises(SpecError, match="section.key=value"):
        parse_override("oops")


def test_unknown_spec_name_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="unknown spec 'nope'.*smoke"):
        load_spec("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)


def test_trial_epochs_single_source(smoke):
    spec = parse_spec(smoke)
    assert spec.search.trial.epochs == spec.search.trial_epochs


def test_fingerprint_tracks_sections(smoke):
    a = parse_spec(smoke)
    b = parse_spec(smoke, {"search.num_trials": 99})
    assert a.fingerprint("data", "teachers") == b.fingerprint("data", "teachers")
    assert a.fingerprint("search") != b.fingerprint("search")


def test_spec_roundtrip(tmp_path, smoke):
    spec = parse_spec(smoke)
    spec.save(tmp_path / "spec.yaml")
    assert load_spec(tmp_path / "spec.yaml") == spec


def test_relative_paths_become_absolute(smoke, tmp_path, monkeypatch):
    """Tune trials run in their own folders, so a relative data root must not stay relative."""
    monkeypatch.chdir(tmp_path)
    d = copy.deepcopy(smoke)
    d["data"].update(dataset="imagefolder", root="data/cifar.tar.gz", num_classes=None)
    d["teachers"]["models"] = [{"arch": "resnet8", "checkpoint": "~/t.pt"}]
    spec = parse_spec(d)
    assert spec.data.root == str(tmp_path / "data" / "cifar.tar.gz")
    assert spec.teachers.models[0].checkpoint == os.path.expanduser("~/t.pt")


def test_static_model_names_match_the_registry():
    """`kdsearch.spec` checks architecture names against a static list so that it never imports torch; the list
    must be exactly the registry's, or a spec naming a new architecture would be refused (or a removed one taken)."""
    from kdsearch.model_names import MODEL_NAMES
    from kdsearch.models import list_models

    assert sorted(MODEL_NAMES) == list_models(), "update kdsearch/model_names.py to the registry's names"


def test_arch_check_uses_the_registry_once_it_is_loaded(smoke, monkeypatch):
    """An architecture registered at run time (a plugin, a test) is accepted, as it was before the static list."""
    import kdsearch.models.registry as registry
    from kdsearch.models import register_model

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    register_model("runtime_only_net", tags=("small",))(lambda num_classes=10, **kw: None)
    d = copy.deepcopy(smoke)
    d["student"]["arch"] = "runtime_only_net"
    assert parse_spec(d).student.arch == "runtime_only_net"
