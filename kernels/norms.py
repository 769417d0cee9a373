"""LayerNorm / RMSNorm over the last dimension, with an optional fused residual add.

Tiling: one program per row. Rows up to ``SINGLE_TILE_LIMIT`` elements are held in
registers as one tile, so each element is read once; longer rows are streamed in
``CHUNK``-wide tiles in three passes (sum, centered sum of squares, normalize), the later
passes re-reading the row from L2. Statistics are accumulated in float32 and the variance is
taken around the mean (two-pass), which avoids the cancellation of E[x^2] - E[x]^2. The
divisions by N round correctly (tl.fdiv ieee): the GPU's default approximate division can
make x / 1 differ from x, and a one-element row would then normalize to noise.

Backward: a grid of a few programs per SM; each walks a contiguous block of rows, keeps its
partial dweight/dbias in registers (or in its own row of the partial buffer for streamed
rows), and the partial rows are summed afterwards: no atomics, a deterministic result.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .rounding import software_bf16, to_output

SINGLE_TILE_LIMIT_FWD = 16384
SINGLE_TILE_LIMIT_BWD = 8192
CHUNK = 4096


@triton.jit
def _row_input(X, RES, RES_OUT, cols, mask, HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr,
               SOFTWARE_BF16: tl.constexpr):
    """The row's values at cols in float32: x, or x + residual rounded to the input dtype (the
    value normalized is the sum as x + residual would make it), stored to RES_OUT if STORE_SUM."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + cols, mask=mask, other=0.0).to(tl.float32)
        s = to_output(x + r, RES_OUT.dtype.element_ty, SOFTWARE_BF16)
        if STORE_SUM:
            tl.store(RES_OUT + cols, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _affine(y, W, B, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input, contiguous
    RES,  # (M, N) residual or a dummy pointer
    W,  # (N,) weight or dummy
    B,  # (N,) bias or dummy
    Y,  # (M, N) output
    RES_OUT,  # (M, N) x + residual, or dummy
    MEAN,  # (M,) float32, or dummy for RMSNorm
    RSTD,  # (M,) float32
    N,
    n_float,  # N as a float: Triton specializes N == 1 to a constant, which has no .to()
    eps,
    IS_RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    if HAS_RES:
        RES += row * N
        RES_OUT += row * N

    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = _row_input(X, RES, RES_OUT, cols, mask, HAS_RES, True, SOFTWARE_BF16)
        if IS_RMS:
            xc = x
        else:
            mean = tl.fdiv(tl.sum(x, axis=0), n_float, ieee_rounding=True)
            xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(tl.fdiv(tl.sum(xc * xc, axis=0), n_float, ieee_rounding=True) + eps)
        y = _affine(xc * rstd, W, B, cols, mask, HAS_W, HAS_B)
        tl.store(Y + cols, to_output(y, Y.dtype.element_ty, SOFTWARE_BF16), mask=mask)
    else:
        # Pass 1: the mean (and the residual sum, stored once).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            acc += _row_input(X, RES, RES_OUT, cols, mask, HAS_RES, True, SOFTWARE_BF16)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.fdiv(tl.sum(acc, axis=0), n_float, ieee_rounding=True)
        # Pass 2: the centered sum of squares. The residual sum is recomputed from its
        # inputs rather than read back from RES_OUT, whose writes other threads made.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = _row_input(X, RES, RES_OUT, cols, mask, HAS_RES, False, SOFTWARE_BF16)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = tl.math.rsqrt(tl.fdiv(tl.sum(acc, axis=0), n_float, ieee_rounding=True) + eps)
        # Pass 3: normalize.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = _row_input(X, RES, RES_OUT, cols, mask, HAS_RES, False, SOFTWARE_BF16)
            y = _affine((x - mean) * rstd, W, B, cols, mask, HAS_W, HAS_B)
            tl.store(Y + cols, to_output(y, Y.dtype.element_ty, SOFTWARE_BF16), mask=mask)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    DY,  # (M, N) gradient of the output
    DRES,  # (M, N) gradient of residual_out, or dummy
    X,  # (M, N) the tensor that was normalized
    W,  # (N,) weight or dummy
    MEAN,  # (M,) float32 or dummy
    RSTD,  # (M,) float32
    DX,  # (M, N) gradient of the input
    DW_PART,  # (programs, N) float32 partial dweight, or dummy
    DB_PART,  # (programs, N) float32 partial dbias, or dummy
    M,
    N,
    n_float,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program  # int64, so row * N cannot overflow
    part = pid * N

    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = row_start + i
            if row < M:
                offs = row * N
                x = tl.load(X + offs + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offs + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                if IS_RMS:
                    xhat = x * rstd
                else:
                    xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
                if HAS_W:
                    wdy = w * dy
                else:
                    wdy = dy
                dx = wdy - xhat * tl.fdiv(tl.sum(xhat * wdy, axis=0), n_float, ieee_rounding=True)
                if not IS_RMS:
                    dx -= tl.fdiv(tl.sum(wdy, axis=0), n_float, ieee_rounding=True)
                dx *= rstd
                if HAS_DRES:
                    dx += tl.load(DRES + offs + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + offs + cols, to_output(dx, DX.dtype.element_ty, SOFTWARE_BF16), mask=mask)
                dw_acc += dy * xhat
                db_acc += dy
        if HAS_W:
            tl.store(DW_PART + part + cols, dw_acc, mask=mask)
        if HAS_DB:
            tl.store(DB_PART + part + cols, db_acc, mask=mask)
    else:
        for i in range(0, rows_per_program):
            row = row_start + i
            if row < M:
                offs = row * N
                rstd = tl.load(RSTD + row)
                if IS_RMS:
                    mean = 0.0
                else:
                    mean = tl.load(MEAN + row)
                # Pass 1: the two row sums the input gradient needs.
                dot_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                sum_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = cols < N
                    x = tl.load(X + offs + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + offs + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                    if HAS_W:
                        dy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    dot_acc += xhat * dy
                    sum_acc += dy
                dot_mean = tl.fdiv(tl.sum(dot_acc, axis=0), n_float, ieee_rounding=True)
                if IS_RMS:
                    sum_mean = 0.0
                else:
                    sum_mean = tl.fdiv(tl.sum(sum_acc, axis=0), n_float, ieee_rounding=True)
                # Pass 2: the input gradient and this program's partial parameter gradients.
                for start in range(0, N, BLOCK_N):
                    cols = start + tl.arange(0, BLOCK_N)
                    mask = cols < N
                    x = tl.load(X + offs + cols, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + offs + cols, mask=mask, other=0.0).to(tl.float32)
                    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                    if HAS_W:
                        wdy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    else:
                        wdy = dy
                    dx = (wdy - xhat * dot_mean - sum_mean) * rstd
                    if HAS_DRES:
                        dx += tl.load(DRES + offs + cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(DX + offs + cols, to_output(dx, DX.dtype.element_ty, SOFTWARE_BF16), mask=mask)
                    if HAS_W:
                        dw = tl.load(DW_PART + part + cols, mask=mask, other=0.0)
                        tl.store(DW_PART + part + cols, dw + dy * xhat, mask=mask)
                    if HAS_DB:
                        db = tl.load(DB_PART + part + cols, mask=mask, other=0.0)
                        tl.store(DB_PART + part + cols, db + dy, mask=mask)


# ---- launchers ----------------------------------------------------------------------------


# Tuning from benchmarks/results/NVIDIA-H100-80GB-HBM3/sweep.md (LayerNorm, bf16, 16384 rows).


def _fwd_num_warps(block: int) -> int:
    # Best forward GB/s: 4 warps up to N=2048, 8 warps from 4096 (16 lost 10-60%).
    return min(8, max(4, block // 512))


def _bwd_num_warps(block: int) -> int:
    # 16 elements of the row per thread: the x, dy, w, dw and db tiles stay in registers
    # (fewer warps spill at N >= 4096 and drop to ~100 GB/s).
    return min(16, max(2, block // 512))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(device: torch.device, rows: int, block: int) -> int:
    if device.type == "cuda":
        # Programs per SM that measured best: 8 up to N=2048, 2 at 4096, 1 at 8192. More
        # programs mean more partial dweight rows to write and sum; fewer, less latency hidden.
        per_sm = 8 if block <= 2048 else max(1, 8192 // block)
        return max(1, min(rows, per_sm * _sm_count(device.index or 0)))
    return max(1, min(rows, 4))  # the interpreter: few programs, short runs


def _tile(n: int, single_tile_limit: int) -> tuple[int, bool]:
    block = triton.next_power_of_2(n)
    if block <= single_tile_limit:
        return block, True
    return CHUNK, False


def norm_fwd(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the C++ op ``fuseformer::norm_fwd`` (see csrc/registration.cpp).
    ``num_warps`` overrides the tuning heuristic (for sweeps)."""
    n = input.shape[-1]
    x = input.contiguous()
    stats_shape = input.shape[:-1]
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if residual is not None:
        residual = residual.contiguous()
        residual_out = torch.empty_like(out)
    else:
        residual_out = input.new_empty(0)
    mean = input.new_empty(0 if rms else stats_shape, dtype=torch.float32)
    rstd = input.new_empty(stats_shape, dtype=torch.float32)
    rows = x.numel() // n
    if rows == 0:
        return out, residual_out, mean, rstd
    block, single = _tile(n, SINGLE_TILE_LIMIT_FWD)
    dummy = out  # never dereferenced: the matching HAS_* flag is off
    _norm_fwd_kernel[(rows,)](
        x,
        residual if residual is not None else dummy,
        weight.contiguous() if weight is not None else dummy,
        bias.contiguous() if bias is not None else dummy,
        out,
        residual_out if residual is not None else dummy,
        mean if not rms else rstd,
        rstd,
        n,
        float(n),
        eps,
        IS_RMS=rms,
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK_N=block,
        SINGLE_TILE=single,
        SOFTWARE_BF16=software_bf16(),
        num_warps=num_warps or _fwd_num_warps(block),
    )
    return out, residual_out, mean, rstd


def norm_bwd(
    grad_out: torch.Tensor,
    grad_residual_out: torch.Tensor | None,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    has_bias: bool,
    num_warps: int | None = None,
    programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as the C++ op ``fuseformer::norm_bwd`` (see csrc/registration.cpp).
    ``num_warps`` and ``programs`` override the tuning heuristics (for sweeps)."""
    n = input.shape[-1]
    x = input.contiguous()
    dy = grad_out.to(input.dtype).contiguous()
    dres = grad_residual_out.to(input.dtype).contiguous() if grad_residual_out is not None else None
    rows = x.numel() // n
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    block, single = _tile(n, SINGLE_TILE_LIMIT_BWD)
    num_warps = num_warps or _bwd_num_warps(block)
    programs = min(max(1, rows), programs) if programs else _bwd_programs(input.device, rows, block)
    # Streamed rows accumulate into their partial row, so it starts at zero.
    alloc = torch.empty if single else torch.zeros
    dw_part = alloc((programs, n), dtype=torch.float32, device=input.device) if weight is not None else None
    db_part = alloc((programs, n), dtype=torch.float32, device=input.device) if has_bias else None
    if rows > 0:
        dummy = grad_input
        _norm_bwd_kernel[(programs,)](
            dy,
            dres if dres is not None else dummy,
            x,
            weight.contiguous() if weight is not None else dummy,
            mean if not rms else rstd,
            rstd,
            grad_input,
            dw_part if dw_part is not None else rstd,
            db_part if db_part is not None else rstd,
            rows,
            n,
            float(n),
            triton.cdiv(rows, programs),
            IS_RMS=rms,
            HAS_DRES=dres is not None,
            HAS_W=weight is not None,
            HAS_DB=has_bias,
            BLOCK_N=block,
            SINGLE_TILE=single,
            SOFTWARE_BF16=software_bf16(),
            num_warps=num_warps,
        )
    elif dw_part is not None or db_part is not None:
        dw_part = dw_part.zero_() if dw_part is not None else None
        db_part = db_part.zero_() if db_part is not None else None
    grad_weight = dw_part.sum(0) if dw_part is not None else input.new_empty(0)
    grad_bias = db_part.sum(0) if db_part is not None else input.new_empty(0)
    return grad_input, grad_weight, grad_bias
