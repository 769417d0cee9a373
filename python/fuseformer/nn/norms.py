"""LayerNorm and RMSNorm modules: subclasses of the torch.nn ones, so constructor,
parameters, state_dict keys, ``isinstance`` checks and ``extra_repr`` are PyTorch's; only
``forward`` runs fuseformer ops.

Under autocast the output keeps the input's dtype (fp32 weights are read directly by the
kernel), where torch.nn.LayerNorm would upcast the output to float32: one half-precision
write instead of a float32 one.
"""

from __future__ import annotations

import torch

from fuseformer.ops import norms as norm_ops


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm_ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward_with_residual(
        self, input: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(input + residual), input + residual)`` in one fused pass."""
        return norm_ops.add_layer_norm(
            input, residual, self.normalized_shape, self.weight, self.bias, self.eps
        )


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return norm_ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def forward_with_residual(
        self, input: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(input + residual), input + residual)`` in one fused pass."""
        return norm_ops.add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps)
