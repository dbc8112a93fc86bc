"""The command line: user mistakes are one line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdsearch.cli import main

ROOT = Path(__file__).resolve().parent.parent

CASES = [
    (["validate", "nope"], "unknown spec 'nope'"),
    (["validate", "smoke", "--set", "data.augment=autoaug"], "spec field 'data.augment'"),
    (["validate", "smoke", "--set", "student.arch=resnet99"], "unknown architecture 'resnet99'"),
    (["validate", "smoke", "--set", "quant.bits=[8,7]"], "spec field 'quant.bits'"),
    (["validate", "smoke", "--set", "teachers.train.epochs=0"], "spec field 'teachers.train.epochs'"),
    (["validate", "smoke", "--set", "oops"], "section.key=value"),
    (["validate", "smoke", "--device", "cuda"], "no visible GPU"),
    (["validate", "smoke", "--set", "data.dataset=imagefolder", "--set", "data.root=/nonexistent/x",
      "--set", "data.num_classes=null"], "/nonexistent/x"),
    (["validate", "smoke", "--set", "data.dataset=cifar10", "--set", "data.download=false",
      "--set", "data.root=/nonexistent/c", "--set", "data.num_classes=null"], "cifar"),
    (["train", "smoke", "--model", "resnet99"], "--model 'resnet99'"),
    (["validate", "smoke", "--set", "search.budgets_mb=[0.001]"], "below the smallest size tiny_cnn can reach"),
    (["validate", "smoke", "--set", "search.budgets_gbops=[1, 0.01]"],
     "spec field 'search.budgets_gbops[1]': 0.01 GBOPs is below the smallest BOPs tiny_cnn can reach"),
    (["validate", "smoke", "--set", "search.budgets_mb=[]"], "spec field 'search.budgets_gbops': no budget given"),
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


# -- a run directory made of the files `status` and `pareto` read (no training) --------------------------------
def make_run_dir(root: Path) -> Path:
    """spec.yaml, manifest.json and search/{results.parquet, summary.json}, as a run and its search write them."""
    import pandas as pd

    from kdsearch.search.results import BASE_COLUMNS
    from kdsearch.spec import builtin_spec_dir

    run = root / "run"
    (run / "search").mkdir(parents=True)
    (run / "spec.yaml").write_text((builtin_spec_dir() / "smoke.yaml").read_text())
    (run / "manifest.json").write_text(json.dumps({"stages": {"teachers": {"finished": "2025-01-01T10:00:00",
                                                                           "seconds": 42.0}}}))
    rows = [  # number, trial_id, status, size_mb, gbops, avg_bits, acc, epochs, wall_s, epoch_s, finished_seq, retry_of
        (0, "t0", "completed", 0.0150, 0.30, 5.0, 61.25, 1, 30.0, 30.0, 0, -1),  # dominated by t2 in BOPs
        (1, "t1", "completed", 0.0180, 0.40, 6.5, 70.50, 1, 31.0, 31.0, 1, -1),
        (2, "t2", "completed", 0.0190, 0.20, 7.0, 65.00, 1, 29.0, 29.0, 2, -1),  # dominated by t1 in size
        (3, "t3", "running", float("nan"), float("nan"), float("nan"), float("nan"), 0, 5.0, float("nan"), -1, -1),
        (4, "t4", "infeasible", 0.0300, 0.9, 8.0, float("nan"), 0, float("nan"), float("nan"), -1, -1),
    ]
    df = pd.DataFrame(rows, columns=BASE_COLUMNS)
    bits = [(8, 4, 8), (8, 8, 8), (8, 8, 4), (8, 2, 8), (16, 16, 16)]  # per row: conv1, conv2, fc
    for k, layer in enumerate(("conv1", "conv2", "fc")):
        df[f"bits.{layer}"] = [b[k] for b in bits]
    df["hypervolume"] = float("nan")
    df.to_parquet(run / "search" / "results.parquet", index=False)
    (run / "search" / "summary.json").write_text(json.dumps({"budget_mb": 0.02}))
    return run


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    return make_run_dir(tmp_path)


# -- commands that must answer at once import neither torch nor Ray ---------------------------------------------
_PROBE = """
import json, sys
from kdsearch.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    try:
        rc = main(argv)
    except SystemExit as exc:  # --help
        rc = exc.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "ray", "optuna"})
    out.append({"argv": argv, "rc": rc, "heavy": heavy})
