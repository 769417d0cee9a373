"""GEMM with a fused epilogue: act(x Wᵀ + b), and the gated form act(x Wgᵀ + bg) * (x Wuᵀ + bu).

Forward: one program per (BLOCK_M, BLOCK_N) output tile, tiles visited in groups of GROUP_M
rows (a column of weight tiles stays in L2 while the group's rows stream past). The gated
form keeps two accumulators over one load of x. The epilogue adds the bias, applies the
activation to the fp32 accumulator and, when the caller trains, also writes what the
backward needs *instead of* the pre-activation: the activation's derivative

    plain:  saved = act'(z)                       so  dz  = g * saved
    gated:  saved = act(zg), saved2 = zu·act'(zg)  so  dzu = g * saved, dzg = g * saved2

Saving the derivative costs the same memory as saving z, and it turns the backward's
activation into one multiply fused into the loads of both backward GEMMs (their prologue);
recomputing act'(z) there would run its transcendentals once per tile of the other
operand (K / BLOCK_K times per element), costing more than the tensor-core work.

Backward: ``_linear_bwd_input`` computes dX = dz W (tiles of dX, loop over N; the gated form
adds dzg Wg + dzu Wu in one accumulator); ``_linear_bwd_weight`` computes dW = dzᵀ X (tiles of
dW, loop over M; grid axis 1 picks the gate or the up weight), and its first column of
programs also sums dz over M for the bias gradient. No atomics: deterministic.

Numerics: fp32 accumulation; fp16/bf16 operands into tensor-core dots; float32 inputs take
tf32 dots only when PyTorch allows tf32 for matmuls (``torch.backends.cuda.matmul``), else
full-precision dots, so results follow the same rule as ``F.linear``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import autotuning
from .rounding import software_bf16, to_output

# Activation codes (the ``ACT`` constexpr); fuseformer.ops.linear maps names to them.
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "relu2": 5}

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    # exp of -|z| only: never overflows (tl.sigmoid's exp(-z) does for z < -88, which the
    # interpreter reports as a numpy overflow warning), exact in both tails.
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0, r, e * r)


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)) in fp32."""
    if ACT == 1:  # relu
        a = tl.maximum(z, 0.0)
        d = (z > 0).to(tl.float32)
    elif ACT == 2:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        a = z * cdf
        d = cdf + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == 3:  # gelu (tanh approximation); tanh(y) = 2 sigmoid(2y) - 1 (interpreter-safe)
        # (Tensors first in products with the constexpr constants: the interpreter would
        # wrap a tensor in a constexpr for `constant * tensor`.)
        t = 2.0 * _sigmoid((z + z * z * z * GELU_TANH_C) * SQRT_2_OVER_PI * 2.0) - 1.0
        a = 0.5 * z * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + z * z * GELU_TANH_C * 3.0)
    elif ACT == 4:  # silu
        s = _sigmoid(z)
        a = z * s
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 5:  # squared relu
        r = tl.maximum(z, 0.0)
        a = r * r
        d = 2.0 * r
    else:
        a = z
        d = tl.full(z.shape, 1.0, tl.float32)
    return a, d


