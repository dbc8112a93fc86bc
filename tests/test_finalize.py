"""Finalize: candidate selection (pure), and a real tiny run: QAT(+KD) of tiny_cnn, export, reload, resume.

`build_run` makes a small but real run directory with the real stage functions (a tiny_cnn teacher and
students trained 1 epoch on synthetic data, the logit cache, the sensitivity stage, a search results table
written by the search's own ResultsWriter from an Optuna study, and finalize). test_report.py reuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdsearch.context import RunContext
from kdsearch.spec import Spec, parse_spec
from kdsearch.pareto import ACC
from kdsearch.selection import (
    Candidate,
    allocation_candidates,
    bits_label,
    searched_candidates,
    uniform_candidates,
)

UNIFORM_IDS = {"qat_scratch_16", "qat_kd_16", "qat_scratch_8", "qat_kd_8", "ptq_kd_8"}

LAYERS = ("conv1", "conv2", "conv3", "fc")
BUDGET = 0.03  # MB; tiny_cnn (4 classes): 0.094 MB in FP32, 0.025 MB at 8 bit, 0.0136 MB at 8/4/4/8
SMALL_BUDGET = 0.015  # no trial is this small: the sensitivity solver's configuration stands in


def tiny_spec(**quant) -> Spec:
    return parse_spec({
        "name": "tiny", "seed": 0, "device": "cpu",
        "data": {"dataset": "synthetic", "num_classes": 4, "train_size": 96, "test_size": 64, "augment": "standard",
                 "num_workers": 0, "eval_batch_size": 64},
        "teachers": {"models": ["tiny_cnn"], "train": {"epochs": 1, "lr": 0.05, "batch_size": 32}, "gpus": 0},
        "student": {"arch": "tiny_cnn", "train": {"epochs": 1, "lr": 0.05, "batch_size": 32}},
        "distill": {"source": "cache", "cache_epochs": 1},
        "quant": {"bits": [16, 8, 4], "pin": {"first": 8, "last": 8},
                  "qat": {"epochs": 1, "lr": 0.01, "weight_decay": 5e-5, "batch_size": 32}, **quant},
        "sensitivity": {"calib_size": 16, "hutchinson_samples": 1},
        "search": {"budgets_mb": [BUDGET, SMALL_BUDGET], "num_trials": 6, "trial_epochs": 1},
        "finalize": {"top_k": 1},
    })


def _trial(number, status, bits, space, acc=None, epoch=1, wall=3.0, seq=-1):
    from optuna.trial import TrialState, create_trial

    attrs = {"status": status, "bits": bits, "size_mb": space.size_mb(bits), "gbops": space.gbops(bits),
             "avg_bits": space.avg_bits(bits),
             "epoch": epoch, "wall_s": wall, "finished_seq": seq, "trial_id": f"t{number}"}
    if acc is not None:
        attrs[ACC] = acc
    state = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "running": TrialState.RUNNING,
             "infeasible": TrialState.COMPLETE}[status]
    values = [acc if acc is not None else 0.0, space.size_mb(bits)] if state == TrialState.COMPLETE else None
    return create_trial(state=state, values=values, user_attrs=attrs)


def write_search_results(spec: Spec, run_dir: Path, model: torch.nn.Module) -> None:
    """results/pareto/summary via the search's ResultsWriter, from an Optuna study of hand-made trials."""
    import optuna

    from kdsearch.search.results import ResultsWriter
    from kdsearch.search.space import build_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = build_space(model, spec.quant, BUDGET)
    study = optuna.create_study(directions=["maximize", "minimize"])
    mix84 = {"conv1": 8, "conv2": 8, "conv3": 4, "fc": 8}
    mix168 = {"conv1": 8, "conv2": 16, "conv3": 8, "fc": 8}
    for t in (_trial(0, "completed", mix84, space, acc=40.0, seq=0),
              _trial(1, "completed", mix168, space, acc=45.0, wall=5.0, seq=1),
              _trial(2, "pruned", {"conv1": 8, "conv2": 4, "conv3": 8, "fc": 8}, space, acc=20.0, wall=1.0),
              _trial(3, "infeasible", {"conv1": 8, "conv2": 16, "conv3": 16, "fc": 8}, space, acc=0.0, epoch=0),
              _trial(4, "running", {"conv1": 8, "conv2": 4, "conv3": 8, "fc": 8}, space, wall=1.0)):
        study.add_trial(t)
    ResultsWriter(run_dir / "search", space.layers, space.budget_mb).write(study)


