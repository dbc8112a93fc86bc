"""Trained-model files: weights plus the provenance that makes them reusable on their own.

A model file is a plain dict of tensors, strings and numbers, so it loads with
`torch.load(..., weights_only=True)` (no pickle execution), also when it comes from outside.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .io import atomic_torch_save, git_commit
from .models import create_model


class CheckpointError(RuntimeError):
    """A model file that is missing, unreadable or for another architecture."""


def provenance(spec_dict: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "kdsearch_version": __version__,
        "git_commit": git_commit(),
        "torch": str(torch.__version__),
        "host": platform.node(),
        **({"spec": spec_dict} if spec_dict is not None else {}),
        **extra,
    }


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    arch: str,
    num_classes: int,
    metrics: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> None:
    """Write `model` with what rebuilds it: `arch` (a registered name or an import path) and the `kwargs` the
    spec gave beside it, so `load_model` calls `create_model(arch, num_classes, **kwargs)` on its own."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {"format": "kdsearch.model/1", "arch": arch, "num_classes": num_classes, "kwargs": dict(kwargs or {}),
         "state_dict": state, "metrics": metrics or {}, "meta": meta or {}},
        path,
    )


def read_model_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"model file '{p}' not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # a torch.save of arbitrary objects, a truncated file, ...
        raise CheckpointError(f"cannot read '{p}' as a weights-only checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{p}' is not a model checkpoint (a dict of tensors)")
    return obj


def load_model(
    path: str | os.PathLike[str], *, arch: str | None = None, num_classes: int | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a float model from a kdsearch model file, or from a bare state_dict when `arch` is given
    (built as `create_model(arch, num_classes, **kwargs)`)."""
    obj = read_model_file(path)
    if obj.get("format", "").startswith("kdsearch.model/"):
        if arch is not None and obj["arch"] != arch:
            raise CheckpointError(f"'{path}' holds a {obj['arch']}, not a {arch}")
        arch, num_classes, state = obj["arch"], obj["num_classes"], obj["state_dict"]
        kwargs = obj.get("kwargs") or {}
    else:  # an outside checkpoint: a state_dict, possibly wrapped as {"state_dict": ...} or {"model": ...}
        if arch is None or num_classes is None:
            raise CheckpointError(f"'{path}' has no kdsearch metadata; its architecture and num_classes are needed")
        state = obj.get("state_dict", obj.get("model", obj))
        state = {k.removeprefix("module."): v for k, v in state.items()}
    model = create_model(arch, num_classes=num_classes, **(kwargs or {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"'{path}' does not fit {arch}/{num_classes} classes: {str(err).splitlines()[0]}") from None
    return model, obj