@triton.jit
def _load(ptrs, ok, EVEN: tl.constexpr):
    """A tile of the loop's operand; EVEN: the loop length is a multiple of its block, so
    every tile is whole and the load needs no mask."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile rows at a time (L2 reuse)."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


# EVEN_LOOP: the loop dimension of each kernel (K forward, N for dX, M for dW) is a multiple of
# its block, so the loop's loads drop their masks. A heuristic: it follows each tile config.
@triton.heuristics({"EVEN_LOOP": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _linear_fwd(
    x_ptr, w_ptr, w2_ptr, b_ptr, b2_ptr, out_ptr, s_ptr, s2_ptr,
    M, N, K, M_CLASS,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_w2n, stride_w2k,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
    SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_LOOP: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge are clamped (wrapped) for the loads, so only K needs a mask
    # in the loop; the store masks them.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # a (K, N) tile of Wᵀ
    w2_ptrs = w2_ptr + cols[None, :] * stride_w2n + offs_k[:, None] * stride_w2k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = _load(x_ptrs, offs_k[None, :] < k_left, EVEN_LOOP)
        w = _load(w_ptrs, offs_k[:, None] < k_left, EVEN_LOOP)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            w2 = _load(w2_ptrs, offs_k[:, None] < k_left, EVEN_LOOP)
            acc2 = tl.dot(x, w2, acc2, input_precision=DOT_PRECISION)
            w2_ptrs += BLOCK_K * stride_w2k
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS2:
        acc2 += tl.load(b2_ptr + cols).to(tl.float32)[None, :]
    a, d = _act_and_grad(acc, ACT)
    if GATED:
        out = a * acc2
    else:
        out = a
    dtype = out_ptr.dtype.element_ty
    offs = offs_m[:, None] * N + offs_n[None, :]
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs, to_output(out, dtype, SOFTWARE_BF16), mask=ok)
    if SAVE:
        if GATED:
            tl.store(s_ptr + offs, to_output(a, dtype, SOFTWARE_BF16), mask=ok)
            tl.store(s2_ptr + offs, to_output(acc2 * d, dtype, SOFTWARE_BF16), mask=ok)
        else:
            tl.store(s_ptr + offs, to_output(d, dtype, SOFTWARE_BF16), mask=ok)


@triton.heuristics({"EVEN_LOOP": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def _linear_bwd_input(
    g_ptr, s_ptr, s2_ptr, w_ptr, w2_ptr, dx_ptr,
    M, N, K, M_CLASS,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_w2n, stride_w2k,
    ACT: tl.constexpr, GATED: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_LOOP: tl.constexpr,
):
    """dX (M, K) = dz (M, N) W (N, K); tiles of (BLOCK_M, BLOCK_K), the loop runs over N."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_k % K
    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
    s_ptrs = s_ptr + rows[:, None] * N + offs_n[None, :]
    s2_ptrs = s2_ptr + rows[:, None] * N + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + cols[None, :] * stride_wk
    w2_ptrs = w2_ptr + offs_n[:, None] * stride_w2n + cols[None, :] * stride_w2k
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dtype = w_ptr.dtype.element_ty
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = offs_n < N - n * BLOCK_N
        g = _load(g_ptrs, n_ok[None, :], EVEN_LOOP).to(tl.float32)
        w = _load(w_ptrs, n_ok[:, None], EVEN_LOOP)
        if GATED:
            up = _load(s_ptrs, n_ok[None, :], EVEN_LOOP).to(tl.float32)  # act(zg)
            gate = _load(s2_ptrs, n_ok[None, :], EVEN_LOOP).to(tl.float32)  # zu·act'(zg)
            w2 = _load(w2_ptrs, n_ok[:, None], EVEN_LOOP)
            acc = tl.dot((g * gate).to(dtype), w, acc, input_precision=DOT_PRECISION)
            acc = tl.dot((g * up).to(dtype), w2, acc, input_precision=DOT_PRECISION)
            w2_ptrs += BLOCK_N * stride_w2n
        else:
            if ACT != 0:
                g = g * _load(s_ptrs, n_ok[None, :], EVEN_LOOP).to(tl.float32)
            acc = tl.dot(g.to(dtype), w, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        s_ptrs += BLOCK_N
        s2_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
    offs = offs_m[:, None] * K + offs_k[None, :]
    ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx_ptr + offs, to_output(acc, dx_ptr.dtype.element_ty, SOFTWARE_BF16), mask=ok)