def build_run(root: Path, *, finalize: bool = True) -> tuple[Spec, RunContext]:
    """A real tiny run directory under `root` (built once per test session; later calls reuse it).

    The stages run as they do in `kdsearch run`: Ray tasks on the session's local Ray (the caller holds the
    `ray_session` fixture); only the search's results are hand-made (see `write_search_results`).
    """
    from kdsearch.checkpoints import load_model
    from kdsearch.io import atomic_write_json
    from kdsearch.rundir import RunDir
    from kdsearch.stages.search import write_pareto_plot
    from kdsearch.stages.baselines import train_baselines
    from kdsearch.stages.finalize import finalize_stage
    from kdsearch.stages.sensitivity import sensitivity_stage
    from kdsearch.stages.teachers import train_teachers

    spec = tiny_spec()
    run_dir = root / "runs" / spec.name
    ctx = RunContext.create(run_dir, device="cpu", progress=False)
    marker = run_dir / ".built"
    if marker.is_file():
        return spec, ctx
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.save(run_dir / "spec.yaml")
    stages = {"teachers": train_teachers(spec, ctx), "baselines": train_baselines(spec, ctx),
              "sensitivity": sensitivity_stage(spec, ctx)}
    model, obj = load_model(RunDir(run_dir).student("kd", spec.seed))
    write_search_results(spec, run_dir, model)
    write_pareto_plot(spec, run_dir / "search", model, obj["metrics"]["val_acc"])
    if finalize:
        stages["finalize"] = finalize_stage(spec, ctx)
    manifest = {"stages": {k: {"key": "k", "summary": {}, "seconds": 1.5, "finished": "2026-01-01T00:00:00"}
                           for k in stages}, "spec": spec.to_dict()}
    atomic_write_json(run_dir / "manifest.json", manifest)
    marker.touch()
    return spec, ctx


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session) -> tuple[Spec, RunContext]:
    return build_run(tmp_path_factory.getbasetemp() / "shared_run")


# ---- pure selection --------------------------------------------------------------------------------------

def _results(rows: list[tuple[int, str, float, float, dict[str, int]]]) -> pd.DataFrame:
    return pd.DataFrame([{"number": n, "status": s, ACC: a, "size_mb": z, **{f"bits.{k}": v for k, v in b.items()}}
                         for n, s, a, z, b in rows])


def test_searched_candidates_front_budgets_mixed_and_solver() -> None:
    b84 = {"a": 8, "b": 4, "c": 8}
    b168 = {"a": 16, "b": 8, "c": 8}
    b842 = {"a": 8, "b": 2, "c": 4}
    df = _results([(0, "completed", 70.0, 1.0, b84), (1, "completed", 80.0, 1.9, b168),
                   (2, "completed", 60.0, 0.8, b842), (3, "pruned", 90.0, 0.5, b842),  # pruned: never picked
                   (4, "completed", 65.0, 1.2, {"a": 8, "b": 8, "c": 8})])  # dominated by #0
    priors = {"warm_starts": [{"base_budget_mb": 0.5, "multiple": 1.0, "feasible": True,
                               "bit_config": {"a": 4, "b": 2, "c": 2}},
                              {"base_budget_mb": 0.5, "multiple": 0.8, "feasible": True, "bit_config": {"a": 2}}]}
    cands, missing = searched_candidates(df, (2.0, 0.9, 0.5, 0.1), top_k=2, priors=priors)
    by_id = {c.id: c for c in cands}
    assert set(by_id) == {"trial_00001", "trial_00000", "trial_00002", "alloc_0p5mb"}
    assert by_id["trial_00001"].roles == ("front top-1", "best <= 2 MB", "best mixed 16/8")
    assert by_id["trial_00000"].roles == ("front top-2", "best mixed 8/4")
    assert by_id["trial_00002"].roles == ("best <= 0.9 MB",)
    assert by_id["alloc_0p5mb"].bits == {"a": 4, "b": 2, "c": 2} and by_id["alloc_0p5mb"].kind == "solver"
    alloc = {c.id: c for c in allocation_candidates((2.0, 0.5, 0.1), priors)}  # every budget with a solver config
    assert set(alloc) == {"alloc_0p5mb"} and alloc["alloc_0p5mb"].roles == ("allocation only <= 0.5 MB",)
    assert alloc["alloc_0p5mb"].kd and alloc["alloc_0p5mb"].trains
    assert missing == ["0.1 MB"]  # no trial, no solver start
    assert all(c.start == "kd" and c.kd for c in cands)
    assert by_id["trial_00002"].label == "Mixed 8/4/2-bit" and by_id["trial_00000"].search_acc == 70.0


