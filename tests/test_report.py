"""report.md, `kdsearch status` and the progress line, on the real tiny run of test_finalize and on partial runs."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from kdsearch.progress import (
    ProgressReporter,
    SearchProgress,
    estimate_eta,
    fmt_duration,
    format_search,
    progress_line,
)
from kdsearch.models import create_model
from kdsearch.quant import BitConfig, layer_inventory, model_bops
from kdsearch.report import render_report, write_report
from kdsearch.row_costs import parse_bits
from kdsearch.status import RunDirError, run_status
from test_finalize import BUDGET, build_run, tiny_spec

SEED_ROWS = [("Baseline (Scratch)", "FP32"), ("KD (FP32)", "FP32"), ("QAT Scratch", "16-bit"), ("QAT KD", "16-bit"),
             ("QAT Scratch", "8-bit"), ("QAT KD", "8-bit"), ("QAT Layer+KD", "Mixed 16/8-bit"),
             ("QAT Layer+KD", "Mixed 8/4-bit")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    return build_run(tmp_path_factory.getbasetemp() / "shared_run")


def _rows(md: str) -> dict[tuple[str, str], list[str]]:
    """The results table of report.md: (configuration, scheme) -> the other cells."""
    section = md.split("## Results", 1)[1].split("##", 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] not in ("Configuration", "---"):
            out[(cells[0], cells[1])] = cells[2:]
    return out


def test_report_has_every_seed_row_with_numbers(run) -> None:
    spec, ctx = run
    path = write_report(ctx.run_dir)
    assert path == ctx.run_dir / "report.md"
    md = path.read_text()
    rows = _rows(md)
    assert list(rows)[: len(SEED_ROWS)] == SEED_ROWS
    final = pd.read_parquet(ctx.run_dir / "final" / "final.parquet").set_index("id")
    student = create_model("tiny_cnn", num_classes=4)
    inv = layer_inventory(student, input_size=(3, 32, 32))
    for key, cells in rows.items():
        acc, n, val, size, gbops, file_bytes, avg_bits, teachers, model = cells
        assert float(acc) >= 0 and float(size) > 0 and float(avg_bits) > 0  # every row has numbers here
        # GBOPs: MACs x weight bits x activation bits (the spec's act_bits 8; 16-bit layers 16 x 16; FP32 32 x 32)
        cfg = BitConfig.uniform(inv, 32) if not model.startswith("final/") else BitConfig(
            parse_bits(final.loc[model.removeprefix("final/").removesuffix(".s*.kdq"), "bits"]))
        assert gbops == f"{model_bops(student, cfg, act_bits=8).gbops:.4g}"
        assert int(n) == len(spec.seeds) and float(val) >= 0
        if model.startswith("final/"):
            r = final.loc[model.removeprefix("final/").removesuffix(".s*.kdq")]
            assert acc == f"{r['test_acc']:.2f}" and val == f"{r['val_acc']:.2f}"  # one seed: the value itself
            assert int(file_bytes.replace(",", "")) == r["file_bytes"]
            assert teachers == ("logit cache" if r["kd"] else "-")
    assert rows[("QAT KD", "8-bit")][-1] == "final/qat_kd_8.s*.kdq"
    assert rows[("QAT Layer+KD", "Mixed 16/8-bit")][-1] == "final/trial_00001.s*.kdq"
    assert rows[("Baseline (Scratch)", "FP32")][-1] == "students/s*/scratch.pt"
    assert "Selected on validation, reported on test" in md
    assert "tiny_cnn (test " in md and "synthetic-v1:seed=0" in md  # teachers' accuracies, data provenance
    for link in ("search/pareto.png", "sensitivity/sensitivity.png"):  # relative links that resolve
        assert f"]({link})" in md and (ctx.run_dir / link).is_file()
    assert "x smaller" in md and "Original size (FP32):** 0.0958 MB" in md
    assert "All exports verified" in md and "not run yet" not in md.split("## Stages")[0]
    # the baselines a compressed model is judged against: rows, and the paired differences in words
    assert rows[("PTQ (KD student, no training)", "8-bit")][-1] == "final/ptq_kd_8.s*.kdq"
    alloc = [k for k in rows if k[0].startswith("Allocation only <= ")]
    assert [k[0] for k in alloc] == [f"Allocation only <= {b:g} MB (solver)+KD" for b in spec.search.budgets_mb]
    assert "* What QAT added: QAT KD 8-bit - PTQ 8-bit (no training), test accuracy: " in md
    assert f"* What the search added within {spec.search.budgets_mb[0]:g} MB: " in md


def test_report_on_a_partial_run_says_not_run_yet(tmp_path) -> None:
    spec = tiny_spec(bits=[8, 4, 2])
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    spec.save(run_dir / "spec.yaml")
    md = render_report(run_dir)
    rows = _rows(md)
    assert list(rows)[: len(SEED_ROWS)] == SEED_ROWS
    assert [k[0] for k in list(rows)[len(SEED_ROWS):]] == ["PTQ (KD student, no training)"] + [
        f"Allocation only <= {b:g} MB (solver)+KD" for b in spec.search.budgets_mb]
    assert rows[("QAT Layer+KD", "Mixed 16/8-bit")][0] == "not searched (the spec's bit choices are 8/4/2)"
    assert all(cells[1] == "0" for cells in rows.values())  # n = 0: nothing measured
    for key in SEED_ROWS[:6] + [("QAT Layer+KD", "Mixed 8/4-bit")]:
        assert rows[key][0] == "not run yet"
    for section in ("## Search", "## Layer sensitivity", "## All finalized models"):
        assert md.split(section, 1)[1].lstrip().startswith("not run yet")
    assert "tiny_cnn (not run yet)" in md


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_unknown_run_dir_is_one_line_value_error(tmp_path, make) -> None:
    p = tmp_path / "x"
    if make == "file":
        p.write_text("")
    elif make == "empty":
        p.mkdir()
    for fn in (run_status, write_report):
        with pytest.raises(RunDirError) as err:
            fn(p)
        msg = str(err.value)
        assert isinstance(err.value, ValueError) and "\n" not in msg and str(p) in msg and "runs/<spec name>" in msg


def test_status_lists_stages_progress_running_trials_and_front(run) -> None:
    spec, ctx = run
    text = run_status(ctx.run_dir)
    lines = text.splitlines()
    assert any(line.split()[:2] == ["teachers", "done"] for line in lines)
    assert any(line.split()[:2] == ["search", "started"] for line in lines)
    assert f"search: 4/6 trials (2 completed, 1 pruned, 1 running, 1 infeasible) best under {BUDGET:g} MB: 45.0%" in text
    assert "running trials (1):" in text and "| 4 | t4 | 1/1 |" in text
    front = text.split("current Pareto front (2 trials):", 1)[1]
    assert "8/16/8/8" in front and "8/8/4/8" in front
    assert "finalize: 8/8 models done" in text


def test_status_of_a_run_before_the_search(tmp_path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    tiny_spec().save(run_dir / "spec.yaml")
    text = run_status(run_dir)
    assert "search: not started" in text and "teachers     not run yet" in text


def test_format_search_line() -> None:
    p = SearchProgress(32, {"completed": 9, "pruned": 2, "running": 1, "infeasible": 3}, 1.38, 71.3, 1.21, 360.0)
    assert format_search(p) == ("search: 12/32 trials (9 completed, 2 pruned, 1 running, 3 infeasible) "
                                "best under 1.38 MB: 71.3% @ 1.21 MB  ETA 6m")
    empty = SearchProgress(8, {"running": 2}, 0.05)
    assert format_search(empty) == ("search: 2/8 trials (0 completed, 0 pruned, 2 running) best under 0.05 MB: "
                                    "none yet  ETA ?")
    assert format_search(SearchProgress(2, {"completed": 2}, 1.0, 50.0, 0.5, 0.0)).endswith("ETA done")
    assert [fmt_duration(s) for s in (5, 61, 3600 * 2 + 90)] == ["5s", "2m", "2h 02m"]
    with pytest.raises(ValueError, match="total"):
        SearchProgress(0)


def test_eta_from_finished_wall_times_and_concurrency() -> None:
    df = pd.DataFrame({"status": ["completed", "pruned", "running", "infeasible"],
                       "wall_s": [20.0, 10.0, 5.0, float("nan")]})
    # mean 15 s; 6 - 2 finished - 1 running = 3 unstarted -> 45 s, plus 10 s left on the running one
    assert estimate_eta(df, 6, 2) == pytest.approx(27.5)
    assert estimate_eta(df, 6, 1, age_s=5.0) == pytest.approx(50.0)
    assert estimate_eta(df, None, 2) is None
    assert estimate_eta(df[df["status"] == "running"], 6, 2) is None  # nothing finished yet: unknown


def test_progress_reporter_logs_lines_from_a_thread(run) -> None:
    spec, ctx = run
    rep = ProgressReporter(ctx.run_dir, total=6, interval_s=0.05, live=False)
    with rep:
        time.sleep(0.3)
    assert rep.lines and all(line.startswith("search: 4/6 trials (2 completed") for line in rep.lines)
    assert len(rep.lines) >= 2  # the first line, and the final line that stop() always logs
    fin = ProgressReporter(ctx.run_dir, interval_s=0.05, stage="finalize", live=False).start()
    fin.stop()
    assert fin.lines[-1] == "finalize: 8/8 models done"
    assert progress_line(Path(ctx.run_dir).parent / "nothing") == "search: waiting for the first trial"
    with pytest.raises(ValueError, match="interval_s"):
        ProgressReporter(ctx.run_dir, interval_s=0)


def test_progress_reporter_live_mode_runs(run, capsys) -> None:
    spec, ctx = run
    rep = ProgressReporter(ctx.run_dir, total=6, interval_s=0.05, live=True).start()
    time.sleep(0.2)
    rep.stop()
    assert rep.lines[-1].startswith("search: 4/6 trials")


def test_cli_export_copies_the_best_packed_file_and_onnx(run, tmp_path, capsys) -> None:
    from kdsearch.cli import main
    from kdsearch.quant import load_quantized, model_size

    _, ctx = run
    out = tmp_path / "best.kdq"
    assert main(["export", str(ctx.run_dir), "--out", str(out)]) == 0
    df = pd.read_parquet(ctx.run_dir / "final" / "final.parquet")
    best_id = capsys.readouterr().out.split(": ")[1].split(" ")[0]
    # the default is chosen on validation: the best mean val_acc within the first budget, ties toward smaller
    fits = df[df["size_mb"] <= BUDGET].groupby("id").agg(val=("val_acc", "mean"), size=("size_mb", "first"))
    top = fits.sort_values(["val", "size"], ascending=[False, True]).iloc[0]
    tied = fits[(fits["val"] == top["val"]) & (fits["size"] == top["size"])].index  # e.g. PTQ and QAT KD 8-bit
    assert best_id in set(tied)
    assert out.read_bytes() == (ctx.run_dir / "final" / f"{best_id}.s0.kdq").read_bytes()
    size = model_size(load_quantized(out)).total_bytes
    assert size <= out.stat().st_size <= size * 1.02 + 16_000
    assert main(["export", str(ctx.run_dir), "--model", "nope"]) == 2
    assert "choose from" in capsys.readouterr().err
    pytest.importorskip("onnx")
    assert main(["export", str(ctx.run_dir), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
