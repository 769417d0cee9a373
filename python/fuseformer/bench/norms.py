"""Benchmark cases for the norms family: LayerNorm, RMSNorm and the fused residual form,
forward and forward+backward, against PyTorch eager and torch.compile."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import Case, missing_cuda_peer

FAMILY = "norms"


def _shapes(device: str, quick: bool) -> list[tuple[int, int]]:
    if device == "cuda":
        # Rows of 4096-16384 tokens; hidden sizes of current models.
        return [(4096, 4096), (16384, 4096)] if quick else [
            (16384, 1024), (16384, 2048), (16384, 4096), (16384, 8192), (8192, 16384)]
    return [(512, 1024)] if quick else [(4096, 1024), (4096, 4096)]


def _kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available_backends(device) if b != "torch"]


def _eager(op: str):
    if op == "layer_norm":
        return lambda x, r, w, b: F.layer_norm(x, x.shape[-1:], w, b)
    if op == "rms_norm":
        return lambda x, r, w, b: F.rms_norm(x, x.shape[-1:], w)
    return lambda x, r, w, b: (F.rms_norm(x + r, x.shape[-1:], w), x + r)  # add_rms_norm


def _ours(op: str, backend: str):
    def run(x, r, w, b):
        with fuseformer.use_backend(backend):
            if op == "layer_norm":
                return fuseformer.ops.layer_norm(x, x.shape[-1:], w, b)
            if op == "rms_norm":
                return fuseformer.ops.rms_norm(x, x.shape[-1:], w)
            return fuseformer.ops.add_rms_norm(x, r, x.shape[-1:], w)

    return run


def _timed(fn, tensors, direction: str):
    x, r, w, b = tensors
    leaves = [t for t in tensors if t is not None]
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(x, r, w, b)
        return fwd
    grads = None

    def fwd_bwd():
        nonlocal grads
        out = fn(x, r, w, b)
        outs = out if isinstance(out, tuple) else (out,)
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        return torch.autograd.grad(outs, leaves, grads)

    return fwd_bwd


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    for op in ("layer_norm", "rms_norm", "add_rms_norm"):
        for direction in ("fwd", "fwd+bwd"):
            for rows, cols in _shapes(device, quick):
                requires_grad = direction != "fwd"
                x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=requires_grad)
                r = torch.randn_like(x, requires_grad=requires_grad) if op == "add_rms_norm" else None
                w = torch.randn(cols, device=device, dtype=dtype, requires_grad=requires_grad)
                b = torch.randn(cols, device=device, dtype=dtype, requires_grad=requires_grad) if op == "layer_norm" else None
                tensors = (x, r, w, b)
                # Ideal traffic: forward reads x (and r), writes y (and x + r); backward reads
                # the normalized input and dy (and d(x + r)), writes dx. Parameters are noise.
                streams_fwd = 4 if r is not None else 2
                streams_bwd = 3 if r is None else 4
                streams = streams_fwd + (streams_bwd if requires_grad else 0)
                # Operation counts per element, for the roofline only (the ops are memory-bound):
                # forward ~8 (center, square, two sums, scale, affine), backward ~12.
                flops = rows * cols * (8 + (12 if requires_grad else 0))
                eager = _eager(op)
                impls = {f"fuseformer[{b_}]": _timed(_ours(op, b_), tensors, direction) for b_ in _kernel_backends(device)}
                liger = _liger(op) if device == "cuda" else None
                if liger is not None:
                    impls["liger-kernel"] = _timed(liger, tensors, direction)
                impls["torch eager"] = _timed(eager, tensors, direction)
                impls["torch.compile"] = _timed(torch.compile(eager, dynamic=False), tensors, direction)
                yield Case(FAMILY, op, direction, (rows, cols), dtype, impls, bytes=streams * rows * cols * elt, flops=flops)


def _liger(op: str):
    """Liger-Kernel's Triton norm for ``op``, or None (not installed, or no such op)."""
    try:
        from liger_kernel.transformers import functional as liger
    except ImportError:
        return None
    if op == "layer_norm":
        return lambda x, r, w, b: liger.liger_layer_norm(x, w, b, 1e-5)
    if op == "rms_norm":
        return lambda x, r, w, b: liger.liger_rms_norm(x, w, 1e-6)
    return None  # no fused residual form


def missing_baselines(device: str) -> dict[str, str]:
    """Peer libraries this family compares against when installed, and why each is absent."""
    return missing_cuda_peer("liger_kernel", "liger-kernel", device)
