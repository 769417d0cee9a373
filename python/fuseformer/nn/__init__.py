"""fuseformer.nn: drop-in replacements for torch.nn modules (same constructor arguments,
same parameters and state_dict keys, same results), running fuseformer ops."""

from fuseformer.nn.attention import MultiheadAttention
from fuseformer.nn.norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "MultiheadAttention", "RMSNorm"]
