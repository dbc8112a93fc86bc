"""Numbers a reviewer can trust: fair baselines (same views), no stale resume, and no choice that reads test.

* A KD student and its scratch counterpart of the same seed train on the very same augmented views, epoch by
  epoch (recorded from the loaders the real training functions hand to `fit`).
* A crash followed by an edited spec (distillation or augmentation) does not finish the old partial model.
* Permuting the test labels changes no choice: the search's trials, the front, finalize's picks, the report's
  rows and the export default are identical; only the reported test accuracies move (`write_folder` and
  `choices` here; the two end-to-end runs are in test_pipeline.py, sharing its reference run).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from kdsearch.spec import Spec, parse_spec


def _spec(root: Path | None = None, **over: Any) -> Spec:
    data = {"dataset": "synthetic", "num_classes": 4, "train_size": 120, "test_size": 40, "augment": "standard",
            "num_workers": 0, "eval_batch_size": 64}
    if root is not None:
        data = {**data, "dataset": "imagefolder", "root": str(root), "train_size": None, "test_size": None,
                "num_classes": None}
    d = {
        "name": "trust", "seeds": [0], "device": "cpu", "data": data,
        "teachers": {"models": ["tiny_cnn"], "train": {"epochs": 1, "lr": 0.05, "batch_size": 32}, "gpus": 0},
        "student": {"arch": "tiny_cnn", "train": {"epochs": 3, "lr": 0.05, "batch_size": 32}, "gpus": 0},
        "distill": {"source": "cache", "cache_epochs": 1},
        "quant": {"bits": [8, 4], "qat": {"epochs": 1, "lr": 0.01, "batch_size": 32}},
        "sensitivity": {"calib_size": 16, "hutchinson_samples": 1},
        "search": {"budgets_mb": [0.09], "num_trials": 3, "trial_epochs": 1, "max_concurrent": 1, "asha": False},
        "finalize": {"top_k": 1},
    }
    for dotted, v in over.items():
        node = d
        *parents, leaf = dotted.split("__")
        for k in parents:
            node = node[k]
        node[leaf] = v
    return parse_spec(d)


def _train_teacher(spec: Spec, run_dir: Path) -> None:
    from kdsearch.fp32 import train_float_model
    from kdsearch.rundir import RunDir

    train_float_model(spec, "tiny_cnn", spec.teachers.train, RunDir(run_dir).teacher("tiny_cnn"), seed=spec.seed,
                      device=torch.device("cpu"))


# ---- fair baselines --------------------------------------------------------------------------------------------

def test_kd_student_and_scratch_student_see_identical_views_every_epoch(tmp_path, monkeypatch) -> None:
    """The stream each real training function hands to `fit`, recorded epoch by epoch: identical views, order and
    labels for scratch and KD (whose teacher logits come from a cache that covers every epoch, not e % E)."""
    import kdsearch.fp32 as fp32
    from kdsearch.distill.cache import pixel_sums
    from kdsearch.rundir import RunDir

    spec = _spec()  # distill.cache_epochs=1 < student epochs=3: the cache must still cover all 3
    _train_teacher(spec, tmp_path)
    streams: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    real_fit = fp32.fit

    def recording_fit(model, train, val, run):  # noqa: ANN001
        streams[run.desc] = [
            (b.index.numpy().copy(), pixel_sums(b.images), b.labels.numpy().copy())
            for e in range(run.cfg.epochs) for b in train.epoch(e)
        ]
        return real_fit(model, train, val, run)

    monkeypatch.setattr(fp32, "fit", recording_fit)
    rd = RunDir(tmp_path)
    scratch = fp32.train_float_model(spec, "tiny_cnn", spec.student.train, rd.student("scratch", 0), seed=0,
                                     device=torch.device("cpu"))
    kd = fp32.train_kd_student(spec, tmp_path, rd.student("kd", 0), seed=0, strategy="dynamic", source="cache",
                               device=torch.device("cpu"))
    (s_key,) = [k for k in streams if "KD" not in k]
    (k_key,) = [k for k in streams if "KD" in k]
    s, k = streams[s_key], streams[k_key]
    per = 108 // spec.student.train.batch_size  # 120 images less the 12 held out for validation, drop_last
    assert len(s) == len(k) == spec.student.train.epochs * per
    for (si, sp, sl), (ki, kp, kl) in zip(s, k):
        assert np.array_equal(si, ki) and np.array_equal(sp, kp) and np.array_equal(sl, kl)
    per_epoch = [np.concatenate([p for _, p, _ in s[e * per:(e + 1) * per]]) for e in range(3)]
    assert not np.array_equal(per_epoch[0], per_epoch[1])  # a fresh view every epoch, not a replay
    assert scratch["source"] is None and kd["source"] == "cache"
    from kdsearch.distill import LogitCache

    assert LogitCache(rd.logit_cache(0)).epochs >= spec.student.train.epochs


def test_replay_without_coverage_is_refused_for_fair_runs(tmp_path) -> None:
    """A cache with fewer epochs than a fair (fresh-views) run trains is an error, never a silent replay."""
    from kdsearch.data import load_data
    from kdsearch.distill import ensure_logit_cache
    from kdsearch.recipes import train_loader

    spec = _spec()
    _train_teacher(spec, tmp_path)
    bundle = load_data(spec.data)
    cache = ensure_logit_cache(spec, tmp_path, bundle, 0, device=torch.device("cpu"), epochs=1)
    with pytest.raises(ValueError, match="covers 1 epochs"):
        train_loader(spec, bundle, 0, batch_size=32, device="cpu", teacher=cache, epochs=3)
    assert train_loader(spec, bundle, 0, batch_size=32, device="cpu", teacher=cache, epochs=None)  # trials may


# ---- no stale resume -------------------------------------------------------------------------------------------

class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("edit", [{"distill__alpha": 0.5}, {"data__cutout": 8}, {}],
                         ids=["distill.alpha", "data.cutout", "unchanged"])
def test_an_edited_input_between_crash_and_rerun_starts_over(tmp_path, monkeypatch, caplog, edit) -> None:
    import kdsearch.fp32 as fp32
    from kdsearch.rundir import RunDir

    spec = _spec()
    _train_teacher(spec, tmp_path)
    out = RunDir(tmp_path).student("kd", 0)
    real_fit = fp32.fit

    def crashing_fit(model, train, val, run):  # noqa: ANN001
        def on_epoch(m):  # noqa: ANN001
            if m["epoch"] == 1:
                raise _Crash("killed after the first epoch's checkpoint")
        return real_fit(model, train, val, dataclasses.replace(run, on_epoch=on_epoch))

    monkeypatch.setattr(fp32, "fit", crashing_fit)
    with pytest.raises(_Crash):
        fp32.train_kd_student(spec, tmp_path, out, seed=0, strategy="dynamic", source="cache",
                              device=torch.device("cpu"))
    assert out.with_suffix(".ckpt").is_file() and not out.is_file()
    monkeypatch.setattr(fp32, "fit", real_fit)
    edited = _spec(**edit)
    if "data__cutout" in edit:  # the teacher reads the data too: retrain it, as the pipeline would
        _train_teacher(edited, tmp_path)
    with caplog.at_level(logging.INFO, logger="kdsearch"):
        m = fp32.train_kd_student(edited, tmp_path, out, seed=0, strategy="dynamic", source="cache",
                                  device=torch.device("cpu"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    if edit:
        assert "starting over" in text and "resumed from" not in text
    else:
        assert "resumed from" in text and "at epoch 1/3" in text and "starting over" not in text
    assert len(m["history"]) == 3 and (m["alpha"] == edited.distill.alpha)


# ---- validation chooses, test reports ---------------------------------------------------------------------------

def write_folder(root: Path, permute_test: bool) -> Path:
    """A real image folder (PNG files) from the synthetic set; optionally with the test labels permuted."""
    from torchvision.io import write_png

    from kdsearch.data import make_synthetic

    train, test, _ = make_synthetic(4, 160, 48, seed=5)
    labels = test.labels.clone()
    if permute_test:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    for split, arrays, lab in (("train", train, train.labels), ("test", test, labels)):
        for i, (img, y) in enumerate(zip(arrays.images, lab)):
            d = root / split / f"c{int(y)}"
            d.mkdir(parents=True, exist_ok=True)
            write_png(img, str(d / f"{i:04d}.png"))
    return root


def choices(run_dir: Path) -> dict[str, Any]:
    from kdsearch.pareto import ACC, SIZE
    from kdsearch.report import render_report
    from kdsearch.rundir import RunDir
    from kdsearch.selection import export_default

    rd = RunDir(run_dir)
    results = pd.read_parquet(rd.search_dir / "results.parquet")
    bit_cols = sorted(c for c in results.columns if c.startswith("bits."))
    final = pd.read_parquet(rd.final_table)
    md = render_report(run_dir)
    table = md.split("## Results", 1)[1].split("## Efficiency", 1)[0]
    models = [line.split("|")[-2].strip() for line in table.splitlines() if line.startswith("| ")]
    best_lines = [line.split("`")[1] for line in md.splitlines() if line.startswith("* Best finalized model within")
                  and "`" in line]
    return {
        "trials": results[["number", "status", ACC, SIZE, *bit_cols]].round(6).to_dict("records"),
        "front": pd.read_parquet(rd.search_dir / "pareto.parquet")[["number", ACC]].to_dict("records"),
        "finalized": sorted(zip(final["id"], final["roles"], final["val_acc"].round(6))),
        "export_default": export_default(final, list(rd.spec_dict()["search"]["budgets_mb"]))["id"],
        "report_models": models, "report_best": best_lines,
    }