print("PROBE " + json.dumps(out))
"""


def _probe(commands: list[list[str]], cwd: Path) -> tuple[list[dict], str]:
    """Run the CLI's main on each argv, in order, in one fresh interpreter; the heavy modules loaded after each."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, proc.stdout + proc.stderr
    return json.loads(line.removeprefix("PROBE ")), proc.stderr


def test_quick_commands_import_neither_torch_nor_ray(run_dir, tmp_path):
    """--help, specs, status, pareto and a spec that fails validation need no torch or Ray (seconds to import).

    The modules are cumulative within the one interpreter, so the first command that imports one is the culprit.
    The last command (a valid spec) must import torch: it builds the student to check the budget, and it shows
    that the probe does see an import.
    """
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not a mapping\n")
    quick = [["--help"], ["specs"], ["status", str(run_dir)], ["pareto", str(run_dir)],
             ["pareto", str(run_dir), "--brief"], ["status", str(tmp_path / "nope")],
             ["validate", str(bad)], ["validate", "smoke", "--set", "student.arch=resnet99"],
             ["validate", "smoke", "--set", "search.num_trials=many"],
             ["validate", "smoke", "--run-dir", str(bad)]]
    results, stderr = _probe([*quick, ["validate", "smoke", "--run-dir", str(tmp_path / "r")]], tmp_path)
    assert "Traceback" not in stderr, stderr
    for r in results[:-1]:
        assert r["heavy"] == [], f"`kdsearch {' '.join(r['argv'])}` imported {r['heavy']}"
    assert [r["rc"] for r in results] == [0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 0]
    assert results[-1]["heavy"] == ["torch"]  # the budget check builds the student; still no Ray nor torchvision


def test_status_stage_order_is_the_pipelines():
    """status lists the stages from a static tuple (importing the pipeline imports torch); it must be the pipeline's."""
    from kdsearch.pipeline import STAGES
    from kdsearch.status import STAGE_ORDER

    assert tuple(s.name for s in STAGES) == STAGE_ORDER


# -- every malformed input: one line, exit code 2, no traceback --------------------------------------------------
def _smoke_with(**sections: object) -> str:
    import yaml

    from kdsearch.spec import builtin_spec_dir

    d = yaml.safe_load((builtin_spec_dir() / "smoke.yaml").read_text())
    return yaml.safe_dump({**d, **sections})