def test_gbops_budgets_pick_their_own_best_and_allocation() -> None:
    """A BOPs budget is a cap on the gbops column, with the same rules as a size budget: its best trial, the
    solver's BOPs configuration where no trial fits, its allocation-only candidate; both kinds at once."""
    b84, b44 = {"a": 8, "b": 4, "c": 8}, {"a": 4, "b": 4, "c": 4}
    df = _results([(0, "completed", 70.0, 1.0, b84), (1, "completed", 72.0, 1.9, {"a": 8, "b": 8, "c": 8}),
                   (2, "completed", 60.0, 0.8, b44)]).assign(gbops=[2.0, 4.0, 0.5])
    priors = {"warm_starts_bops": [{"base_budget_gbops": 0.2, "multiple": 1.0, "feasible": True,
                                    "bit_config": {"a": 2, "b": 2, "c": 2}},
                                   {"base_budget_gbops": 3.0, "multiple": 1.0, "feasible": True, "bit_config": b84}]}
    cands, missing = searched_candidates(df, (), top_k=0, priors=priors, budgets_gbops=(3.0, 1.0, 0.2, 0.01))
    by_id = {c.id: c for c in cands}
    assert by_id["trial_00000"].roles == ("best <= 3 GBOPs", "best mixed 8/4")
    assert by_id["trial_00002"].roles == ("best <= 1 GBOPs",)
    assert by_id["alloc_0p2gbops"].bits == {"a": 2, "b": 2, "c": 2} and by_id["alloc_0p2gbops"].kind == "solver"
    assert missing == ["0.01 GBOPs"]
    alloc = {c.id: c for c in allocation_candidates((), priors, (3.0, 0.2))}
    assert set(alloc) == {"alloc_3gbops", "alloc_0p2gbops"}
    assert alloc["alloc_3gbops"].roles == ("allocation only <= 3 GBOPs",)
    both, _ = searched_candidates(df, (1.5,), top_k=0, priors=None, budgets_gbops=(3.0,))
    assert {c.id: c.roles for c in both}["trial_00000"] == ("best <= 1.5 MB", "best <= 3 GBOPs", "best mixed 8/4")


def test_export_default_respects_both_first_budgets() -> None:
    from kdsearch.selection import export_default

    final = pd.DataFrame({"id": ["big", "mid", "small"], "seed": 0, "val_acc": [80.0, 75.0, 70.0],
                          "test_acc": [0.0, 0.0, 0.0], "size_mb": [2.0, 1.0, 0.5], "gbops": [4.0, 3.0, 1.0]})
    assert export_default(final, [])["id"] == "big"
    assert export_default(final, [1.5])["id"] == "mid"
    assert export_default(final, [1.5], [2.0])["id"] == "small"  # mid fits the size, not the BOPs budget
    assert export_default(final, [], [3.5])["id"] == "mid"
    assert export_default(final.drop(columns="gbops"), [], [3.5])["id"] == "big"  # no gbops: none fits, best overall


def test_searched_candidates_without_results() -> None:
    cands, missing = searched_candidates(pd.DataFrame(columns=["number", "status", ACC, "size_mb"]), (1.0,), 3)
    assert cands == [] and missing == ["1 MB"]


def test_uniform_candidates_pins_are_floors() -> None:
    from kdsearch.models import create_model

    model = create_model("tiny_cnn", num_classes=4)
    cands = {c.id: c for c in uniform_candidates(model, {"first": 8, "last": 8})}
    assert set(cands) == UNIFORM_IDS
    ptq = cands["ptq_kd_8"]  # post-training 8-bit of the KD student: no training, no KD loss
    assert ptq.kind == "ptq" and not ptq.trains and not ptq.kd and ptq.start == "kd" and set(ptq.bits.values()) == {8}
    assert {c.id for c in uniform_candidates(model, {}, (8,))} == {"qat_scratch_8", "qat_kd_8", "ptq_kd_8"}
    assert set(cands["qat_kd_16"].bits.values()) == {16}  # 16-bit means every layer, not first/last at 8
    assert set(cands["qat_scratch_8"].bits.values()) == {8}
    assert cands["qat_scratch_16"].start == "scratch" and not cands["qat_scratch_16"].kd
    assert cands["qat_kd_8"].kd and bits_label(cands["qat_kd_8"].bits) == "Uniform 8-bit"
    cand4 = uniform_candidates(model, {"first": 8, "last": 8, "conv2": 2})  # a pin below b does not lower it
    assert all(v == 16 for v in cand4[0].bits.values())


def test_candidate_validates() -> None:
    with pytest.raises(ValueError, match="start"):
        Candidate("x", "teacher", True, {"a": 8}, "uniform")
    with pytest.raises(ValueError, match="kind"):
        Candidate("x", "kd", True, {"a": 8}, "other")


# ---- the real stage --------------------------------------------------------------------------------------

