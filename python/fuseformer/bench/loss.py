"""Benchmark cases for the LM head's loss: ``linear_cross_entropy`` (the logits never made
whole) against PyTorch eager (F.linear, then F.cross_entropy), torch.compile of the same,
Liger-Kernel's fused linear cross-entropy (GPU, when installed), and the GEMMs alone (the ceiling: the softmax's passes over the logits should cost nothing).

Shapes (tokens, hidden, vocab): GPT-2 small's head (768 -> 50257), Llama-3-8B's (4096 -> 128256)
and a 32k vocabulary on a GPU; smaller heads on the CPU. FLOPs: 2·M·V·C for the logits, twice
that again for the gradients. The "peak MiB" column is this family's point: eager holds the
(M, V) logits, their log-softmax and their gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import CEILING_PREFIX, Case, missing_cuda_peer

FAMILY = "loss"


def _shapes(device: str, quick: bool) -> list[tuple[int, int, int]]:
    """(M tokens, C hidden, V vocab)."""
    if device == "cuda":
        if quick:
            return [(8192, 768, 50257)]
        return [(8192, 768, 50257), (8192, 4096, 128256), (16384, 2048, 32000)]
    return [(256, 128, 4096)] if quick else [(1024, 256, 16384), (256, 768, 50257)]


def _kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available_backends(device)
            if b != "torch" and b in backends.IMPLEMENTED["linear_cross_entropy"]]


def _eager(x, w, target):
    return F.cross_entropy(F.linear(x, w), target)


def _ours(backend: str):
    def run(x, w, target):
        with fuseformer.use_backend(backend):
            return fuseformer.ops.linear_cross_entropy(x, w, target)
    return run


def _liger():
    """Liger-Kernel's fused linear cross-entropy (its chunked Triton kernel), or None when not
    installed; its forward takes (weight, x, target)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, target: loss(w, x, target)


def _gemms_only(direction: str):
    # The logits GEMM (and the two gradient GEMMs on a gradient of the logits' shape): what
    # a fused loss cannot beat.
    def run(x, w, target):
        with torch.no_grad():
            z = x @ w.t()
            if direction == "fwd":
                return z
            return z @ w, z.t() @ x
    return run


def timed(fn, tensors, direction: str):
    x, w, target = tensors
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(x, w, target)
        return fwd

    def fwd_bwd():
        loss = fn(x, w, target)
        if isinstance(loss, tuple):  # the ceiling: no autograd
            return loss
        return torch.autograd.grad(loss, (x, w))
    return fwd_bwd


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    for direction in ("fwd+bwd", "fwd"):
        for m, c, v in _shapes(device, quick):
            grad = direction != "fwd"
            x = torch.randn(m, c, device=device).to(dtype).requires_grad_(grad)
            w = (torch.randn(v, c, device=device) * c**-0.5).to(dtype).requires_grad_(grad)
            target = torch.randint(0, v, (m,), device=device)
            tensors = (x, w, target)
            flops = 2 * m * v * c * (3 if grad else 1)
            # Ideal traffic: x and the weight read (the backward: dx and dW written too); no logits.
            bytes_ = (m * c + v * c) * elt * (2 if grad else 1) + m * 8
            impls = {f"fuseformer[{b}]": timed(_ours(b), tensors, direction) for b in _kernel_backends(device)}
            liger = _liger() if device == "cuda" and grad else None  # Liger's is a training loss
            if liger is not None:
                impls["liger-kernel"] = timed(liger, tensors, direction)
            impls["torch eager"] = timed(_eager, tensors, direction)
            impls["torch.compile"] = timed(torch.compile(_eager, dynamic=False), tensors, direction)
            gemm_name = "cuBLAS" if device == "cuda" else "ATen"
            impls[f"{CEILING_PREFIX}{gemm_name} GEMMs only"] = timed(_gemms_only(direction), tensors, direction)
            yield Case(FAMILY, "linear_cross_entropy", direction, (m, c, v), dtype, impls, bytes=bytes_, flops=flops)


def missing_baselines(device: str) -> dict[str, str]:
    """Peer libraries this family compares against when installed, and why each is absent."""
    return missing_cuda_peer("liger_kernel", "liger-kernel", device)
