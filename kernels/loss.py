"""Linear + cross-entropy, chunked: the loss of F.cross_entropy(F.linear(x, W, b), target) and its
gradients, without the (M, V) logits ever existing whole.

Rows go through in chunks: the chunk's logits z = x_c Wᵀ + b are a cuBLAS GEMM in x's dtype
(as F.linear's), then ``_cross_entropy_rows_kernel`` (one program per row) takes the online
log-sum-exp in float32 over tiles of the row (of softcap·tanh(z/softcap) with a softcap, as
Gemma 2's head), writes the row's loss, and overwrites z with the
loss's gradient dz = (softmax(z) - (1 - ε)·onehot(t) - ε/V)·scale in a second pass (the row
re-read from L2); the chunk's gradients are GEMMs again: dX_c = dz W, dW += dzᵀ x_c. Taking
the gradients in the forward lets each chunk's logits die before the next chunk's; the backward
only scales them (python/fuseformer/ops/loss.py). Same contract as the C++ CPU kernel
(csrc/cpu/loss.cpp), whose comment has the derivation.

Chunks: as many rows as keep the chunk's logits under ``CHUNK_LOGIT_BYTES``. Fewer, larger
chunks than Liger-Kernel's (chunk logits about x's size): each chunk's weight-gradient GEMM
reads and writes the whole (V, C) accumulator, which at GPT-2's head (50257 x 768, float32) is 0.3 GB
of traffic a chunk against ~10 us of GEMM for a 128-row chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mathfn import tanh
from .rounding import software_bf16, to_output

CHUNK_LOGIT_BYTES = 256 << 20
MIN_CHUNK_ROWS = 256
MAX_BLOCK = 8192


@triton.jit
def _cross_entropy_rows_kernel(
    Z,  # (rows, V) logits in x's dtype, rows contiguous; receives the gradient when GRAD
    stride_z,
    TARGET,  # (rows,) int64
    LOSS,  # (rows,) float32
    COUNTED,  # () int64: rows not ignored (the "mean" divisor)
    vocab,
    ignore_index,
    smoothing,
    softcap,
    MEAN: tl.constexpr,
    GRAD: tl.constexpr,
    SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    target = tl.load(TARGET + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < vocab)

    # Online log-sum-exp over the row's tiles.
    m = float("-inf")
    s = 0.0
    z_sum = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z = tl.where(mask, softcap * tanh(z / softcap), float("-inf"))  # tanh(-inf) is -1 here
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), 0)
    lse = m + tl.log(s)
    z_target = tl.load(z_row + target, mask=in_range & ~ignored, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = softcap * tanh(z_target / softcap)
    share = smoothing / vocab
    loss = lse - (1.0 - smoothing) * z_target - share * z_sum
    # A target that is neither a class nor ignore_index makes the loss NaN (the op also
    # asserts on it, asynchronously on a GPU as F.cross_entropy does).
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(LOSS + row, loss)

    if GRAD:
        if MEAN:
            # max(.., 1): with no row counted every row is ignored and takes scale 0 below.
            scale = 1.0 / tl.maximum(tl.load(COUNTED), 1).to(tl.float32)
        else:
            scale = 1.0
        scale = tl.where(ignored, 0.0, scale)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = tanh(z / softcap)
                z = softcap * t
            g = (tl.exp(z - lse) - share) * scale
            g = tl.where(cols == target, g - (1.0 - smoothing) * scale, g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)  # d(c·tanh(z/c))/dz
            tl.store(z_row + cols, to_output(g, Z.dtype.element_ty, SOFTWARE_BF16), mask=mask)


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _chunk_rows(rows: int, vocab: int, itemsize: int) -> int:
    fit = CHUNK_LOGIT_BYTES // (vocab * itemsize)
    return min(rows, max(MIN_CHUNK_ROWS, fit // 64 * 64))


def cross_entropy_rows_(z: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, counted: torch.Tensor,
                        ignore_index: int, label_smoothing: float, softcap: float, mean: bool, grad: bool) -> None:
    """The row kernel on logits z (rows, V): losses (rows,) written, z overwritten by the
    gradient when ``grad``."""
    vocab = z.shape[1]
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    _cross_entropy_rows_kernel[(z.shape[0],)](
        z, z.stride(0), target, losses, counted, vocab, ignore_index, label_smoothing, softcap or 1.0,
        MEAN=mean, GRAD=grad, SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=softcap > 0, BLOCK=block,
        SOFTWARE_BF16=software_bf16(), num_warps=num_warps(block),
    )


def linear_cross_entropy_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                             ignore_index: int, label_smoothing: float, softcap: float, mean: bool, chunk_rows: int,
                             needs_input_grad: bool, needs_weight_grad: bool):
    """Same contract as the C++ op ``fuseformer::linear_cross_entropy_fwd`` (csrc/registration.cpp)."""
    m = x.shape[0]
    vocab = weight.shape[0]
    x = x.contiguous()
    target = target.contiguous()
    counted = (target != ignore_index).sum()
    grad = needs_input_grad or needs_weight_grad
    rows = min(m, chunk_rows) if chunk_rows > 0 else _chunk_rows(m, vocab, x.element_size())
    f32 = torch.float32
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    # float32 accumulators over the chunks (a half one would round once per chunk).
    grad_w = torch.zeros(weight.shape, dtype=f32, device=x.device) if needs_weight_grad else x.new_empty(0)
    grad_b = torch.zeros(vocab, dtype=f32, device=x.device) if needs_weight_grad and bias is not None else x.new_empty(0)
    losses = torch.empty(m, dtype=f32, device=x.device)
    for r0 in range(0, m, rows):
        xc = x[r0:r0 + rows]
        z = torch.addmm(bias, xc, weight.t()) if bias is not None else torch.mm(xc, weight.t())
        cross_entropy_rows_(z, target[r0:r0 + rows], losses[r0:r0 + rows], counted, ignore_index,
                            label_smoothing, softcap, mean, grad)
        if needs_input_grad:
            torch.mm(z, weight, out=grad_x[r0:r0 + rows])
        if needs_weight_grad:
            if z.dtype == f32:
                grad_w.addmm_(z.t(), xc)
            else:
                grad_w.add_(torch.mm(z.t(), xc))
            if bias is not None:
                grad_b.add_(z.sum(0, dtype=f32))
    total = losses.sum(dtype=torch.float64)
    loss = (total / counted if mean else total).to(f32)
    if needs_weight_grad and weight.dtype != f32:
        grad_w = grad_w.to(weight.dtype)
    return loss, grad_x, grad_w, grad_b
