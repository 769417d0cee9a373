"""Benchmark cases for conv2d_act: ResNet-18/50 layer shapes, inference (forward) and
training (forward + backward), channels-last, with and without the residual add, against
PyTorch eager (cuDNN / oneDNN convolution, then bias, residual and ReLU) and torch.compile.

FLOPs: 2·N·P·Q·K·C·R·S per convolution (the backward twice that).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import Case
from fuseformer.bench.linear import timed

FAMILY = "conv"


def _shapes(device: str, quick: bool) -> list[tuple[int, int, int, int, int, int]]:
    """(batch, in channels, size, out channels, kernel, stride): ResNet layers."""
    if device == "cuda":
        if quick:
            return [(32, 64, 56, 64, 3, 1), (32, 256, 14, 256, 3, 1)]
        return [(32, 3, 224, 64, 7, 2), (32, 64, 56, 64, 3, 1), (32, 128, 28, 128, 3, 1), (32, 256, 14, 256, 3, 1),
                (32, 512, 7, 512, 3, 1), (32, 256, 56, 64, 1, 1), (32, 64, 56, 256, 1, 1)]
    if quick:
        return [(2, 32, 28, 32, 3, 1)]
    return [(4, 3, 112, 64, 7, 2), (4, 64, 56, 64, 3, 1), (4, 128, 28, 128, 3, 1), (4, 256, 14, 256, 3, 1),
            (4, 256, 28, 64, 1, 1)]


def _kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available_backends(device) if b != "torch" and b in backends.IMPLEMENTED["conv"]]


# The implementations are built by functions, not closures in the loop: the cases are listed
# before any runs, and a closure would see the loop's last stride and padding.
def _eager(stride: int, pad: int):
    def run(x, w, b, r):
        z = F.conv2d(x, w, b, stride, pad)
        return F.relu(z + r if r is not None else z)
    return run


def _ours(backend: str, stride: int, pad: int):
    def run(x, w, b, r):
        with fuseformer.use_backend(backend):
            return fuseformer.ops.conv2d_act(x, w, b, stride, pad, 1, 1, "relu", r)
    return run


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    for residual in (False, True):
        op = "conv2d+bias+residual+relu" if residual else "conv2d+bias+relu"
        for direction in ("fwd", "fwd+bwd"):
            for n, c, size, k, kernel, stride in _shapes(device, quick):
                if residual and kernel != 3:
                    continue  # the residual joins at a block's last 3x3 convolution
                grad = direction != "fwd"
                pad = kernel // 2
                x = torch.randn(n, c, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                w = (torch.randn(k, c, kernel, kernel, device=device) / (c * kernel * kernel) ** 0.5).to(dtype)
                w = w.contiguous(memory_format=torch.channels_last)
                b = torch.randn(k, device=device, dtype=dtype)
                out_size = (size + 2 * pad - kernel) // stride + 1
                r = (torch.randn(n, k, out_size, out_size, device=device, dtype=dtype)
                     .contiguous(memory_format=torch.channels_last) if residual else None)
                tensors = [t.requires_grad_(grad) if t is not None else None for t in (x, w, b, r)]

                eager = _eager(stride, pad)
                impls = {f"fuseformer[{be}]": timed(_ours(be, stride, pad), tensors, direction)
                         for be in _kernel_backends(device)}
                impls["torch eager"] = timed(eager, tensors, direction)
                impls["torch.compile"] = timed(torch.compile(eager, dynamic=False), tensors, direction)
                flops = 2 * n * out_size * out_size * k * c * kernel * kernel * (3 if grad else 1)
                moved = (x.numel() + w.numel() + n * k * out_size * out_size * (2 if residual else 1)) * elt
                yield Case(FAMILY, op, direction, (n, c, size, k, kernel, stride), dtype, impls,
                           bytes=moved * (3 if grad else 1), flops=flops)
