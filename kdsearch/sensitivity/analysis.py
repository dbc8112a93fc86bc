"""Layer-wise sensitivity of a float student: the table, the priors derived from it, the plot.

`kdsearch.stages.sensitivity` runs this as a Ray task and writes, in runs/<name>/sensitivity/ (atomically):
  sensitivity.parquet  one row per (layer, bits): omegas, params, exact bytes (see ``measure``, ``costs``)
  sensitivity.json     provenance and timings; its ``inputs_key`` makes a rerun reuse the table
  priors.json          warm-start BitConfigs per size budget and per BOPs budget (exact solver) and
                       excluded (layer, bits) pairs
  sensitivity.png      each layer's omega per bit-width

The table depends only on the model file, the calibration set and the bit-widths; the priors (budgets,
metric, threshold) are recomputed on every call, which costs milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..checkpoints import CheckpointError
from ..io import atomic_path, stable_hash
from ..quant import QUANT_VERSION, BitConfig, layer_inventory, model_bops
from ..quant.bops import layer_bops
from ..spec import Spec
from .costs import check_costs, layer_byte_costs, resolve_pins
from .measure import sensitivity_table
from .priors import excluded_choices, layer_choices, metric_column, warm_starts, warm_starts_bops

log = logging.getLogger("kdsearch.sensitivity")

TABLE_VERSION = 1


def calibration_indices(n_train: int, size: int, seed: int) -> torch.Tensor:
    """A fixed, seeded subset of the training split (the same images on every rerun)."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.randperm(n_train, generator=g)[: min(size, n_train)]


def table_bits(spec: Spec, names: list[str]) -> dict[str, list[int]]:
    """Bit-widths measured per layer: the search's choices, plus a pinned layer's pinned width."""
    pins = resolve_pins(names, spec.quant.pin)
    return {n: sorted(set(spec.quant.bits) | ({pins[n]} if n in pins else set()), reverse=True) for n in names}


def table_key(spec: Spec, model_digest: str) -> str:
    d = spec.key_dict()
    return stable_hash({"v": TABLE_VERSION, "quant": QUANT_VERSION, "model": model_digest, "data": d["data"],
                        "seed": d["seed"],
                        "calib_size": spec.sensitivity.calib_size, "samples": spec.sensitivity.hutchinson_samples,
                        "bits": d["quant"]["bits"], "pin": d["quant"]["pin"], "act_bits": d["quant"]["act_bits"]})


def compute_table(spec: Spec, model: torch.nn.Module, device: torch.device) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Measure the table for ``model`` on the spec's calibration set; returns (table, meta)."""
    from ..data import Normalizer, load_data

    t0 = time.perf_counter()
    bundle = load_data(spec.data)
    idx = calibration_indices(len(bundle.train), spec.sensitivity.calib_size, spec.seed)
    calib = bundle.train.subset(idx)
    images = Normalizer.from_bundle(bundle)(calib.images).to(device)
    load_s = time.perf_counter() - t0
    inventory = layer_inventory(model, input_size=bundle.image_shape)
    names = [i.name for i in inventory]
    bits = table_bits(spec, names)
    batch = 512 if device.type == "cuda" else 128
    table, timings = sensitivity_table(model, images, calib.labels.to(device), bits,
                                       hutchinson_samples=spec.sensitivity.hutchinson_samples, seed=spec.seed,
                                       batch_size=batch, device=device, kinds={i.name: i.kind for i in inventory})
    fixed, costs = layer_byte_costs(model.cpu(), bits, spec.quant.act_bits)
    table["bytes"] = [costs[(n, int(b))] for n, b in zip(table["layer"], table["bits"])]
    pins = resolve_pins(names, spec.quant.pin)
    table["pinned"] = [n in pins for n in table["layer"]]
    timings.extra["data"] = load_s
    meta = {"fixed_bytes": fixed, "calib_size": int(idx.numel()), "device": str(device),
            "seconds": timings.to_dict(), "layers": len(names), "rows": len(table),
            "hessian_skipped": timings.hessian_skipped}
    return table, meta


