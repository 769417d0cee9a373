"""Convolution + bias (+ residual) + activation as an implicit GEMM (forward).

The GEMM view of a 2-D convolution: rows are output pixels (M = N·P·Q), columns output
channels (K_out), and the reduction runs over the filter taps and input channels
(R·S·C, channels fastest, so channels-last input reads contiguous runs). Each program owns a
(BLOCK_M, BLOCK_N) tile of the output: per reduction step it gathers the input patch tile —
padding and image borders become masked loads — and a weight tile, and accumulates their
product in fp32; a 1x1 convolution with stride 1 and no padding is a plain GEMM of the pixels
by the weight (POINTWISE: no tap decoding or border masks). The epilogue adds the bias and the
residual, applies the activation and writes act' for the backward (as kernels/linear.py does). The weight is read through its
strides, so any layout works; groups = 1.

The backward runs through ATen (python/fuseformer/ops/conv.py): dz = g·act' and
aten.convolution_backward, which the issue allows where ours would be slower.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import _act_and_grad, _dot_precision, _grouped_tile
from .rounding import software_bf16, to_output


@triton.jit
def _conv_fwd(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, s_ptr,
    BATCH, H, W, C, P, Q, K_OUT, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    so_n, so_c, so_h, so_w,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE: tl.constexpr,
    POINTWISE: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m_total = BATCH * P * Q
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(m_total, BLOCK_M), tl.cdiv(K_OUT, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m_total
    n_ok = offs_n < K_OUT
    # Output pixel of each row.
    img = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    h0 = (pq // Q) * stride_h - pad_h
    w0 = (pq % Q) * stride_w - pad_w
    reduction = R * S * C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if POINTWISE:
        # 1x1, stride 1, no padding: a plain GEMM of the pixels (rows of x, read through its
        # strides) by the weight; no tap decoding, no border masks.
        pixel = img * sx_n + h0 * sx_h + w0 * sx_w
        for k0 in range(0, C, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            k_ok = c < C
            x = tl.load(x_ptr + pixel[:, None] + c[None, :] * sx_c, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_n[None, :] * sw_k + c[:, None] * sw_c, mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)
            acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)
    else:
        for k0 in range(0, reduction, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < reduction
            c = kk % C
            tap = kk // C
            r = tap // S
            s = tap % S
            h = h0[:, None] + r[None, :] * dil_h
            w = w0[:, None] + s[None, :] * dil_w
            inside = (h >= 0) & (h < H) & (w >= 0) & (w < W) & m_ok[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + img[:, None] * sx_n + c[None, :] * sx_c + h * sx_h + w * sx_w, mask=inside, other=0.0)
            wt = tl.load(w_ptr + offs_n[None, :] * sw_k + c[:, None] * sw_c + r[:, None] * sw_r + s[:, None] * sw_s,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    oh = pq // Q
    ow = pq % Q
    offs = img[:, None] * so_n + offs_n[None, :] * so_c + (oh * so_h + ow * so_w)[:, None]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a, d = _act_and_grad(acc, ACT)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs, to_output(a, dtype, SOFTWARE_BF16), mask=ok)
    if SAVE:
        tl.store(s_ptr + offs, to_output(d, dtype, SOFTWARE_BF16), mask=ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): a GEMM tile for channel counts of 64-512.
_GPU_TILE = (128, 64, 32, 4, 3)
_FP32_TILE = (64, 32, 16, 4, 2)
_INTERPRETER_TILE = (32, 16, 16, 4, 1)


def conv2d_act_fwd(x, weight, bias, residual, stride, padding, dilation, activation_code: int, save: bool,
                   memory_format: torch.memory_format):
    """out (in ``memory_format``) and act' (the same layout, empty unless ``save``)."""
    batch, c, h, w = x.shape
    k_out, _, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    out = torch.empty((batch, k_out, p, q), device=x.device, dtype=x.dtype, memory_format=memory_format)
    saved = torch.empty_like(out) if save else x.new_empty(0)
    if residual is not None and residual.stride() != out.stride():
        residual = residual.contiguous(memory_format=memory_format)
    precision = _dot_precision(x.dtype)
    if x.device.type != "cuda":
        bm, bn, bk, warps, stages = _INTERPRETER_TILE
    elif precision == "ieee":
        bm, bn, bk, warps, stages = _FP32_TILE
    else:
        bm, bn, bk, warps, stages = _GPU_TILE
    grid = (triton.cdiv(batch * p * q, bm) * triton.cdiv(k_out, bn),)
    _conv_fwd[grid](
        x, weight, bias if bias is not None else x, residual if residual is not None else x,
        out, saved if save else out,
        batch, h, w, c, p, q, k_out, r, s,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *weight.stride(), *out.stride(),
        ACT=activation_code, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, SAVE=save,
        POINTWISE=r == 1 and s == 1 and list(stride) == [1, 1] and list(padding) == [0, 0],
        DOT_PRECISION=precision, SOFTWARE_BF16=software_bf16(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out, saved