MALFORMED = {  # id -> (files to write: name -> bytes, None = a folder; argv with {tmp} for the folder; message)
    "binary": ({"s.yaml": b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe"}, ["validate", "{tmp}/s.yaml"],
               "{tmp}/s.yaml is not a UTF-8 text file (byte 0xff at offset 9)"),
    "latin1": ({"s.yaml": "name: résumé\n".encode("latin-1")}, ["validate", "{tmp}/s.yaml"],
               "is not a UTF-8 text file (byte 0xe9"),
    "nul": ({"s.yaml": b"name: x\x00\n"}, ["validate", "{tmp}/s.yaml"], "unacceptable character #x0000"),
    "directory": ({"specs": None}, ["validate", "{tmp}/specs"], "'{tmp}/specs' is a directory, not a spec file"),
    "run-directory": ({"r": None, "r/spec.yaml": b"name: r\n"}, ["validate", "{tmp}/r"],
                      "a run directory keeps its spec in spec.yaml"),
    "empty": ({"s.yaml": b""}, ["validate", "{tmp}/s.yaml"], "{tmp}/s.yaml is empty"),
    "list": ({"s.yaml": b"- a\n- b\n"}, ["validate", "{tmp}/s.yaml"], "{tmp}/s.yaml holds a list"),
    "scalar": ({"s.yaml": b"3.5\n"}, ["validate", "{tmp}/s.yaml"], "{tmp}/s.yaml holds a number"),
    "section-not-mapping": ({"s.yaml": _smoke_with(data=5).encode()}, ["validate", "{tmp}/s.yaml"],
                            "spec field 'data': must be a mapping"),
    "teachers-not-mapping": ({"s.yaml": _smoke_with(teachers=["resnet8"]).encode()}, ["validate", "{tmp}/s.yaml"],
                             "spec field 'teachers': must be a mapping"),
    "set-int": ({}, ["validate", "smoke", "--set", "search.num_trials=many"],
                "spec field 'search.num_trials': Input should be a valid integer"),
    "set-list": ({}, ["validate", "smoke", "--set", "quant.bits=8"], "spec field 'quant.bits'"),
    "set-section": ({}, ["validate", "smoke", "--set", "data=5"], "spec field 'data': must be a mapping"),
    "set-inside-scalar": ({}, ["validate", "smoke", "--set", "device.x=1"], "cannot override inside 'device'"),
    "set-bad-yaml": ({}, ["validate", "smoke", "--set", "quant.bits=[8, 4"], "is not valid YAML"),
    "set-no-key": ({}, ["validate", "smoke", "--set", "=4"], "must look like section.key=value"),
    "missing-json": ({}, ["validate", "{tmp}/conf/spec.json"], "spec file '{tmp}/conf/spec.json' not found"),
    "missing-yml": ({}, ["validate", "{tmp}/s.yml"], "spec file '{tmp}/s.yml' not found"),
    "run-dir-is-file": ({"f": b"x"}, ["validate", "smoke", "--run-dir", "{tmp}/f"],
                        "run directory '{tmp}/f' is a file, not a folder"),
    "status-file": ({"f": b"x"}, ["status", "{tmp}/f"], "'{tmp}/f' is a file, not a run directory"),
    "pareto-file": ({"f": b"x"}, ["pareto", "{tmp}/f"], "'{tmp}/f' is a file, not a run directory"),
    "report-file": ({"f": b"x"}, ["report", "{tmp}/f"], "'{tmp}/f' is a file, not a run directory"),
    "pareto-no-search": ({"r": None, "r/spec.yaml": b"name: r\n"}, ["pareto", "{tmp}/r"],
                         "run `kdsearch search SPEC` first"),
    "pareto-torn-results": ({"r/search": None, "r/spec.yaml": b"name: r\n", "r/search/results.parquet": b"PAR1xx"},
                            ["pareto", "{tmp}/r"], "cannot read {tmp}/r/search (ArrowInvalid"),
    "status-torn-results": ({"r/search": None, "r/spec.yaml": b"name: r\n", "r/search/results.parquet": b"PAR1"},
                            ["status", "{tmp}/r"], "cannot read {tmp}/r/search (ArrowInvalid"),
    "status-spec-list": ({"r": None, "r/spec.yaml": b"- a\n"}, ["status", "{tmp}/r"],
                         "{tmp}/r/spec.yaml is not a spec"),
    "status-spec-binary": ({"r": None, "r/spec.yaml": b"\xff\xfe\x00"}, ["status", "{tmp}/r"],
                           "cannot read {tmp}/r/spec.yaml (UnicodeDecodeError"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_one_line_exit_2(case, tmp_path, capsys):
    files, argv, expected = MALFORMED[case]
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(exist_ok=True) if content is None else path.write_bytes(content)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert len(err.splitlines()) == 1 and err.startswith("kdsearch: error:"), err
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in captured.err + captured.out


def test_unreadable_spec_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """chmod 000 would not stop root (tests may run as root), so the read itself is made to fail."""
    path = tmp_path / "locked.yaml"
    path.write_text(_smoke_with())
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self == path else real(self))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdsearch: error: cannot read spec file {path} (Permission denied); make it readable (chmod +r)"


def test_entry_point_prints_no_traceback_for_a_binary_spec(tmp_path):
    """The real console path (python -m kdsearch) for a file that is not text."""
    spec = tmp_path / "model.yaml"
    spec.write_bytes(bytes(range(256)))
    proc = subprocess.run([sys.executable, "-m", "kdsearch", "validate", str(spec)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{spec} is not a UTF-8 text file (byte 0x80 at offset 128)" in proc.stderr


# -- status and pareto print the same tables -------------------------------------------------------------------
def test_status_and_pareto_print_the_same_markdown_tables_off_a_terminal(run_dir, capsys):
    assert main(["pareto", str(run_dir)]) == 0
    pareto = capsys.readouterr().out
    assert main(["status", str(run_dir)]) == 0
    status = capsys.readouterr().out
    assert "\x1b[" not in pareto + status  # no ANSI codes in a pipe or a file
    assert pareto.splitlines()[:2] == [
        "| number | trial_id | val_acc | size_mb | gbops | avg_bits | epochs | wall_s | bits |",
        "|---|---|---|---|---|---|---|---|---|"]
    assert pareto.splitlines()[2:] == ["| 0 | t0 | 61.25 | 0.0150 | 0.3 | 5.00 | 1 | 30 | 8/4/8 |",
                                       "| 1 | t1 | 70.50 | 0.0180 | 0.4 | 6.50 | 1 | 31 | 8/8/8 |"]
    front = status.split("current Pareto front (2 trials):\n", 1)[1]
    assert front.splitlines()[:4] == ["| number | val_acc | size_mb | gbops | avg_bits | epochs | wall_s | bits |",
                                      "|---|---|---|---|---|---|---|---|",
                                      "| 0 | 61.25 | 0.0150 | 0.3 | 5.00 | 1 | 30 | 8/4/8 |",
                                      "| 1 | 70.50 | 0.0180 | 0.4 | 6.50 | 1 | 31 | 8/8/8 |"]
    assert main(["pareto", str(run_dir), "--brief"]) == 0
    brief = capsys.readouterr().out.splitlines()
    assert brief[0] == "| number | trial_id | val_acc | size_mb | gbops | avg_bits | epochs | wall_s |"


def test_pareto_in_size_or_in_bops(run_dir, capsys):
    """--cost bops: the front of accuracy against GBOPs (another front); a search from before BOPs says so."""
    import pandas as pd

    assert main(["pareto", str(run_dir), "--cost", "bops", "--brief"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["| 2 | t2 | 65.00 | 0.0190 | 0.2 | 7.00 | 1 | 29 |",
                         "| 1 | t1 | 70.50 | 0.0180 | 0.4 | 6.50 | 1 | 31 |"]
    assert main(["pareto", str(run_dir), "--cost", "size", "--brief"]) == 0
    assert [ln.split(" | ")[1] for ln in capsys.readouterr().out.splitlines()[2:]] == ["t0", "t1"]
    (run_dir / "search" / "summary.json").write_text(json.dumps({"budget_gbops": 0.5, "cost": "gbops"}))
    assert main(["pareto", str(run_dir), "--brief"]) == 0  # a BOPs-budgeted search: its own cost by default
    assert [ln.split(" | ")[1] for ln in capsys.readouterr().out.splitlines()[2:]] == ["t2", "t1"]
    results = run_dir / "search" / "results.parquet"
    pd.read_parquet(results).drop(columns=["gbops"]).to_parquet(results)
    assert main(["pareto", str(run_dir), "--cost", "bops"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no BOPs column" in err and "--cost size" in err, err
    assert main(["pareto", str(run_dir), "--cost", "size"]) == 0


def test_on_a_terminal_both_draw_rich_tables_with_the_same_cells(run_dir, capsys, monkeypatch):
    import kdsearch.tables as tables

    monkeypatch.setattr(tables, "stdout_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["pareto", str(run_dir)]) == 0
    pareto = capsys.readouterr().out
    assert main(["status", str(run_dir)]) == 0
    status = capsys.readouterr().out
    for text in (pareto, status):
        assert "|---|" not in text and "─" in text  # drawn by rich, not markdown
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        assert re.search(r"\b1 +t1 +70\.50 +0\.0180 +0\.4 +6\.50 +1 +31 +8/8/8\b", plain) or \
            re.search(r"\b1 +70\.50 +0\.0180 +0\.4 +6\.50 +1 +31 +8/8/8\b", plain), plain
