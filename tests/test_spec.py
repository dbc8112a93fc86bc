"""Spec loading: the shipped specs validate, and every kind of mistake is one line naming the field."""

from __future__ import annotations

import copy
import os
from pathlib import Path

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
    (("search", "budgets_gbops"), [0], "search.budgets_gbops", "> 0 GBOPs"),
    (("search", "budgets_gbops"), [float("inf")], "search.budgets_gbops", "finite"),
    (("search", "budgets_gbops"), "a lot", "search.budgets_gbops", "tuple"),
    (("search", "budgets_mb"), [], "search.budgets_gbops", "no budget given"),
    (("data", "num_classes"), 100, "data", "num_classes"),
    (("name",), "has space", "name", "pattern"),
    (("student", "gpus"), -1, "student.gpus", "greater than or equal"),
    (("student", "cpus"), 0, "student.cpus", "greater than"),
    (("seeds",), [1, 2, 1], "seeds", "distinct"),
    (("seeds",), [], "seeds", "at least 1"),
    (("seeds",), [0.5], "seeds.0", "integer"),
    (("data", "val_size"), 0, "data.val_size", "count >= 1"),
    (("data", "val_size"), 1.5, "data.val_size", "fraction in (0, 1)"),
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
    if path == ("seeds",):
        d.pop("seed", None)  # the short form and seeds together are an error of their own
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


def test_bops_budgets_alone_or_beside_size_budgets(smoke, tmp_path):
    d = copy.deepcopy(smoke)
    plain = parse_spec(d)
    assert plain.search.budgets_gbops == () and "budgets_gbops" not in plain.to_dict()["search"]  # keys as before
    d["search"] = {**d["search"], "budgets_gbops": [0.5, 1]}
    both = parse_spec(d)
    assert both.search.budgets_gbops == (0.5, 1.0) and both.search.budgets_mb == plain.search.budgets_mb
    assert both.fingerprint("search") != plain.fingerprint("search")
    del d["search"]["budgets_mb"]
    alone = parse_spec(d)
    assert alone.search.budgets_mb == () and parse_spec(alone.to_dict()) == alone
    alone.save(tmp_path / "s.yaml")
    assert load_spec(tmp_path / "s.yaml") == alone


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


# ---- seeds -------------------------------------------------------------------------------------------------
def _without_seed(smoke: dict) -> dict:
    d = copy.deepcopy(smoke)
    d.pop("seed", None)
    d.pop("seeds", None)
    return d


def test_seeds_forms(smoke):
    assert smoke["seeds"] == [0] and parse_spec(smoke).seeds == (0,)  # the shipped form
    assert parse_spec(_without_seed(smoke)).seeds == (0,)  # the default
    short = parse_spec({**_without_seed(smoke), "seed": 5})
    assert short.seeds == (5,) and short.seed == 5
    many = parse_spec({**_without_seed(smoke), "seeds": [3, 1, 2]})
    assert many.seeds == (3, 1, 2) and many.seed == 3  # order kept: the first seed runs the once-per-run stages
    assert parse_spec(smoke, {"seed": 7}).seeds == (7,)  # --set seed=7 replaces the spec's seeds
    assert parse_spec(smoke, {"seeds": [0, 1, 2]}).seeds == (0, 1, 2)  # --set seeds=[...] too
    d = many.to_dict()
    assert d["seeds"] == [3, 1, 2] and "seed" not in d
    assert many.key_dict() == {**d, "seed": 3}
    assert short.key_dict()["seed"] == 5 and short.key_dict()["seeds"] == [5]


def test_seeds_roundtrip(tmp_path, smoke):
    spec = parse_spec({**_without_seed(smoke), "seeds": [2, 7]})
    spec.save(tmp_path / "spec.yaml")
    saved = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    assert saved["seeds"] == [2, 7] and "seed" not in saved
    assert load_spec(tmp_path / "spec.yaml") == spec


def test_more_seeds_keep_the_once_per_run_keys(smoke):
    """Adding seeds must not redo the teachers, the sensitivity table or the search (they run under seeds[0])."""
    one = parse_spec(smoke)
    three = parse_spec({**_without_seed(smoke), "seeds": [0, 1, 2]})
    other_first = parse_spec({**_without_seed(smoke), "seeds": [1, 0, 2]})
    for sections in (("seed",), ("seed", "data", "teachers"), ("seed", "search", "quant", "sensitivity")):
        assert one.fingerprint(*sections) == three.fingerprint(*sections)
    assert one.fingerprint("seed") != other_first.fingerprint("seed")
    assert one.fingerprint("seeds") != three.fingerprint("seeds") and one.fingerprint() != three.fingerprint()


