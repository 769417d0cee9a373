"""fuseformer.ops: functions that mirror their PyTorch counterparts and run fused kernels.

Each function validates its arguments, picks a backend (``fuseformer.backends``) and calls a
registered custom op (``torch.ops.fuseformer.*``), so it works under autograd and
``torch.compile(fullgraph=True)``.
"""

from fuseformer.ops.attention import attention, attention_varlen, attention_with_kv_cache
from fuseformer.ops.conv import conv2d_act, conv2d_bn_act
from fuseformer.ops.linear import gated_linear, linear_act
from fuseformer.ops.loss import linear_cross_entropy
from fuseformer.ops.lstm import lstm
from fuseformer.ops.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fuseformer.ops.quant import (QuantizedWeight, dequantize_weight, quantize_activation, quantize_weight,
                                   quantized_linear, sqnr_db)

__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kv_cache",
    "conv2d_act",
    "conv2d_bn_act",
    "gated_linear",
    "linear_act",
    "linear_cross_entropy",
    "lstm",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "QuantizedWeight",
    "dequantize_weight",
    "quantize_activation",
    "quantize_weight",
    "quantized_linear",
    "sqnr_db",
]
