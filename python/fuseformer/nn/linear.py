"""Linear layers and MLP blocks with the activation fused into the GEMM.

  LinearAct(in_features, out_features, bias=True, activation="gelu")
      a torch.nn.Linear (same parameters and state_dict) whose forward is act(linear(x))
  MLP(in_features, hidden_features, out_features=None, bias=True, activation="gelu")
      fc2(act(fc1(x))): keys fc1.weight, fc1.bias, fc2.weight, fc2.bias, as the
      Linear → activation → Linear stack it replaces (timm / ViT naming)
  GatedMLP(hidden_size, intermediate_size, bias=False, activation="silu")
      down_proj(act(gate_proj(x)) * up_proj(x)): Llama's MLP and its state_dict keys
      (gate_proj.weight, up_proj.weight, down_proj.weight); SwiGLU with "silu", GeGLU with
      "gelu" / "gelu_tanh"

The gate and up weights stay two separate parameters (checkpoints load unchanged); the fused
kernel reads both in one pass over x, so nothing is concatenated or interleaved per call.
"""

from __future__ import annotations

import torch

from fuseformer.ops import linear as linear_ops


def _check_activation(activation: str, module: str) -> str:
    if activation not in linear_ops.ACTIVATIONS:
        raise ValueError(
            f"fuseformer.nn.{module}: activation must be one of "
            f"{', '.join(map(repr, linear_ops.ACTIVATIONS))}; got {activation!r}"
        )
    return activation


class LinearAct(torch.nn.Linear):
    """``act(torch.nn.Linear(x))`` with the bias and activation fused into the GEMM."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "gelu",
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = _check_activation(activation, "LinearAct")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_ops.linear_act(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class MLP(torch.nn.Module):
    """Two linear layers, the first's activation fused: ``fc2(act(fc1(x)))``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True,
                 activation: str = "gelu", device=None, dtype=None) -> None:
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.fc1 = LinearAct(in_features, hidden_features, bias, _check_activation(activation, "MLP"),
                             device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(hidden_features, out_features, bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_ops.linear_act(self.fc1(x), self.fc2.weight, self.fc2.bias, "none")


class GatedMLP(torch.nn.Module):
    """Llama's MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``, the gate fused into one GEMM pass."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, activation: str = "silu",
                 device=None, dtype=None) -> None:
        super().__init__()
        self.activation = _check_activation(activation, "GatedMLP")
        kwargs = dict(device=device, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias, **kwargs)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias, **kwargs)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = linear_ops.gated_linear(
            x, self.gate_proj.weight, self.up_proj.weight, self.gate_proj.bias, self.up_proj.bias, self.activation
        )
        return linear_ops.linear_act(hidden, self.down_proj.weight, self.down_proj.bias, "none")

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
