"""Strict fp32 arithmetic for quantized models: what the exported integer model computes, nothing less.

Why: the exported file (``export.py``) and its ONNX form hold integer codes times fp32 steps, and every
runtime evaluates them in fp32. A QAT forward under bf16 autocast (8 significant bits) or with TF32 matmuls
and convolutions (10-bit mantissa products on Ampere and later) trains a different function from the one
that is shipped: rounded products move activations across LSQ rounding boundaries, so the learned steps and
the measured accuracy belong to a model nobody exports. Float phases keep bf16/TF32; quantized ones do not.

``strict_fp32()`` turns off, for its block, (1) autocast and (2) reduced-precision fp32 math:
``torch.set_float32_matmul_precision("highest")`` (cuBLAS TF32 and oneDNN's implicit bf16 for fp32 matmuls)
and ``torch.backends.cudnn.allow_tf32 = False`` (cuDNN convolutions). The previous settings come back on exit.
Both switches are the ones that keep PyTorch's legacy and per-operator TF32 flags consistent with each other;
a process that set the per-operator ``fp32_precision`` flags itself, inconsistently, is not supported.
"""

from __future__ import annotations

import threading

import torch

_STATE = threading.local()


def strict_fp32_active() -> bool:
    """True inside a ``strict_fp32()`` block on this thread (the training loop then does not autocast)."""
    return getattr(_STATE, "depth", 0) > 0


def _autocast_device_types() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


class strict_fp32:  # noqa: N801 - used like the context-manager functions of torch
    """No autocast on ``device_types`` (default: every available one) and IEEE fp32 math inside the block.

    Nests: an inner block restores what the outer one set. Used around each quantized layer's forward and,
    by ``kdsearch.train``, around whole QAT phases (so the backward pass runs without TF32 too). A class,
    not a generator: it runs once per quantized layer per forward, so its few microseconds count. Each
    ``with strict_fp32(...)`` makes a new instance; one instance is not re-entrant.
    """

    __slots__ = ("_autocasts", "_matmul", "_cudnn")

    def __init__(self, *device_types: str) -> None:
        types = device_types or _autocast_device_types()
        self._autocasts = [torch.autocast(device_type=d, enabled=False) for d in types]
        self._matmul, self._cudnn = "highest", False

    def __enter__(self) -> None:
        for ac in self._autocasts:
            ac.__enter__()
        self._matmul, self._cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        if self._matmul != "highest":  # cuBLAS TF32 and oneDNN's implicit bf16 for fp32 matmuls
            torch.set_float32_matmul_precision("highest")
        if self._cudnn:  # cuDNN TF32 convolutions
            torch.backends.cudnn.allow_tf32 = False
        _STATE.depth = getattr(_STATE, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _STATE.depth -= 1
        if self._cudnn:
            torch.backends.cudnn.allow_tf32 = True
        if self._matmul != "highest":
            torch.set_float32_matmul_precision(self._matmul)
        for ac in reversed(self._autocasts):
            ac.__exit__(None, None, None)
