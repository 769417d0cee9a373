"""Weight-only quantized GEMM: y = x Wᵀ + b with W as int8 codes per output row or int4 codes in
groups along K, dequantized inside the main loop (python/fuseformer/ops/quant.py has the format).

One program per (BLOCK_M, BLOCK_N) output tile. Per K-step it loads the codes of a
(BLOCK_K, BLOCK_N) tile of Wᵀ, turns them into x's dtype with the tile's scale (and zero
point) and feeds the tensor-core dot; the float weight never exists in memory, so a decode
step reads 1 (int8) or 1/2 (int4) byte per weight. BLOCK_K divides the group size, so one
scale per column serves a whole K-step. int4: a byte holds columns k (low nibble) and k + 1
(high); instead of interleaving the nibbles back into one tile, the even and odd columns of x
are loaded as two half-width tiles and meet the low and high nibbles in two dots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import _dot_precision
from .rounding import software_bf16, to_output


@triton.jit
def _quant_linear(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, GROUPS, GROUP_SIZE,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + offs_n * GROUPS + g, mask=n_ok, other=0.0)
        if BITS == 8:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            x = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            q = tl.load(q_ptr + offs_n[None, :] * K + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
            w = (q.to(tl.float32) * s[None, :]).to(dtype)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        else:
            # K is a multiple of the group size, itself a multiple of BLOCK_K: no K masks.
            jj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            x_rows = x_ptr + offs_m[:, None] * K
            xe = tl.load(x_rows + 2 * jj[None, :], mask=m_ok[:, None], other=0.0)
            xo = tl.load(x_rows + 2 * jj[None, :] + 1, mask=m_ok[:, None], other=0.0)
            b = tl.load(q_ptr + offs_n[None, :] * (K // 2) + jj[:, None], mask=n_ok[None, :], other=0)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * GROUPS + g, mask=n_ok, other=0).to(tl.float32)
            else:
                z = tl.full((BLOCK_N,), 8.0, tl.float32)
            lo = (((b & 15).to(tl.float32) - z[None, :]) * s[None, :]).to(dtype)
            hi = (((b >> 4).to(tl.float32) - z[None, :]) * s[None, :]).to(dtype)
            acc = tl.dot(xe, lo, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(xo, hi, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], to_output(acc, dtype, SOFTWARE_BF16),
             mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the row count: decode (weights stream,
# few rows) and prefill; the interpreter takes the smallest tiles tl.dot allows. fp32 x takes
# full-precision dots on small tiles.
_DECODE_TILE = (16, 64, 128, 4, 4)
_PREFILL_TILE = (64, 128, 64, 4, 3)
_FP32_TILE = (32, 32, 32, 4, 2)
_INTERPRETER_TILE = (16, 16, 32, 1, 1)


def quantized_linear(x, qweight, scales, zeros, bias, bits: int, group_size: int):
    """(M, N) in x's dtype; x (M, K) contiguous rows."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if x.device.type != "cuda":
        bm, bn, bk, warps, stages = _INTERPRETER_TILE
    elif x.dtype == torch.float32:
        bm, bn, bk, warps, stages = _FP32_TILE
    else:
        bm, bn, bk, warps, stages = _DECODE_TILE if m <= 16 else _PREFILL_TILE
    if bits == 4:
        bk = min(bk, group_size)  # a K-step stays inside one group
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _quant_linear[grid](
        x, qweight.contiguous(), scales.contiguous(), zeros.contiguous() if zeros is not None else scales,
        bias if bias is not None else scales, out,
        m, n, k, scales.shape[1], group_size,
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(x.dtype), SOFTWARE_BF16=software_bf16(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return out


# ---- W8A8 (int8 or fp8): per-row dynamic activation quantization, then the 8-bit GEMM ---------

_ROUND = tl.constexpr(12582912.0)  # 1.5·2^23: (v + R) - R rounds half to even (|v| < 2^22)


@triton.jit
def _quantize_rows(x_ptr, q_ptr, s_ptr, K, FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: s = max|x| / QMAX (127, or 448 for e4m3), q = round(x / s), as
    ops.quantize_activation (int8: half to even; fp8: the hardware's round-to-nearest cast)."""
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * K + kk, mask=kk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    qmax = 448.0 if FP8 else 127.0
    s = tl.maximum(tl.max(amax, axis=0) / qmax, 1.1754943508222875e-38)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * K + kk, mask=kk < K, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, s)  # IEEE division: the codes match the reference
        if FP8:
            q = tl.minimum(tl.maximum(v, -448.0), 448.0).to(q_ptr.dtype.element_ty)
        else:
            q = tl.minimum(tl.maximum((v + _ROUND) - _ROUND, -127.0), 127.0).to(tl.int8)
        tl.store(q_ptr + row * K + kk, q, mask=kk < K)
    tl.store(s_ptr + row, s)


@triton.jit
def _w8a8_gemm(
    q_ptr, w_ptr, sx_ptr, sw_ptr, b_ptr, out_ptr, M, N, K,
    FP8: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = sx · sw · (q wᵀ) + b: int8 codes accumulate exactly in int32, e4m3 in float32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
        if FP8:
            a = tl.load(q_ptr + offs_m[:, None] * K + kk[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None], mask=b_mask, other=0.0)
        else:
            a = tl.load(q_ptr + offs_m[:, None] * K + kk[None, :], mask=a_mask, other=0)
            b = tl.load(w_ptr + offs_n[None, :] * K + kk[:, None], mask=b_mask, other=0)
        # out_dtype said: triton 3.6 checks the accumulator against it (float32 by default)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32 if FP8 else tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], to_output(out, out_ptr.dtype.element_ty, SOFTWARE_BF16),
             mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): 8-bit tensor-core tiles (K-steps of 128
# bytes); the interpreter takes small ones.
_W8A8_GPU_TILE = (128, 128, 128, 8, 3)
_W8A8_INTERPRETER_TILE = (16, 16, 32, 1, 1)
_INTERPRETER_QUANTIZE_BLOCK = 32


def _quantize_block(k: int) -> int:
    """The row quantizer's K-step on a GPU: a row of up to 1024 in one step."""
    return min(1024, triton.next_power_of_2(k))


def w8a8_linear(x, qweight, scales, bias):
    """(M, N) in x's dtype: x quantized per row to qweight's 8-bit type (int8 or e4m3), then the
    8-bit GEMM."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    fp8 = qweight.dtype == torch.float8_e4m3fn
    qx = torch.empty((m, k), device=x.device, dtype=qweight.dtype)
    sx = torch.empty((m,), device=x.device, dtype=torch.float32)
    _quantize_rows[(m,)](x, qx, sx, k, FP8=fp8, BLOCK_K=_quantize_block(k) if x.is_cuda else _INTERPRETER_QUANTIZE_BLOCK)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = _W8A8_GPU_TILE if x.is_cuda else _W8A8_INTERPRETER_TILE
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w8a8_gemm[grid](
        qx, qweight.contiguous(), sx, scales.reshape(-1).contiguous(), bias if bias is not None else sx, out, m, n, k,
        FP8=fp8, HAS_BIAS=bias is not None, SOFTWARE_BF16=software_bf16(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return out