@triton.heuristics({"EVEN_LOOP": lambda a: a["M"] % a["BLOCK_M"] == 0})
@triton.jit
def _linear_bwd_weight(
    g_ptr, s_ptr, s2_ptr, x_ptr, dw_ptr, dw2_ptr, db_ptr, db2_ptr,
    M, N, K, M_CLASS,
    stride_gm, stride_gn, stride_xm, stride_xk,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_LOOP: tl.constexpr,
):
    """dW (N, K) = dzᵀ (N, M) X (M, K); tiles of (BLOCK_N, BLOCK_K), the loop runs over M.
    Gated: axis 1 is 0 for the gate weight (dzg = g * saved2), 1 for the up weight
    (dzu = g * saved). Programs of the first K tile also sum dz over M: the bias gradient."""
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    up = tl.program_id(1) == 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    rows = offs_n % N
    cols = offs_k % K
    # (BLOCK_N, BLOCK_M) tiles of gᵀ and of the saved factor, (BLOCK_M, BLOCK_K) tiles of X.
    g_ptrs = g_ptr + rows[:, None] * stride_gn + offs_m[None, :] * stride_gm
    factor_ptr = s_ptr
    if GATED:
        factor_ptr = tl.where(up, s_ptr, s2_ptr)
    f_ptrs = factor_ptr + rows[:, None] + offs_m[None, :] * N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dtype = x_ptr.dtype.element_ty
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        m_ok = offs_m < M - m * BLOCK_M
        dz = _load(g_ptrs, m_ok[None, :], EVEN_LOOP).to(tl.float32)
        if GATED or ACT != 0:
            dz = dz * _load(f_ptrs, m_ok[None, :], EVEN_LOOP).to(tl.float32)
        x = _load(x_ptrs, m_ok[:, None], EVEN_LOOP)
        acc = tl.dot(dz.to(dtype), x, acc, input_precision=DOT_PRECISION)
        bias_acc += tl.sum(dz, axis=1)
        g_ptrs += BLOCK_M * stride_gm
        f_ptrs += BLOCK_M * N
        x_ptrs += BLOCK_M * stride_xm
    offs = offs_n[:, None] * K + offs_k[None, :]
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    dw_out = dw_ptr
    if GATED:
        dw_out = tl.where(up, dw2_ptr, dw_ptr)
    tl.store(dw_out + offs, to_output(acc, dw_ptr.dtype.element_ty, SOFTWARE_BF16), mask=ok)
    if pid_k == 0:
        if GATED:
            if up:
                if HAS_BIAS2:
                    tl.store(db2_ptr + offs_n, bias_acc, mask=offs_n < N)
            elif HAS_BIAS:
                tl.store(db_ptr + offs_n, bias_acc, mask=offs_n < N)
        elif HAS_BIAS:
            tl.store(db_ptr + offs_n, bias_acc, mask=offs_n < N)


# ---- tiles ------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the first is the untuned default. The
# large tiles are the Hopper/Ampere GEMM schedules of Triton's matmul tutorial; small-M tiles
# keep the decode shapes (M = 1..64 tokens) from computing mostly padding.
_FWD_TILES = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 128, 64, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 64, 128, 4, 5),
]
# The gated forward holds two accumulators: no 256-wide tiles.
_GATED_FWD_TILES = [t for t in _FWD_TILES if max(t[0], t[1]) <= 128]
_BWD_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
]
# float32 with full-precision dots: FMA tiles, small enough for shared memory and to compile.
_FP32_TILE = (64, 64, 32, 4, 2)
_INTERPRETER_TILE = (32, 16, 16, 4, 1)  # asymmetric: the BLOCK_M != BLOCK_N paths run in CI
GROUP_M = 8
AUTOTUNE_KEY = ["M_CLASS", "N", "K", "ACT", "GATED", "DOT_PRECISION"]


def _autotune_enabled() -> bool:
    return os.environ.get("FUSEFORMER_TRITON_AUTOTUNE", "1") != "0"


def _m_class(m: int) -> int:
    """Token counts tuned alike: powers of two up to 4096, then one class (a new M per
    batch or sequence length must not re-tune). The kernels take it as an unused argument
    (M_CLASS) because triton.autotune keys on arguments."""
    return min(triton.next_power_of_2(m), 4096)


def _tile_list(kind: str, gated: bool) -> list[tuple[int, int, int, int, int]]:
    if kind == "fwd":
        return _GATED_FWD_TILES if gated else _FWD_TILES
    return _BWD_TILES


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, gated: bool):
    kernel = _KERNELS[kind]
    # The tile names differ per kernel: the forward tiles (M, N) with a K loop, the input
    # gradient (M, K) with an N loop, the weight gradient (N, K) with an M loop.
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in _tile_list(kind, gated)
    ]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY)(kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for fp16/bf16 operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(kind: str, grid_of, args: tuple, gated: bool, device: torch.device, dot_precision: str, **constexprs):
    kernel = _KERNELS[kind]
    if device.type != "cuda":
        m, n, k, w, s = _INTERPRETER_TILE
    elif dot_precision == "ieee":
        m, n, k, w, s = _FP32_TILE
    elif _autotune_enabled():
        autotuning.launch(_tuned(kind, gated), lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]),
                          args, dict(constexprs, DOT_PRECISION=dot_precision))
        return
    else:
        m, n, k, w, s = _tile_list(kind, gated)[0]
    kernel[grid_of(m, n, k)](
        *args, DOT_PRECISION=dot_precision, **constexprs,
        BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s,
    )


_KERNELS = {"fwd": _linear_fwd, "bwd_input": _linear_bwd_input, "bwd_weight": _linear_bwd_weight}


