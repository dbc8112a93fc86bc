"""Mixed-precision quantization-aware training: LSQ quantizers, module swap, BitConfig, size model, export.

    inv = layer_inventory(model)                                  # names, kinds, params, MACs
    cfg = BitConfig.uniform(inv, 4, pin={"first": 8, "last": 8})  # or a searched {layer: bits} dict
    quantize(model, cfg, act_bits=8, calib=x)                     # in place; then train as usual (QAT)
    model_size(model).total_mb                                    # bytes the exported file holds
    model_bops(model, input_size=(3, 32, 32)).gbops               # MACs x b_w x b_a (HAWQ-V3), in 10^9
    export_quantized(model, "m.kdq", arch="resnet18"); load_quantized("m.kdq")
    export_onnx(model, "m.onnx", calib=val_images)                # integer ONNX that ORT fuses (checked)
"""

# The quantizers' arithmetic and the size model, as one number: every cached result measured with them (the
# sensitivity table's bytes and KLs, a QAT model) keys on it. 2: 8-bit weights on [-127, 127], the quantized
# residual adds' steps in the size model (`integer_graph`).
QUANT_VERSION = 2

from .api import (
    act_bits_of, bit_config_of, calibrate, is_quantized, quantize, quantizer_parameters, reestimate_bn,
)
from .bops import BopsReport, LayerBops, bops_costs, gbops_function, model_bops
from .bitconfig import (
    SUPPORTED_BITS,
    BitConfig,
    LayerInfo,
    layer_inventory,
    quantizable_layers,
    resolve_act_bits,
)
from .export import (
    DeadChannelError,
    check_steps,
    dead_channels,
    export_quantized,
    input_shape_of,
    load_quantized,
    pack_bits,
    read_metadata,
    record_input_shape,
    unpack_bits,
)
from .layers import FoldingBatchNorm1d, FoldingBatchNorm2d, QuantConv2d, QuantLinear, bypass_quantization
from .lsq_ops import lsq_fake_quant, lsq_function, lsq_grad_scale
from .quantizers import HalfQuantizer, LsqActQuantizer, LsqWeightQuantizer, init_act_step, init_weight_step
from .onnx_export import export_onnx
from .onnx_fusion import FusionError, FusionReport, check_fusion
from .precision import strict_fp32, strict_fp32_active
from .size import FloatPart, SizeReport, StoredTensor, float_parts, model_size, storage_plan

__all__ = [
    "QUANT_VERSION",
    "SUPPORTED_BITS",
    "BitConfig",
    "BopsReport",
    "DeadChannelError",
    "FloatPart",
    "FoldingBatchNorm1d",
    "FusionError",
    "FusionReport",
    "FoldingBatchNorm2d",
    "HalfQuantizer",
    "LayerBops",
    "LayerInfo",
    "LsqActQuantizer",
    "LsqWeightQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "SizeReport",
    "StoredTensor",
    "act_bits_of",
    "bit_config_of",
    "bops_costs",
    "bypass_quantization",
    "calibrate",
    "check_steps",
    "dead_channels",
    "check_fusion",
    "export_onnx",
    "export_quantized",
    "gbops_function",
    "float_parts",
    "init_act_step",
    "init_weight_step",
    "input_shape_of",
    "is_quantized",
    "layer_inventory",
    "load_quantized",
    "lsq_fake_quant",
    "lsq_function",
    "lsq_grad_scale",
    "model_bops",
    "model_size",
    "pack_bits",
    "quantizable_layers",
    "quantize",
    "quantizer_parameters",
    "reestimate_bn",
    "read_metadata",
    "record_input_shape",
    "resolve_act_bits",
    "storage_plan",
    "strict_fp32",
    "strict_fp32_active",
    "unpack_bits",
]
