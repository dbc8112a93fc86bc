"""User code on the cluster (issue 19): the spec's `py_modules` / `--py-modules` reach every Ray worker through the
job's runtime_env, not through the driver's sys.path. Checked on a two-node local Ray (ray.cluster_utils)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from kdsearch.cli import main
from kdsearch.spec import builtin_spec_dir

ROOT = Path(__file__).resolve().parent.parent

DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from kdsearch.raycluster import ensure_ray

    address, pkg, ship = sys.argv[1], sys.argv[2], sys.argv[3] == "ship"
    ensure_ray(address, py_modules=(pkg,) if ship else ())

    @ray.remote(num_cpus=1)
    def where_is_it():
        import kds_cluster_pkg
        return {"file": kds_cluster_pkg.__file__, "answer": kds_cluster_pkg.ANSWER,
                "node": ray.get_runtime_context().get_node_id()}

    try:
        print(json.dumps(ray.get(where_is_it.remote())))
    except Exception as err:
        print(json.dumps({"error": type(err).__name__ + ": " + str(err).splitlines()[0]}))
""")


@pytest.mark.timeout(300)
def test_workers_on_another_node_import_the_users_package_through_runtime_env(tmp_path):
    from ray.cluster_utils import Cluster

    pkg = tmp_path / "user" / "kds_cluster_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("ANSWER = 42\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}  # the package is not on it
    env.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # work runs on the worker node only
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()

        def drive(mode: str) -> dict:
            out = subprocess.run([sys.executable, "-c", DRIVER, cluster.address, str(pkg), mode], cwd=tmp_path,
                                 env=env, capture_output=True, text=True, timeout=180)
            return json.loads(out.stdout.strip().splitlines()[-1])

        shipped = drive("ship")
        assert shipped.get("answer") == 42, shipped
        assert shipped["node"] == worker.node_id
        assert not shipped["file"].startswith(str(tmp_path / "user")), shipped  # Ray's copy, not the driver's folder
        assert "runtime_resources" in shipped["file"] and "py_modules" in shipped["file"], shipped
        unshipped = drive("none")  # the control: without py_modules the worker cannot import it
        assert "ModuleNotFoundError" in unshipped.get("error", ""), unshipped
    finally:
        cluster.shutdown()


def _spec(tmp_path: Path, **extra) -> Path:
    data = yaml.safe_load((builtin_spec_dir() / "smoke.yaml").read_text())
    data["search"]["budgets_mb"] = [1.0]
    data.update(extra)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _write_pkg(pkg: Path) -> Path:
    """A user's package with one factory `net(num_classes, width)` (not importable until someone ships it)."""
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from torch import nn\n\ndef net(num_classes=10, width=4):\n"
                                     "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), "
                                     "nn.Flatten(), nn.Linear(width, num_classes))\n")
    return pkg


def test_py_modules_flag_makes_the_users_package_importable_for_validate(tmp_path, capsys):
    pkg = _write_pkg(tmp_path / "user" / "kds_flag_pkg")
    data = yaml.safe_load(_spec(tmp_path).read_text())
    data["student"] = {**data["student"], "arch": "kds_flag_pkg:net", "candidates": []}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    args = ["validate", str(tmp_path / "s.yaml"), "--run-dir", str(tmp_path / "run")]
    try:
        assert main(args) == 2 and "no module named 'kds_flag_pkg'" in capsys.readouterr().err
        assert main([*args, "--py-modules", str(pkg)]) == 0, capsys.readouterr().err
    finally:
        sys.path[:] = [p for p in sys.path if p != str(tmp_path / "user")]
        sys.modules.pop("kds_flag_pkg", None)


@pytest.mark.parametrize(("entry", "cause"), [("missing", "is not a folder or a .whl"),
                                              ("plain", "has no __init__.py")])
def test_a_bad_py_modules_entry_is_one_line(entry, cause, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    spec = _spec(tmp_path, py_modules=[str(tmp_path / entry)])
    assert main(["validate", str(spec), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec field 'py_modules[0]'" in err and cause in err, err


def test_report_imports_the_runs_own_py_modules_and_a_missing_one_is_one_line(tmp_path, capsys):
    """`kdsearch report RUN_DIR` rebuilds the student to size it: from the run's spec.yaml py_modules."""
    from kdsearch.checkpoints import save_model
    from kdsearch.io import atomic_write_json
    from kdsearch.spec import load_spec

    pkg = _write_pkg(tmp_path / "user" / "kds_report_pkg")
    run = tmp_path / "run"
    spec = load_spec("smoke", {"student.arch": "kds_report_pkg:net", "student.kwargs": {"width": 6},
                               "student.candidates": [], "py_modules": [str(pkg)]})
    spec.save(run / "spec.yaml")
    sys.path.insert(0, str(tmp_path / "user"))
    try:
        from kds_report_pkg import net

        save_model(run / "students" / "s0" / "kd.pt", net(10, 6), arch="kds_report_pkg:net", num_classes=10,
                   kwargs={"width": 6})
    finally:
        sys.path.remove(str(tmp_path / "user"))
        sys.modules.pop("kds_report_pkg", None)
    atomic_write_json(run / "students" / "s0" / "kd.json", {"kind": "kd", "seed": 0, "val_acc": 50.0, "test_acc": 40.0})
    try:
        assert main(["report", str(run)]) == 0, capsys.readouterr().err
        text = (run / "report.md").read_text()
        assert "kds_report_pkg:net" in text and f"{(3 * 6 * 9 + 6 + 6 * 10 + 10) * 4 / 1e6:.4f}" in text
        capsys.readouterr()
        sys.path[:] = [p for p in sys.path if p != str(tmp_path / "user")]
        sys.modules.pop("kds_report_pkg", None)
        spec.model_copy(update={"py_modules": ()}).save(run / "spec.yaml")
        assert main(["report", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no module named 'kds_report_pkg'" in err, err
    finally:
        sys.path[:] = [p for p in sys.path if p != str(tmp_path / "user")]
        sys.modules.pop("kds_report_pkg", None)