def test_finalize_exports_reload_and_sizes(run) -> None:
    from kdsearch.quant import load_quantized, read_metadata
    from kdsearch.rundir import RunDir

    spec, ctx = run
    rd = RunDir(ctx.run_dir)
    out = rd.final_dir
    table = pd.read_parquet(out / "final.parquet")
    ids = set(table["id"])
    assert UNIFORM_IDS <= ids
    assert {"trial_00000", "trial_00001"} <= ids  # mixed 8/4 and the front's best (also best <= BUDGET, mixed 16/8)
    assert "trial_00002" not in ids and "trial_00004" not in ids  # pruned and running trials are never finalized
    assert (table.groupby("id").size() == len(spec.seeds)).all()  # every model once per seed
    t1 = table.set_index("id").loc["trial_00001"]
    # the solver's configuration for BUDGET is this trial's (its warm start): one model, both roles
    assert set(t1["roles"].split("; ")) == {"front top-1", f"best <= {BUDGET:g} MB", "best mixed 16/8",
                                            f"allocation only <= {BUDGET:g} MB"}
    assert t1["bits_used"] == "16/8" and t1["label"] == "Mixed 16/8-bit"
    for r in table.itertuples():
        kdq = out / r.file
        assert kdq == rd.final_model(r.id, r.seed)
        on_disk = kdq.stat().st_size
        assert on_disk == r.file_bytes
        assert r.total_bytes <= on_disk <= r.total_bytes * 1.02 + 16_384  # the size model predicts the file
        # the export reproduces the trained model on validation (up to one image); test is the reloaded file's
        assert r.export_ok and abs(r.export_val_acc - r.val_acc) <= 100.0 / 10 + 1e-9
        meta = json.loads(rd.final_model(r.id, r.seed, ".json").read_text())
        assert read_metadata(kdq)["bit_config"] == meta["bit_config"]
        trained = r.kind != "ptq"
        assert meta["epochs"] == (spec.quant.qat.epochs if trained else 0)
        assert len(meta["history"]) == (1 if trained else 0) and meta["dead_channels"] == 0
        assert meta["bn_reestimated"] == 3  # tiny_cnn's 3 BatchNorms, after QAT and after PTQ alike
        assert meta["node"]["ip"] and meta["source"] == ("cache" if r.kd else None)
        assert not list(out.glob(f"{r.id}.*.ckpt"))  # checkpoints are removed once the model is done
    scratch = json.loads(rd.final_model("qat_scratch_8", 0, ".json").read_text())
    assert scratch["start"] == "scratch" and scratch["kd"] is False
    assert table.set_index("id").loc["qat_kd_16", "size_mb"] > table.set_index("id").loc["qat_kd_8", "size_mb"]
    # the small budget has no trial: the sensitivity solver's configuration for it is finalized instead
    solver = table[table["kind"] == "solver"].set_index("id")
    small = solver.loc[f"alloc_{SMALL_BUDGET:g}mb".replace(".", "p")]
    assert small["size_mb"] <= SMALL_BUDGET and "solver <= 0.015 MB" in small["roles"]
    # every budget gets its allocation-only row (the solver's configuration, QAT+KD-trained, no search); when the
    # search finalizes that very configuration, one model carries both roles
    alloc = table[table["roles"].str.contains("allocation only")]
    for budget in (BUDGET, SMALL_BUDGET):
        rows = alloc[alloc["roles"].str.contains(f"allocation only <= {budget:g} MB", regex=False)]
        assert len(rows) == 1 and rows["size_mb"].iloc[0] <= budget
    # the reloaded file gives the recorded test accuracy when evaluated independently here
    from kdsearch.data import EvalLoader, Normalizer, load_data
    from kdsearch.train import evaluate

    bundle = load_data(spec.data)
    m = load_quantized(rd.final_model("trial_00000", 0))
    acc = evaluate(m, EvalLoader(bundle.test, batch_size=64), Normalizer.from_bundle(bundle), torch.device("cpu"))["acc"]
    assert acc == pytest.approx(table.set_index("id").loc["trial_00000", "test_acc"])
    prog = json.loads((out / "progress.json").read_text())
    assert prog["running"] == [] and prog["done"] == prog["total"] == len(table)


def test_finalize_resumes_without_retraining(run) -> None:
    from kdsearch.stages.finalize import finalize_stage

    spec, ctx = run
    before = {p.name: p.stat().st_mtime_ns for p in (ctx.run_dir / "final").glob("*.kdq")}
    summary = finalize_stage(spec, ctx)
    after = {p.name: p.stat().st_mtime_ns for p in (ctx.run_dir / "final").glob("*.kdq")}
    assert before == after  # nothing re-exported
    assert summary["reused"] == len(summary["models"])
    assert summary["export_mismatch"] == [] and summary["budgets_without_config"] == []


def test_finalize_needs_the_students(tmp_path) -> None:
    from kdsearch.checkpoints import CheckpointError
    from kdsearch.stages.finalize import finalize_stage

    spec = tiny_spec()
    with pytest.raises(CheckpointError, match="baselines stage"):
        finalize_stage(spec, RunContext.create(tmp_path / "empty", device="cpu", progress=False))
