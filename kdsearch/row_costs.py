"""The BOPs of the report's rows: GBOPs (``kdsearch.quant.bops``) from a row's bits, for the results table.

A finalized row records its bits as text (``final.parquet``: 'conv1=8,conv2=4,...'); its BOPs follow from them,
the student's architecture, the activation rule and the data's image shape (the spec's dataset says it for
CIFAR and synthetic data; a finalized ``.kdq`` file records it for an image folder). Reading files only, like
every view, it works on runs finalized before BOPs were counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .rundir import RunDir


def parse_bits(text: str) -> dict[str, int]:
    """'conv1=8,conv2=4' (final.parquet's bits column) -> {'conv1': 8, 'conv2': 4}."""
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def gbops_of_bits(run_dir: Path, spec: dict[str, Any], student: dict[str, Any]) -> Callable[[str | None], float]:
    """GBOPs of the student at a row's bits (None: the FP32 student); NaN where the student or the shape is unknown.

    ``student``: ``kdsearch.report._float_student``'s dict (arch, num_classes); ``spec``: the run's spec dict.
    """
    from .data_checks import FIXED_IMAGE_SHAPES
    from .models import create_model
    from .quant import gbops_function, read_metadata

    shape = FIXED_IMAGE_SHAPES.get((spec.get("data") or {}).get("dataset"))
    kdq = next(iter(sorted(RunDir(run_dir).final_dir.glob("*.kdq"))), None)
    if shape is None and kdq is not None:
        shape = read_metadata(kdq).get("input_shape")
    if not student or not shape:
        return lambda bits: math.nan
    fn = gbops_function(create_model(student["arch"], num_classes=student["num_classes"]),
                        (spec.get("quant") or {}).get("act_bits", 8), shape)
    return lambda bits: fn(parse_bits(bits) if isinstance(bits, str) and bits else None)


def with_gbops(final: pd.DataFrame | None, gbops: Callable[[str | None], float]) -> pd.DataFrame | None:
    """final.parquet's table with a ``gbops`` column from its ``bits`` (kept where finalize recorded one)."""
    if final is None or "gbops" in final.columns:
        return final
    return final.assign(gbops=[gbops(b) for b in final["bits"]])


def fmt_gbops(value: Any) -> str:
    return f"{float(value):.4g}" if value is not None and value == value else "-"