def test_seed_and_seeds_together_is_one_line_error(smoke):
    d = {**_without_seed(smoke), "seed": 0, "seeds": [0, 1]}  # both in one file
    with pytest.raises(SpecError) as ei:
        parse_spec(d)
    msg = str(ei.value)
    assert "\n" not in msg and "seed" in msg and "seeds" in msg and "not both" in msg, msg


def test_seed_and_seeds_together_names_the_field(smoke):
    d = {**_without_seed(smoke), "seed": 0, "seeds": [0, 1]}
    with pytest.raises(SpecError) as ei:
        parse_spec(d)
    assert ei.value.field in ("seed", "seeds") and str(ei.value).startswith(f"spec field '{ei.value.field}'")


def test_student_resources(smoke):
    spec = parse_spec(smoke)
    assert (spec.student.gpus, spec.student.cpus) == (1.0, 1.0)  # the defaults (smoke.yaml sets neither)
    cpu_only = parse_spec(smoke, {"student.gpus": 0, "student.cpus": 2})
    assert (cpu_only.student.gpus, cpu_only.student.cpus) == (0.0, 2.0)
    shared = parse_spec(smoke, {"student.gpus": 0.25, "student.cpus": 0.5})
    assert (shared.student.gpus, shared.student.cpus) == (0.25, 0.5)
    assert spec.fingerprint("teachers") == cpu_only.fingerprint("teachers")


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


MALFORMED_FILES = [  # (file name, bytes or None for a directory, what the one-line message must say)
    ("png.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a UTF-8 text file (byte 0x89 at offset 0)"),
    ("latin1.yaml", "name: café\n".encode("latin-1"), "not a UTF-8 text file (byte 0xe9 at offset 9)"),
    ("nul.yaml", b"name: a\x00b\n", "unacceptable character #x0000"),
    ("bad.yaml", b"name: [unclosed\n", "not valid YAML at line 2"),
    ("empty.yaml", b"", "is empty"),
    ("comments.yaml", b"# nothing yet\n", "is empty"),
    ("list.yaml", b"- name: x\n- seed: 1\n", "holds a list, but a spec must be a YAML mapping"),
    ("scalar.yaml", b"smoke\n", "holds a string, but a spec must be a YAML mapping"),
    ("number.yaml", b"42\n", "holds a number"),
    ("specdir", None, "is a directory, not a spec file"),
    ("dir.yaml", None, "is a directory, not a spec file"),
]


@pytest.mark.parametrize("name,content,hint", MALFORMED_FILES, ids=[m[0] for m in MALFORMED_FILES])
def test_malformed_spec_files_are_one_line_naming_the_file(tmp_path, name, content, hint):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and hint in msg, msg


def test_a_section_that_is_not_a_mapping_names_the_section(smoke):
    d = copy.deepcopy(smoke)
    d["data"] = 5
    with pytest.raises(SpecError, match=r"^spec field 'data': must be a mapping .*under 'data:'.*got 5$"):
        parse_spec(d)
    with pytest.raises(SpecError, match=r"^a spec must be a YAML mapping at the top level \(got a list\)$"):
        parse_spec([smoke])  # type: ignore[arg-type]


@pytest.mark.parametrize("text,hint", [
    ("search.budgets_mb=[1", "spec field 'search.budgets_mb': --set value '[1' is not valid YAML"),
    ('name="x', "spec field 'name': --set value '\"x' is not valid YAML"),
    ("=3", "override '=3' must look like section.key=value"),
    ("search..num_trials=3", "must look like section.key=value"),
    ("search.num_trials", "must look like section.key=value"),
])
def test_bad_overrides_are_one_line(text, hint):
    with pytest.raises(SpecError) as ei:
        parse_override(text)
    assert "\n" not in str(ei.value) and hint in str(ei.value), str(ei.value)


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(SpecError, match=r"spec file '.*missing\.json' not found; give a YAML file or one of the "
                                        r"built-in specs: .*smoke"):
        load_spec(tmp_path / "missing.json")
    with pytest.raises(SpecError, match=r"spec file 'conf/nothing' not found"):
        load_spec("conf/nothing")
    with pytest.raises(SpecError, match=r"^unknown spec 'smok'; .*smoke"):
        load_spec("smok")


def test_unreadable_spec_file_says_so(tmp_path, monkeypatch):
    """A permission error (simulated: tests may run as root, who reads any file) is one line naming the file."""
    path = tmp_path / "secret.yaml"
    path.write_text("name: x\n")
    real = Path.read_bytes

    def deny(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(SpecError, match=r"^cannot read spec file .*secret\.yaml \(Permission denied\); make it "
                                        r"readable \(chmod \+r\)$"):
        load_spec(path)
