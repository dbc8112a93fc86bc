"""`kdsearch bench` (kdsearch.bench, kdsearch.stages.bench) on the real tiny run of test_finalize, few timed runs."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_finalize import build_run  # noqa: E402


@pytest.fixture(scope="module")
def benched(tmp_path_factory, ray_session):
    """A copy of the shared tiny run (its bench.json must not change the other modules' reports), benched."""
    from kdsearch.cli import main

    _, ctx = build_run(tmp_path_factory.getbasetemp() / "shared_run")
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(ctx.run_dir, run_dir, ignore=shutil.ignore_patterns("cache", "tune", "*.ckpt"))
    assert main(["bench", str(run_dir), "--runs", "5"]) == 0
    return run_dir


def test_bench_json_names_the_machine_and_measures_every_model(benched) -> None:
    b = json.loads((benched / "bench.json").read_text())
    assert b["intra_op_num_threads"] == 1 and b["batch"] == 1 and b["runs"] == 5 and b["onnxruntime"]
    assert isinstance(b["machine"]["vnni"], bool) and isinstance(b["machine"]["flags"], list)
    final = pd.read_parquet(benched / "final" / "final.parquet")
    assert sorted((r["id"], r["seed"]) for r in b["models"]) == sorted(zip(final["id"], final["seed"]))
    assert [r["seed"] for r in b["fp32"]] == sorted(set(final["seed"]))
    for r in b["fp32"] + b["models"]:
        assert 0 < r["median_ms"] <= r["p90_ms"] and r["runs"] == 5
        assert not r["onnx"].startswith("/") and (benched / r["onnx"]).is_file()  # relative to the run directory
    for r in b["models"]:
        f = r["fusion"]
        assert f["ok"] and not f["float_unfused"]
        if r["id"].endswith("_8"):  # the uniform 8-bit models: every layer integer
            assert f["integer_total"] > 0 and not f["float_by_design"]
        if r["id"].endswith("_16"):  # 16-bit layers: float by design (no fp16 conv in ORT's CPU provider)
            assert f["integer_total"] == 0 and f["float_by_design"]
        assert r["agreement"] >= 90.0 and r["test_images"] > 0
        assert isinstance(r["requantized"], list) and all(isinstance(n, str) for n in r["requantized"])
        assert r["speedup_vs_fp32"] == pytest.approx(r["fp32_alongside"]["median_ms"] / r["median_ms"])


def test_report_gets_a_latency_column_and_a_speedup_line(benched) -> None:
    from kdsearch.report import render_report

    md = render_report(benched)
    results = md.split("## Results", 1)[1].split("##", 1)[0]
    assert "| ORT ms |" in results and "**Speed-up (fastest finalized model):**" in results
    kd_row = next(line for line in results.splitlines() if line.startswith("| KD (FP32)"))
    assert float(kd_row.strip("| ").split("|")[-1]) > 0


def test_bench_refuses_zero_runs(benched, capsys) -> None:
    from kdsearch.cli import main

    assert main(["bench", str(benched), "--runs", "0"]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err


def test_cpu_info_reads_the_flags_that_decide_integer_speed() -> None:
    from kdsearch.bench import CPU_FLAGS, cpu_info

    info = cpu_info()
    assert set(info["flags"]) <= set(CPU_FLAGS) and info["vnni"] == bool({"avx512_vnni", "avx_vnni"} & set(info["flags"]))


def test_cli_onnx_export_is_integer_and_says_so(benched, tmp_path, capsys) -> None:
    """`kdsearch export --onnx` calibrates on the run's validation images and prints ORT's fusion counts."""
    from kdsearch.cli import main

    capsys.readouterr()
    assert main(["export", str(benched), "--model", "qat_kd_8", "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "QLinearConv" in out and "0 unfused" in out and (tmp_path / "m.onnx").is_file()
