"""The command line: user mistakes are one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdsearch.cli import main

CASES = [
    (["validate", "nope"], "unknown spec 'nope'"),
    (["validate", "smoke", "--set", "data.augment=autoaug"], "spec field 'data.augment'"),
    (["validate", "smoke", "--set", "student.arch=resnet99"], "unknown architecture 'resnet99'"),
    (["validate", "smoke", "--set", "quant.bits=[8,7]"], "spec field 'quant.bits'"),
    (["validate", "smoke", "--set", "teachers.train.epochs=0"], "spec field 'teachers.train.epochs'"),
    (["validate", "smoke", "--set", "oops"], "section.key=value"),
    (["validate", "smoke", "--device", "cuda"], "no GPU is visible"),
    (["validate", "smoke", "--set", "data.dataset=imagefolder", "--set", "data.root=/nonexistent/x",
      "--set", "data.num_classes=null"], "/nonexistent/x"),
    (["validate", "smoke", "--set", "data.dataset=cifar10", "--set", "data.download=false",
      "--set", "data.root=/nonexistent/c", "--set", "data.num_classes=null"], "cifar"),
    (["train", "smoke", "--model", "resnet99"], "--model 'resnet99'"),
    (["validate", "smoke", "--set", "search.budgets_mb=[0.001]"], "below the smallest size tiny_cnn can reach"),
    (["validate", "smoke", "--set", "quant.pin={layer9: 8}"], "spec field 'quant.pin'"),
    (["status", "/nonexistent/run"], "run directory"),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(c[0][2:]) or c[0][1] for c in CASES])
def test_user_errors_exit_2_with_one_line(argv, expected, capsys, tmp_path):
    if "--device" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    extra = [] if argv[0] == "status" else ["--run-dir", str(tmp_path / "run")]
    code = main([*argv, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kdsearch: error:"), err
    assert expected in err, err


def test_console_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdsearch", "validate", "smoke", "--set", "seed=x",
                           "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "spec field 'seed'" in proc.stderr


def test_validate_ok_and_listings(capsys, tmp_path):
    assert main(["validate", "smoke", "--run-dir", str(tmp_path)]) == 0
    assert "smoke: ok" in capsys.readouterr().out
    assert main(["specs"]) == 0
    assert {"smoke", "cifar10", "cifar100"} <= set(capsys.readouterr().out.split())
    assert main(["models", "--tag", "student"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2" in out and "2.297 M" in out