def plot_sensitivity(table: pd.DataFrame, path: Path) -> None:
    """One panel per omega: layers on x (table order), log omega on y, one line per bit-width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(table["layer"]))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(layers) + 2), 7), sharex=True)
    for ax, col, title in zip(axes, ("omega_kl", "omega_hessian"), ("KL increase", "HAWQ-V2 Hessian estimate")):
        positive = table.loc[table[col] > 0, col]
        floor = float(positive.min()) / 10 if len(positive) else 1e-12
        for bits, rows in sorted(table.groupby("bits"), reverse=True):
            x = [layers.index(n) for n in rows["layer"]]
            ax.plot(x, rows[col].clip(lower=floor), marker="o", ms=3, label=f"{bits} bit")
        ax.set_yscale("log")
        ax.set_ylabel(col)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1].set_xticks(range(len(layers)))
    axes[-1].set_xticklabels(layers, rotation=90, fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def build_priors(spec: Spec, table: pd.DataFrame, fixed_bytes: int, model: torch.nn.Module,
                 input_size: Sequence[int] = (3, 32, 32)) -> dict[str, Any]:
    """Warm starts for every budget (checked against ``model_size``, and ``model_bops`` on ``input_size``, the
    data's image shape), the excluded (layer, bits) pairs and the resulting per-layer ``choices`` (the search
    space the sampler should offer)."""
    names = list(dict.fromkeys(table["layer"]))
    pins = resolve_pins(names, spec.quant.pin)
    col = metric_column(spec.sensitivity.metric)
    if table[col].isna().all():
        raise ValueError(f"sensitivity.metric: {spec.sensitivity.metric} has no values for {spec.student.arch} (an op "
                         "of the model has no second derivative, which the Hessian estimate needs); use metric: kl")
    excluded = excluded_choices(table, spec.sensitivity.exclude_above, col, pinned=pins)
    starts = warm_starts(table, fixed_bytes, spec.search.budgets_mb, spec.sensitivity.budgets_around,
                         metric=col, pinned=pins, excluded=excluded)
    costs = {(n, int(b)): int(c) for n, b, c in zip(table["layer"], table["bits"], table["bytes"])}
    for rec in starts:
        if rec["bit_config"] is not None:
            size = check_costs(model, BitConfig(rec["bit_config"]), fixed_bytes, costs, spec.quant.act_bits)
            if size != rec["total_bytes"] or size > rec["budget_bytes"]:
                raise RuntimeError(f"warm start for {rec['budget_bytes']} bytes has size {size}")
    # "layers" keeps the model's layer order: the JSON writer sorts the keys of every dict below.
    priors = {"layers": names, "metric": col, "exclude_above": spec.sensitivity.exclude_above, "excluded": excluded,
              "pinned": pins, "choices": layer_choices(names, spec.quant.bits, pins, excluded),
              "fixed_bytes": fixed_bytes, "warm_starts": starts}
    if spec.search.budgets_gbops:  # only then: the priors (and the search's key) of a size-only run are as before
        priors["warm_starts_bops"] = _bops_starts(spec, table, model, input_size, col, pins, excluded)
    return priors


def _bops_starts(spec: Spec, table: pd.DataFrame, model: torch.nn.Module, input_size: Sequence[int], col: str,
                 pins: dict[str, int], excluded: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The solver's starts for the BOPs budgets, each checked against ``model_bops``."""
    macs = {i.name: i.macs for i in layer_inventory(model, input_size=input_size)}
    table = table.assign(bops=[layer_bops(macs[n], int(b), spec.quant.act_bits)
                               for n, b in zip(table["layer"], table["bits"])])
    starts = warm_starts_bops(table, spec.search.budgets_gbops, spec.sensitivity.budgets_around, metric=col,
                              pinned=pins, excluded=excluded)
    for rec in starts:
        if rec["bit_config"] is not None:
            bops = model_bops(model, BitConfig(rec["bit_config"]), act_bits=spec.quant.act_bits,
                              input_size=input_size).total_bops
            if bops != rec["total_bops"] or bops > rec["budget_bops"]:
                raise RuntimeError(f"warm start for {rec['budget_bops']} BOPs has {bops} BOPs")
    return starts


def load_priors(run_dir: Path) -> dict[str, Any]:
    """The priors a finished sensitivity stage wrote (for the search's sampler and warm starts)."""
    import json

    from ..rundir import RunDir

    p = RunDir(run_dir).priors_file
    if not p.is_file():
        raise CheckpointError(f"no sensitivity priors at {p}; run `kdsearch sensitivity` first")
    return json.loads(p.read_text())
