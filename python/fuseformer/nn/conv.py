"""Convolution modules with the bias, residual and activation fused.

  Conv2dAct(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
            bias=True, padding_mode="zeros", activation="relu")
      a torch.nn.Conv2d (same parameters and state_dict) whose forward is
      act(conv(x) [+ residual])
  ConvBNAct(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
            bias=False, activation="relu", eps=1e-5, momentum=0.1)
      conv -> BatchNorm2d -> act with keys conv.* and bn.* (the usual ResNet stem/block
      layout). In training, BatchNorm needs the batch's statistics, so the three run apart;
      in eval mode BatchNorm is folded into the convolution's weight and bias (exact up to
      rounding) and the whole block is one fused call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuseformer.ops import conv as conv_ops
from fuseformer.ops.linear import ACTIVATIONS, activation_fn


def _check_activation(activation: str, module: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fuseformer.nn.{module}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}; "
                         f"got {activation!r}")
    return activation


class Conv2dAct(torch.nn.Conv2d):
    """``act(torch.nn.Conv2d(x) + residual)`` in one fused call."""

    def __init__(self, *args, activation: str = "relu", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.activation = _check_activation(activation, "Conv2dAct")

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            # As torch.nn.Conv2d: pad explicitly, then convolve without padding.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv_ops.conv2d_act(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                                   self.activation, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class ConvBNAct(torch.nn.Module):
    """Conv2d -> BatchNorm2d -> activation; BatchNorm folded into the convolution in eval mode."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, activation: str = "relu", eps: float = 1e-5,
                 momentum: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        kwargs = dict(device=device, dtype=dtype)
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                                    **kwargs)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **kwargs)
        self.activation = _check_activation(activation, "ConvBNAct")

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's weight and bias with BatchNorm's running statistics folded in."""
        bn = self.bn
        if bn.running_var is None:
            raise RuntimeError("fuseformer.nn.ConvBNAct: BatchNorm without running statistics cannot be folded")
        return conv_ops.fold_batch_norm(self.conv.weight, self.conv.bias, bn.weight, bn.bias, bn.running_mean,
                                        bn.running_var, bn.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if self.training or conv.padding_mode != "zeros":
            y = bn(conv(x))
            if residual is not None:
                y = y + residual
            return activation_fn(self.activation)(y)
        if bn.running_var is None:
            raise RuntimeError("fuseformer.nn.ConvBNAct: BatchNorm without running statistics cannot be folded")
        return conv_ops.conv2d_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                      bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups, self.activation,
                                      residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
