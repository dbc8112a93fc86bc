"""What the deployed integer graph ties together, found by one forward of the QAT model (``bind``).

An integer runtime's graph (ONNX Runtime's QDQ form, HAWQ-V3's integer-only inference) is not the QAT model's
float graph with rounding added; three things differ, and a QAT model that ignores them computes another
function (on CIFAR-10 (JPEG q75 copy) they cost the ORT int8 model 0.8 points of top-1 agreement with the
`.kdq`, benchmarks/results/onnx_agreement.md). ``bind`` makes the QAT model compute what the graph computes:

* **BatchNorm folds into the integer layer before it**, and the folded bias is an int32 multiple of the
  accumulator step ``input step x weight step x |a|``. The BatchNorm that reads an integer layer's output rounds
  its eval-mode bias on that grid (``FoldingBatchNorm2d.folded_affine``); a bias with no BatchNorm after it rounds
  in its own layer.
* **A tensor has one quantization.** Integer layers that read the same tensor (a block's first conv and its
  1x1 shortcut conv) share the first one's input quantizer, instead of the runtime rounding twice.
* **Residual adds add quantized tensors** (``QuantResidualAdd``); the shortcut reads the grid of the integer
  layer that reads the same tensor (the identity shortcut is the block's input).

The links are Python references (lists, so they are not submodules and ``state_dict`` keys do not change);
``calibrate`` binds first; ``load_quantized`` binds from the file's input shape; any other quantized model binds
on its first forward (``bind_on_first_call``, which ``quantize`` registers), so a QAT checkpoint loaded into a
fresh ``quantize``d model computes what the saved one did. Binding is idempotent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layers import QuantResidualAdd, _EvalFoldMixin, is_quant_layer
from .quantizers import LsqActQuantizer, LsqWeightQuantizer


def is_integer_layer(m: nn.Module) -> bool:
    """An integer layer (b-bit weights) whose input is integer-quantized."""
    return (is_quant_layer(m) and isinstance(m.act_quantizer, LsqActQuantizer)
            and isinstance(m.weight_quantizer, LsqWeightQuantizer))


@torch.no_grad()
def bind(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """Link ``model``'s folded biases, shared input grids and residual adds from one eval forward of ``x``.

    The forward runs with every quantizer bypassed (float arithmetic; nothing is calibrated by it) and modes are
    restored. Returns what was linked, by module name (for tests).
    """
    from .layers import bypass_quantization, modes_restored

    model._kdsearch_bound = True  # before the forward below, which would call `bind_on_first_call` again
    names = {m: n for n, m in model.named_modules()}
    layer_outputs: dict[int, nn.Module] = {}
    layer_inputs: dict[int, nn.Module] = {}
    keep: list[Tensor] = []  # the tensors whose ids are keys above stay alive for the pass
    linked: dict[str, Any] = {"bn": {}, "shared_input": {}, "shortcut": {}}
    hooks = []

    def layer_pre(m: nn.Module, args: tuple[Any, ...]) -> None:
        t = args[0]
        first = layer_inputs.get(id(t))
        if first is None:
            layer_inputs[id(t)] = m
            keep.append(t)
        elif is_integer_layer(m) and is_integer_layer(first) and m.act_quantizer.bits == first.act_quantizer.bits:
            m.act_quantizer = first.act_quantizer
            linked["shared_input"][names[m]] = names[first]

    def layer_post(m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        layer_outputs[id(out)] = m
        keep.append(out)

    def bn_pre(m: nn.Module, args: tuple[Any, ...]) -> None:
        src = layer_outputs.get(id(args[0]))
        if src is not None and is_quant_layer(src):
            m._int_bias_of = [src]
            src._bias_into_bn = True
            linked["bn"][names[m]] = names[src]

    def add_pre(m: QuantResidualAdd, args: tuple[Any, ...]) -> None:
        reader = layer_inputs.get(id(args[1]))
        share = reader if reader is not None and is_integer_layer(reader) and reader.act_quantizer.bits == 8 else None
        m.share_shortcut(share)
        linked["shortcut"][names[m]] = None if share is None else names[share]

    for m in model.modules():
        if is_quant_layer(m):
            m._bias_into_bn = False
            hooks += [m.register_forward_pre_hook(layer_pre), m.register_forward_hook(layer_post)]
        elif isinstance(m, _EvalFoldMixin):
            m._int_bias_of = []
            hooks.append(m.register_forward_pre_hook(bn_pre))
        elif isinstance(m, QuantResidualAdd):
            hooks.append(m.register_forward_pre_hook(add_pre))
    try:
        with modes_restored(model), bypass_quantization(model):
            model.eval()
            model.forward(x)  # not model(x): the model's own hooks (a caller's, and the binding pre-hook) stay out
    finally:
        for h in hooks:
            h.remove()
    return linked


def bind_on_first_call(model: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook (``quantize`` registers it on the model): ``bind`` with the first input the model sees.

    A module-level function reading only its arguments, so a deep-copied or pickled model carries it correctly."""
    if not getattr(model, "_kdsearch_bound", True) and args and isinstance(args[0], Tensor):
        bind(model, args[0][:8])
