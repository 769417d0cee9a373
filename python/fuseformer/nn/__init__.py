"""fuseformer.nn: drop-in replacements for torch.nn modules (same constructor arguments,
same parameters and state_dict keys, same results), running fuseformer ops."""

from fuseformer.nn.attention import MultiheadAttention
from fuseformer.nn.conv import Conv2dAct, ConvBNAct
from fuseformer.nn.linear import MLP, GatedMLP, LinearAct
from fuseformer.nn.loss import LinearCrossEntropyLoss
from fuseformer.nn.lstm import LSTM
from fuseformer.nn.norms import LayerNorm, RMSNorm
from fuseformer.nn.quant import QuantizedLinear

__all__ = ["Conv2dAct", "ConvBNAct", "GatedMLP", "LayerNorm", "LinearAct", "LinearCrossEntropyLoss", "LSTM", "MLP", "MultiheadAttention", "QuantizedLinear",
           "RMSNorm"]
