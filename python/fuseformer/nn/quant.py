"""Weight-only quantized linear layer.

  QuantizedLinear(in_features, out_features, bias=True, scheme="int8_weight_only", group_size=128,
                  zero_points=True, device=None, dtype=None)
  QuantizedLinear.from_float(linear, scheme, group_size=128, zero_points=True)

Schemes as fuseformer.ops.quantize_weight's (int8_weight_only, int4_weight_only, int8_dynamic).
Buffers (the state_dict): ``qweight`` (int8 (N, K), or uint8 (N, K/2) for int4), ``scales``
(float32), ``zeros`` (uint8; int4 with zero points), ``bias`` (the activation dtype). Inference
only: the buffers take no gradient (the input gets one). ``memory_footprint()`` counts their
bytes.
"""

from __future__ import annotations

import torch

from fuseformer.ops import quant as quant_ops


class QuantizedLinear(torch.nn.Module):
    """``torch.nn.Linear`` with its weight quantized (fuseformer.ops.quantized_linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "int8_weight_only",
                 group_size: int = 128, zero_points: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        quant_ops._check_scheme(scheme, "fuseformer.nn.QuantizedLinear")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.zero_points = scheme, zero_points
        per_channel = scheme != "int4_weight_only"
        self.group_size = in_features if per_channel else group_size
        # Codes of a zero weight in the right format and shapes; from_float or load_state_dict fills them.
        empty = quant_ops.quantize_weight(torch.zeros(out_features, in_features, device=device), scheme,
                                          128 if per_channel else self.group_size, zero_points)
        self.register_buffer("qweight", empty.qweight)
        self.register_buffer("scales", empty.scales)
        self.register_buffer("zeros", empty.zeros)
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, scheme: str, group_size: int = 128,
                   zero_points: bool = True) -> QuantizedLinear:
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"QuantizedLinear.from_float: expected a torch.nn.Linear, got {type(linear).__name__}")
        qw = quant_ops.quantize_weight(linear.weight, scheme, group_size, zero_points)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size,
                     zero_points, device="meta")
        module.qweight, module.scales, module.zeros = qw.qweight, qw.scales, qw.zeros
        module.bias = linear.bias.detach().clone() if linear.bias is not None else None
        return module

    def quantized_weight(self) -> quant_ops.QuantizedWeight:
        return quant_ops.QuantizedWeight(self.qweight, self.scales, self.zeros, self.scheme, self.group_size,
                                         (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_ops.quantized_linear(x, self.quantized_weight(), self.bias)

    def memory_footprint(self) -> int:
        """Bytes of the buffers (codes, scales, zero points, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = (f", group_size={self.group_size}, zero_points={self.zero_points}"
                 if self.scheme == "int4_weight_only" else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme!r}{group}")