# ---- launchers ----------------------------------------------------------------------------


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_up: torch.Tensor | None,
    bias: torch.Tensor | None,
    bias_up: torch.Tensor | None,
    activation: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K) (any strides), M, N, K >= 1 (fuseformer.ops routes empty
    problems to PyTorch); gated when ``weight_up`` is given. Returns
    (out, saved, saved2): saved tensors (M, N) as in the module docstring, empty when not
    ``save`` (saved2 empty unless gated)."""
    m, k = x.shape
    n = weight.shape[0]
    gated = weight_up is not None
    act = ACTIVATIONS[activation]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    save_factor = save and (gated or act != 0)
    # Outputs never alias one another (custom-op rule): a fresh empty tensor for each absent one.
    saved = torch.empty_like(out) if save_factor else x.new_empty(0)
    saved2 = torch.empty_like(out) if save_factor and gated else x.new_empty(0)
    w2 = weight_up if gated else weight
    precision = _dot_precision(x.dtype)

    def grid(bm, bn, bk):
        return (triton.cdiv(m, bm) * triton.cdiv(n, bn),)

    args = (
        x, weight, w2, bias if bias is not None else x, bias_up if bias_up is not None else x,
        out, saved if save_factor else out, saved2 if save_factor and gated else out,
        m, n, k, _m_class(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), w2.stride(0), w2.stride(1),
    )
    _launch(
        "fwd", grid, args, gated, x.device, precision,
        ACT=act, GATED=gated, HAS_BIAS=bias is not None, HAS_BIAS2=bias_up is not None,
        SAVE=save_factor, SOFTWARE_BF16=software_bf16(), GROUP_M=GROUP_M,
    )
    return out, saved, saved2


def linear_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_up: torch.Tensor | None,
    saved: torch.Tensor,
    saved2: torch.Tensor,
    activation: str,
    has_bias: bool,
    has_bias_up: bool,
    needs_input_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """Returns (grad_x, grad_weight, grad_weight_up, grad_bias, grad_bias_up); grad_x empty
    unless needs_input_grad, the weight and bias gradients empty unless needs_weight_grad
    (and the bias gradients unless that bias exists). Bias gradients are float32."""
    m, k = x.shape
    n = weight.shape[0]
    gated = weight_up is not None
    act = ACTIVATIONS[activation]
    w2 = weight_up if gated else weight
    precision = _dot_precision(x.dtype)
    saved_arg = saved if saved.numel() else grad_out
    saved2_arg = saved2 if saved2.numel() else saved_arg
    common = dict(ACT=act, GATED=gated, SOFTWARE_BF16=software_bf16(), GROUP_M=GROUP_M)

    grad_x = x.new_empty(0)
    if needs_input_grad:
        grad_x = torch.empty((m, k), device=x.device, dtype=x.dtype)

        def grid_input(bm, bn, bk):
            return (triton.cdiv(m, bm) * triton.cdiv(k, bk),)

        args = (
            grad_out, saved_arg, saved2_arg, weight, w2, grad_x, m, n, k, _m_class(m),
            grad_out.stride(0), grad_out.stride(1),
            weight.stride(0), weight.stride(1), w2.stride(0), w2.stride(1),
        )
        _launch("bwd_input", grid_input, args, gated, x.device, precision, **common)

    grad_w, grad_w2, grad_b, grad_b2 = (x.new_empty(0) for _ in range(4))
    if needs_weight_grad:
        grad_w = torch.empty((n, k), device=x.device, dtype=weight.dtype)
        grad_w2 = torch.empty((n, k), device=x.device, dtype=w2.dtype) if gated else grad_w2
        f32 = dict(device=x.device, dtype=torch.float32)
        grad_b = torch.empty(n, **f32) if has_bias else grad_b
        grad_b2 = torch.empty(n, **f32) if has_bias_up else grad_b2

        def grid_weight(bm, bn, bk):
            return (triton.cdiv(n, bn) * triton.cdiv(k, bk), 2 if gated else 1)

        args = (
            grad_out, saved_arg, saved2_arg, x, grad_w, grad_w2 if gated else grad_w,
            grad_b if has_bias else grad_w, grad_b2 if has_bias_up else grad_w,
            m, n, k, _m_class(m),
            grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
        )
        _launch(
            "bwd_weight", grid_weight, args, gated, x.device, precision,
            HAS_BIAS=has_bias, HAS_BIAS2=has_bias_up, **common,
        )
    return grad_x, grad_w, grad_w2, grad_b, grad_b2
