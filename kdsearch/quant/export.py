"""The compressed file: packed integer weights in safetensors (no pickle), and its loader.

Layout (one tensor per ``size.storage_plan`` entry, so the file payload equals ``model_size().total_bytes``):

* ``<layer>.weight``: b-bit codes. 8-bit: int8. b < 8: the offset codes ``q + 2^(b-1)`` (0 .. 2^b - 1)
  packed densely little-endian into uint8 (value i occupies bits i*b .. i*b+b-1 of the stream, so 4-bit
  stores two values per byte, low nibble first). 16-bit: float16. 32-bit: float32.
* ``<layer>.weight_scale``: fp32 step per output channel; ``<layer>.act_step``: fp32 activation step.
* ``<bn>.affine``: fp32 [2, C], BN folded into ``y*a + b`` (see ``layers.FoldingBatchNorm2d``).
* every other parameter/buffer under its state_dict key, as stored.
* metadata ``kdsearch``: JSON with format version, arch, num_classes, BitConfig, per-layer activation
  bits and signedness, the input shape (C, H, W) when known, and any extra metadata given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kdsearch.models.residual import ResidualAdd

from .api import _set_module, act_bits_of, bit_config_of, quantize
from .bitconfig import BitConfig
from .integer_graph import bind
from .layers import ADD_INPUTS, QuantResidualAdd, _EvalFoldMixin, make_act_quantizer, unit_running_var
from .quantizers import LsqActQuantizer, LsqWeightQuantizer
from .size import storage_plan

FORMAT = "kdsearch.quantized"
FORMAT_VERSION = 1
_META_KEY = "kdsearch"
_INPUT_SHAPE_ATTR = "kdsearch_input_shape"


def checked_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be positive sizes such as (3, 32, 32), got {tuple(input_shape)}")
    return shape


def record_input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> None:
    """Remember on ``model`` the per-sample input shape (C, H, W) it is meant for (the data's image shape).

    Why: an exported graph has fixed spatial dimensions, so whoever exports it later (ONNX, a re-export)
    needs the shape the model was trained on, not a guess. ``load_quantized`` records the file's shape.
    """
    if input_shape is not None:
        setattr(model, _INPUT_SHAPE_ATTR, checked_input_shape(input_shape))


def input_shape_of(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape recorded with ``record_input_shape`` (or read from a file by ``load_quantized``)."""
    return getattr(model, _INPUT_SHAPE_ATTR, None)


def pack_bits(values: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values (1..8) densely into ``ceil(n * bits / 8)`` bytes, LSB first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"pack_bits: values must lie in [0, {2**bits - 1}] for {bits} bits")
    v = v.astype(np.uint8)
    if bits == 8:
        return v.copy()
    if bits == 4:  # the common case, without the bit-plane detour
        if v.size % 2:
            v = np.append(v, np.uint8(0))
        return v[0::2] | (v[1::2] << 4)
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray | torch.Tensor, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``n`` values as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits: bits must be in 1..8, got {bits}")
    p = np.asarray(packed.cpu() if isinstance(packed, torch.Tensor) else packed, dtype=np.uint8).reshape(-1)
    if p.size * 8 < n * bits:
        raise ValueError(f"unpack_bits: {p.size} bytes cannot hold {n} values of {bits} bits")
    if bits == 8:
        return p[:n].copy()
    if bits == 4:
        out = np.empty(2 * p.size, dtype=np.uint8)
        out[0::2], out[1::2] = p & 15, p >> 4
        return out[:n]
    planes = np.unpackbits(p, count=n * bits, bitorder="little").reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def _bn_affine(bn: nn.Module) -> torch.Tensor:
    if not (getattr(bn, "affine", False) and getattr(bn, "track_running_stats", False)):
        raise ValueError("export: only affine BatchNorm with running statistics can be folded into the file")
    if isinstance(bn, _EvalFoldMixin):  # the eval-mode (a, b), bias on the integer grid (`integer_graph`)
        return torch.stack(bn.folded_affine())
    invstd = 1.0 / torch.sqrt(bn.running_var.float() + bn.eps)
    a = bn.weight.float() * invstd
    return torch.stack([a, bn.bias.float() - bn.running_mean.float() * a])


def _layer_of(model: nn.Module, key: str, suffix: str) -> nn.Module:
    return model.get_submodule(key[: -len(suffix)])


def _infer_num_classes(model: nn.Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class DeadChannelError(ValueError):
    """A quantized layer holds a channel that carries no signal, or a step no file should hold; one line."""


DEAD_STEP_RATIO = 1e3  # a step this many times below the channel's max|w| / Qp clips the whole channel


@torch.no_grad()
def dead_channels(model: nn.Module) -> list[str]:
    """One line per dead or degenerate quantizer step of ``model`` (empty when every channel is alive).

    Dead: a channel with non-zero float weights whose integer codes are all 0 (its step is so large that every
    weight rounds to zero: the channel outputs nothing but its bias). Degenerate: a step that is not finite or
    not positive, or so small that the channel's largest weight sits ``DEAD_STEP_RATIO`` times beyond the clip
    limit (every weight clipped: the failure the learned 8-bit steps used to end in).
    """
    out: list[str] = []
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, LsqWeightQuantizer):
            s = wq.effective_step().detach().float().cpu()
            w = m.weight.detach().float().cpu().reshape(s.numel(), -1)
            amax = w.abs().amax(dim=1)
            codes = wq.integers(m.weight).reshape(s.numel(), -1).cpu()
            bad = ~torch.isfinite(s) | (s <= 0) | ((amax > 0) & (amax / s.clamp_min(1e-30) > DEAD_STEP_RATIO * wq.qp))
            dead = (amax > 0) & (codes == 0).all(dim=1) & ~bad
            out += [f"layer {name!r} channel {c} has a degenerate weight step {float(s[c]):.3g} "
                    f"(max|w| = {float(amax[c]):.3g})" for c in bad.nonzero().flatten().tolist()]
            out += [f"layer {name!r} channel {c} is dead: every {wq.bits}-bit code is 0 (step {float(s[c]):.3g}, "
                    f"max|w| = {float(amax[c]):.3g})" for c in dead.nonzero().flatten().tolist()]
        aq = getattr(m, "act_quantizer", None)
        if isinstance(aq, LsqActQuantizer) and aq.is_initialized:
            a = float(aq.effective_step().reshape(()))
            if not 0 < a < float("inf"):
                out.append(f"layer {name!r} has a degenerate activation step {a!r}")
    return out


def check_steps(model: nn.Module) -> None:
    """Refuse a model with a dead or degenerate quantizer step (``dead_channels``): the first, in one line.

    Why: a file holding one would ship a model that the size report describes but that silently lost channels.
    """
    bad = dead_channels(model)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DeadChannelError(f"export: {bad[0]}{more}; refusing to export it")


@torch.no_grad()
def export_quantized(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Write ``model`` (quantized, calibrated) as a compressed safetensors file atomically; return its bytes.

    ``arch``/``num_classes`` let ``load_quantized`` rebuild the architecture with ``create_model``
    (num_classes defaults to the last Linear's out_features). ``input_shape``: the data's image shape
    (C, H, W), stored so that ``export_onnx`` of the reloaded model needs no guess; defaults to the shape
    recorded on ``model`` (``record_input_shape``), else none is stored.
    """
    shape = checked_input_shape(input_shape) if input_shape is not None else input_shape_of(model)
    from kdsearch.io import atomic_path

    check_steps(model)

    tensors: dict[str, torch.Tensor] = {}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    act: dict[str, Any] = {}
    for name, bits in act_bits_of(model).items():
        q = getattr(model.get_submodule(name), "act_quantizer", None)
        if isinstance(q, LsqActQuantizer):
            if not q.is_initialized:
                raise ValueError(f"export: activation quantizer of {name!r} never saw data; calibrate first")
            act[name] = {"bits": bits, "signed": q.is_signed}
        else:
            act[name] = None if bits is None else {"bits": bits}
    adds = {name: {k: m.grid(k).is_signed for k in ADD_INPUTS} for name, m in model.named_modules()
            if isinstance(m, QuantResidualAdd)}
    for entry in storage_plan(model):
        if entry.role == "qweight":
            layer = _layer_of(model, entry.key, ".weight")
            q = layer.weight_quantizer.integers(layer.weight).reshape(-1).cpu()
            if entry.bits == 8:
                t = q.to(torch.int8)
            else:
                t = torch.from_numpy(pack_bits((q + 2 ** (entry.bits - 1)).numpy(), entry.bits))
        elif entry.role == "scale":
            t = _layer_of(model, entry.key, ".weight_scale").weight_quantizer.effective_step()
        elif entry.role == "act_step":
            t = _layer_of(model, entry.key, ".act_step").act_quantizer.effective_step()
        elif entry.role == "add_step":
            name, _, which = entry.key.rpartition(".")
            t = model.get_submodule(name).grid(which[: -len("_step")]).effective_step()
        elif entry.role == "hweight":
            t = state[entry.key].float().clamp(-65504.0, 65504.0).half()
        elif entry.role == "bn":
            t = _bn_affine(_layer_of(model, entry.key, ".affine"))
        else:
            t = state[entry.key]
        t = t.detach().cpu().contiguous().clone()  # shared steps (one grid, two readers) are stored twice
        if t.numel() * t.element_size() != entry.nbytes:  # the size model and the file must not drift
            raise AssertionError(f"export: {entry.key} holds {t.numel() * t.element_size()} B, plan {entry.nbytes} B")
        tensors[entry.key] = t
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": num_classes if num_classes is not None else _infer_num_classes(model),
        "bit_config": bit_config_of(model).to_dict(),
        "act": act,
        "adds": adds,
        "input_shape": None if shape is None else list(shape),
        "torch": torch.__version__,
        **dict(metadata or {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    return Path(path).stat().st_size


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path}: not a kdsearch quantized file (no {_META_KEY!r} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


@torch.no_grad()
def load_quantized(
    path: str | os.PathLike[str], model_factory: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """Rebuild the quantized model from ``path`` in eval mode, on CPU.

    The architecture comes from ``model_factory()`` or ``kdsearch.models.create_model(arch, num_classes)``
    with the file's metadata. Weights load as ``q * step`` so the fake quantizers reproduce the codes exactly.
    The file's input shape, if it has one, is recorded on the model (``input_shape_of``).
    """
    meta = read_metadata(path)
    if model_factory is None:
        if not meta.get("arch"):
            raise ValueError(f"{path}: no 'arch' in the metadata; pass model_factory to load_quantized")
        from kdsearch.models import create_model

        # "kwargs": what the spec gave beside an import-path arch (kdsearch.stages.finalize writes it)
        model = create_model(meta["arch"], num_classes=int(meta["num_classes"]), **(meta.get("kwargs") or {}))
    else:
        model = model_factory()
    quantize(model, BitConfig.from_dict(meta["bit_config"]), weight_init="none", learn_steps=False)
    record_input_shape(model, meta.get("input_shape"))
    for name, spec in meta["act"].items():
        layer = model.get_submodule(name)
        if hasattr(layer, "act_quantizer"):
            layer.act_quantizer = make_act_quantizer(spec and spec["bits"], "auto", "mse", learned=False)
    adds = meta.get("adds") or {}  # a file written before residual adds were quantized has none
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantResidualAdd) and name not in adds:
            _set_module(model, name, ResidualAdd())
    tensors = load_file(str(path))
    plan = storage_plan(model)
    expected, found = {e.key for e in plan}, set(tensors)
    if expected != found:
        raise ValueError(
            f"{path}: tensors do not fit the architecture; missing {sorted(expected - found)[:5]}, "
            f"unexpected {sorted(found - expected)[:5]}"
        )
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for entry in plan:
        t = tensors[entry.key]
        if t.numel() * t.element_size() != entry.nbytes:
            raise ValueError(
                f"{path}: tensor {entry.key!r} holds {t.numel() * t.element_size()} B; it does not fit the "
                f"architecture, which needs {entry.nbytes} B"
            )
        if entry.role == "qweight":
            layer = _layer_of(model, entry.key, ".weight")
            scale = tensors[entry.key[: -len("weight")] + "weight_scale"]
            if entry.bits == 8:
                q = t.to(torch.float32)
            else:
                codes = unpack_bits(t.numpy(), entry.bits, entry.numel).astype(np.float32)
                q = torch.from_numpy(codes) - 2 ** (entry.bits - 1)
            layer.weight.copy_(q.view_as(layer.weight) * scale.view(-1, *([1] * (layer.weight.dim() - 1))))
        elif entry.role == "scale":
            quantizer = _layer_of(model, entry.key, ".weight_scale").weight_quantizer
            assert isinstance(quantizer, LsqWeightQuantizer)
            quantizer.set_step(t)
        elif entry.role == "act_step":
            name = entry.key[: -len(".act_step")]
            model.get_submodule(name).act_quantizer.set_state(float(t.reshape(())), meta["act"][name]["signed"])
        elif entry.role == "add_step":
            name, _, which = entry.key.rpartition(".")
            which = which[: -len("_step")]
            model.get_submodule(name).grid(which).set_state(float(t.reshape(())), adds[name][which])
        elif entry.role == "bn":
            bn = _layer_of(model, entry.key, ".affine")
            bn.weight.copy_(t[0])
            bn.bias.copy_(t[1])
            bn.running_mean.zero_()
            bn.running_var.fill_(unit_running_var(bn.eps))
        else:
            state[entry.key].copy_(t)
    shape = meta.get("input_shape")
    if shape:  # the integer graph's links (`integer_graph`); the file's steps and biases already agree with them
        bind(model, torch.zeros(1, *shape))
    return model.eval()
