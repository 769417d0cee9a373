"""Benchmark cases for GEMM + bias + activation: ``linear_act`` and ``gated_linear`` forward
and forward+backward, against PyTorch eager (F.linear, then the activation), torch.compile
of the same, and the GEMM alone (the ceiling: a fused activation should cost nothing).

Shapes (M tokens, K in, N out): square GEMMs and the first MLP layer of current models, at
prefill token counts and at decode (M = 1, 16). FLOPs: 2·M·N·K per GEMM (gated: two), the
backward twice the forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import CEILING_PREFIX, Case
from fuseformer.ops.linear import activation_fn

FAMILY = "linear"


def _shapes(device: str, quick: bool) -> list[tuple[int, int, int]]:
    """(M, K, N)."""
    if device == "cuda":
        if quick:
            return [(4096, 4096, 4096), (16, 4096, 14336)]
        return [
            (8192, 8192, 8192),  # square: the "activation is free" shape
            (4096, 4096, 4096),
            (16384, 768, 3072),  # BERT/GPT-2 base MLP up-projection
            (8192, 4096, 14336),  # Llama-3-8B MLP up-projection
            (16, 4096, 14336),  # decode
            (1, 4096, 14336),
        ]
    return [(256, 512, 1024)] if quick else [(2048, 768, 3072), (512, 1024, 4096), (16, 1024, 4096), (1, 1024, 4096)]


def _kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available_backends(device) if b != "torch" and b in backends.IMPLEMENTED["linear"]]


def _eager(gated: bool, activation: str):
    act = activation_fn(activation)
    if gated:
        return lambda x, w, w2, b, b2: act(F.linear(x, w, b)) * F.linear(x, w2, b2)
    return lambda x, w, w2, b, b2: act(F.linear(x, w, b))


def _ours(gated: bool, activation: str, backend: str):
    def run(x, w, w2, b, b2):
        with fuseformer.use_backend(backend):
            if gated:
                return fuseformer.ops.gated_linear(x, w, w2, b, b2, activation)
            return fuseformer.ops.linear_act(x, w, b, activation)

    return run


def _matmul_only(gated: bool):
    # The GEMM(s) alone, no bias, no activation, no gate: what the fused op cannot beat.
    if gated:
        return lambda x, w, w2, b, b2: (x @ w.t(), x @ w2.t())
    return lambda x, w, w2, b, b2: x @ w.t()


def timed(fn, tensors, direction: str):
    """A zero-argument callable: the forward under no_grad, or forward + backward to every
    leaf with a fixed upstream gradient."""
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(*tensors)
        return fwd
    grads = None

    def fwd_bwd():
        nonlocal grads
        out = fn(*tensors)
        outs = out if isinstance(out, tuple) else (out,)
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        # allow_unused: the GEMM-only ceiling does not use the biases.
        return torch.autograd.grad(outs, leaves, grads, allow_unused=True)

    return fwd_bwd


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    ops = [(False, "gelu"), (True, "silu")] if quick else [(False, "gelu"), (False, "relu2"), (True, "silu")]
    for gated, activation in ops:
        op = f"{'gated_linear' if gated else 'linear_act'}[{activation}]"
        for direction in ("fwd", "fwd+bwd"):
            for m, k, n in _shapes(device, quick):
                if direction != "fwd" and m < 64:
                    continue  # decode is inference
                grad = direction != "fwd"

                def param(*shape, scale=1.0):
                    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)

                x = param(m, k)
                w, w2 = param(n, k, scale=k**-0.5), (param(n, k, scale=k**-0.5) if gated else None)
                b, b2 = param(n), (param(n) if gated else None)
                tensors = (x, w, w2, b, b2)
                gemms = 2 if gated else 1
                flops = 2 * m * n * k * gemms * (3 if grad else 1)
                # Ideal traffic: x and the weights read, the output written (forward); the
                # backward reads them again with dY and writes dX and dW.
                fwd_bytes = (m * k + gemms * n * k + m * n) * elt
                bytes_ = fwd_bytes * (3 if grad else 1)
                eager = _eager(gated, activation)
                impls = {f"fuseformer[{b_}]": timed(_ours(gated, activation, b_), tensors, direction)
                         for b_ in _kernel_backends(device)}
                impls["torch eager"] = timed(eager, tensors, direction)
                impls["torch.compile"] = timed(torch.compile(eager, dynamic=False), tensors, direction)
                gemm_name = "cuBLAS" if device == "cuda" else "ATen"
                impls[f"{CEILING_PREFIX}{gemm_name} matmul only"] = timed(_matmul_only(gated), tensors, direction)
                yield Case(FAMILY, op, direction, (m, k, n), dtype, impls, bytes=bytes_, flops=flops)
