"""Benchmark cases for whole MLP blocks: ``fuseformer.nn.MLP`` (GELU, GPT/BERT) and
``fuseformer.nn.GatedMLP`` (SwiGLU, Llama), forward and forward+backward, against the same
block in PyTorch (nn.Linear stack: eager and torch.compile) and Liger-Kernel's SwiGLU MLP
when installed. Weights are shared, so every implementation computes the same thing.

FLOPs: 2·M·(K·H + H·K) for the MLP, 2·M·3·K·H for the gated MLP (M tokens, K model width,
H hidden width); the backward twice the forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import Case, missing_cuda_peer
from fuseformer.bench.linear import timed

FAMILY = "mlp"


def _shapes(device: str, quick: bool) -> list[tuple[int, int, int]]:
    """(M tokens, model width, hidden width)."""
    if device == "cuda":
        if quick:
            return [(4096, 4096, 11008)]
        return [(16384, 768, 3072), (8192, 4096, 11008), (8192, 4096, 14336), (16, 4096, 14336)]
    return [(256, 256, 1024)] if quick else [(2048, 768, 3072), (512, 1024, 2816)]


def _kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available_backends(device) if b != "torch" and b in backends.IMPLEMENTED["linear"]]


class TorchGatedMLP(torch.nn.Module):
    """Llama's MLP in plain PyTorch (the eager baseline)."""

    def __init__(self, ours: fuseformer.nn.GatedMLP):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = ours.gate_proj, ours.up_proj, ours.down_proj

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TorchMLP(torch.nn.Module):
    def __init__(self, ours: fuseformer.nn.MLP):
        super().__init__()
        self.fc1, self.fc2 = ours.fc1, ours.fc2

    def forward(self, x):
        return self.fc2(F.gelu(torch.nn.functional.linear(x, self.fc1.weight, self.fc1.bias)))


def _liger_swiglu(ours: fuseformer.nn.GatedMLP):
    """Liger-Kernel's SwiGLU MLP sharing our weights, or None when not installed."""
    try:
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return None

    class Config:
        hidden_size = ours.gate_proj.in_features
        intermediate_size = ours.gate_proj.out_features
        hidden_act = "silu"

    liger = LigerSwiGLUMLP(Config())
    liger.gate_proj, liger.up_proj, liger.down_proj = ours.gate_proj, ours.up_proj, ours.down_proj
    return liger


def _ours(module, backend):
    def run(x):
        with fuseformer.use_backend(backend):
            return module(x)

    return run


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    for kind in ("MLP[gelu]", "GatedMLP[silu]"):
        for direction in ("fwd", "fwd+bwd"):
            for m, k, h in _shapes(device, quick):
                if direction != "fwd" and m < 64:
                    continue  # decode is inference
                grad = direction != "fwd"
                if kind.startswith("Gated"):
                    ours = fuseformer.nn.GatedMLP(k, h, activation="silu", device=device, dtype=dtype)
                    theirs = TorchGatedMLP(ours)
                    weights = 3 * k * h
                else:
                    ours = fuseformer.nn.MLP(k, h, activation="gelu", device=device, dtype=dtype)
                    theirs = TorchMLP(ours)
                    weights = 2 * k * h
                ours.requires_grad_(grad)
                x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=grad)
                params = [x, *ours.parameters()]
                flops = 2 * m * weights * (3 if grad else 1)
                bytes_ = (2 * m * k + weights) * elt * (3 if grad else 1)

                def wrap(module):
                    return lambda *tensors: module(tensors[0])

                impls = {f"fuseformer[{b}]": timed(wrap(_ours(ours, b)), params, direction)
                         for b in _kernel_backends(device)}
                liger = _liger_swiglu(ours) if device == "cuda" and kind.startswith("Gated") else None
                if liger is not None:
                    impls["liger-kernel"] = timed(wrap(liger), params, direction)
                impls["torch eager"] = timed(wrap(theirs), params, direction)
                impls["torch.compile"] = timed(wrap(torch.compile(theirs, dynamic=False)), params, direction)
                yield Case(FAMILY, kind, direction, (m, k, h), dtype, impls, bytes=bytes_, flops=flops)


def missing_baselines(device: str) -> dict[str, str]:
    """Peer libraries this family compares against when installed, and why each is absent."""
    return missing_cuda_peer("liger_kernel", "liger-kernel", device)
