"""One LSTM layer in one direction: the time loop of csrc/lstm.h with Triton step kernels.

Forward, one launch per step: ``_lstm_step_fwd`` is the recurrent GEMM with the LSTM cell as
its epilogue. A program owns (BLOCK_B rows, BLOCK_H hidden units) and keeps four fp32
accumulators, one per gate (rows q·H + j of W_hh for gate q), over one load of h_prev per
K-step: the gate pre-activations never leave registers, and the input projection (computed
for all steps by one GEMM before the loop) is added in the epilogue. h_prev is read where the
previous step wrote it (rows it had active; the rest from h0), never from a buffer this step
writes, so programs of one launch do not race.

Backward, per step: ``_lstm_cell_bwd`` (pointwise: dgates and the cell gradient), then the
recurrent GEMM dh_prev = dgates W_hh through torch (cuBLAS); the input and weight gradients
are one GEMM each after the loop. With a projection (proj_size), h_raw = o·tanh(c) is projected by a
GEMM after the cell.

Persistent forward, one launch per layer and direction (``_lstm_persistent_fwd``), for hidden
sizes up to PERSISTENT_MAX_HIDDEN without a projection: a program owns BLOCK_B rows and every
hidden unit, loads W_hh once before its time loop (four (H, H) tiles of W_hhᵀ kept on chip
across the steps) and carries h and c in registers; rows are independent across time, so no
program waits for another. That removes the per-step launches that bound small batches (two
kernel launches per step for cuDNN too) at the price of one SM per 16 rows.

Layout and conventions (batch_sizes, padded / packed rows, walking order) as csrc/lstm.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import _dot_precision, _sigmoid
from .rounding import software_bf16, to_output


@triton.jit
def _tanh(x):
    # (1 − e) / (1 + e) with e = exp(−2|x|) (libdevice's tanh fails in the interpreter); below
    # |x| = 1/8 the subtraction would cancel (the LSTM's small cells and hidden states need
    # relative accuracy), so there the odd Taylor series to x⁹ (truncation < 1e-10 relative).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    p = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(ax < 0.125, p, tl.where(x < 0, -t, t))


@triton.jit
def _load_prev(prev_ptr, first_ptr, rows, cols, stride, prev_rows, ok):
    """Row r of the previous state: from the previous step if it had row r, else the initial state."""
    from_prev = rows < prev_rows
    offs = rows[:, None] * stride + cols[None, :]
    a = tl.load(prev_ptr + offs, mask=ok & from_prev[:, None], other=0.0)
    b = tl.load(first_ptr + offs, mask=ok & (~from_prev)[:, None], other=0.0)
    return a + b


@triton.jit
def _lstm_step_fwd(
    xp_ptr, hprev_ptr, h0_ptr, w_ptr, cprev_ptr, c0_ptr,
    c_out_ptr, c_n_ptr, h_ptr, h2_ptr, g_ptr,
    n, prev_rows, H, P, sw_row, sw_col,
    SAVE: tl.constexpr, HAS_H2: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < n
    col_ok = cols < H
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < P
        h = _load_prev(hprev_ptr, h0_ptr, rows, kk, P, prev_rows, row_ok[:, None] & k_ok[None, :])
        h = h.to(w_ptr.dtype.element_ty)
        # W_hh rows q·H + j as a (BLOCK_K, BLOCK_H) tile of W_hhᵀ.
        w_offs = cols[None, :] * sw_row + kk[:, None] * sw_col
        w_ok = k_ok[:, None] & col_ok[None, :]
        acc_i = tl.dot(h, tl.load(w_ptr + w_offs, mask=w_ok, other=0.0), acc_i, input_precision=DOT_PRECISION)
        acc_f = tl.dot(h, tl.load(w_ptr + H * sw_row + w_offs, mask=w_ok, other=0.0), acc_f,
                       input_precision=DOT_PRECISION)
        acc_g = tl.dot(h, tl.load(w_ptr + 2 * H * sw_row + w_offs, mask=w_ok, other=0.0), acc_g,
                       input_precision=DOT_PRECISION)
        acc_o = tl.dot(h, tl.load(w_ptr + 3 * H * sw_row + w_offs, mask=w_ok, other=0.0), acc_o,
                       input_precision=DOT_PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    xp = xp_ptr + rows[:, None] * (4 * H) + cols[None, :]
    i = _sigmoid(acc_i + tl.load(xp, mask=ok, other=0.0).to(tl.float32))
    f = _sigmoid(acc_f + tl.load(xp + H, mask=ok, other=0.0).to(tl.float32))
    g = _tanh(acc_g + tl.load(xp + 2 * H, mask=ok, other=0.0).to(tl.float32))
    o = _sigmoid(acc_o + tl.load(xp + 3 * H, mask=ok, other=0.0).to(tl.float32))
    c = f * _load_prev(cprev_ptr, c0_ptr, rows, cols, H, prev_rows, ok) + i * g
    hv = to_output(o * _tanh(c), h_ptr.dtype.element_ty, SOFTWARE_BF16)
    offs = rows[:, None] * H + cols[None, :]
    tl.store(c_out_ptr + offs, c, mask=ok)
    tl.store(c_n_ptr + offs, c, mask=ok)
    tl.store(h_ptr + offs, hv, mask=ok)
    if HAS_H2:
        tl.store(h2_ptr + offs, hv, mask=ok)
    if SAVE:
        gp = g_ptr + rows[:, None] * (4 * H) + cols[None, :]
        tl.store(gp, i, mask=ok)
        tl.store(gp + H, f, mask=ok)
        tl.store(gp + 2 * H, g, mask=ok)
        tl.store(gp + 3 * H, o, mask=ok)


@triton.jit
def _lstm_persistent_fwd(
    xp_ptr, h0_ptr, c0_ptr, w_ptr, sizes_ptr, offsets_ptr,
    out_ptr, h_n_ptr, c_n_ptr, g_ptr, cells_ptr,
    BATCH, STEPS, H, sw_row, sw_col,
    REVERSE: tl.constexpr, SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    state_ok = (rows < BATCH)[:, None] & unit_ok[None, :]
    # W_hhᵀ of each gate, (k, j) = W_hh[q·H + j, k]: loaded once, kept across the steps.
    w_offs = units[None, :] * sw_row + units[:, None] * sw_col
    w_ok = unit_ok[:, None] & unit_ok[None, :]
    w_i = tl.load(w_ptr + w_offs, mask=w_ok, other=0.0)
    w_f = tl.load(w_ptr + H * sw_row + w_offs, mask=w_ok, other=0.0)
    w_g = tl.load(w_ptr + 2 * H * sw_row + w_offs, mask=w_ok, other=0.0)
    w_o = tl.load(w_ptr + 3 * H * sw_row + w_offs, mask=w_ok, other=0.0)
    state = rows[:, None] * H + units[None, :]
    h = tl.load(h0_ptr + state, mask=state_ok, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + state, mask=state_ok, other=0.0)
    for s in range(0, STEPS):
        t = STEPS - 1 - s if REVERSE else s
        n = tl.load(sizes_ptr + t)
        off = tl.load(offsets_ptr + t)
        active = rows < n
        ok = active[:, None] & unit_ok[None, :]
        hw = h.to(w_ptr.dtype.element_ty)
        xp = xp_ptr + (off + rows)[:, None] * (4 * H) + units[None, :]
        i = _sigmoid(tl.dot(hw, w_i, tl.load(xp, mask=ok, other=0.0).to(tl.float32), input_precision=DOT_PRECISION))
        f = _sigmoid(tl.dot(hw, w_f, tl.load(xp + H, mask=ok, other=0.0).to(tl.float32),
                            input_precision=DOT_PRECISION))
        g = _tanh(tl.dot(hw, w_g, tl.load(xp + 2 * H, mask=ok, other=0.0).to(tl.float32),
                         input_precision=DOT_PRECISION))
        o = _sigmoid(tl.dot(hw, w_o, tl.load(xp + 3 * H, mask=ok, other=0.0).to(tl.float32),
                            input_precision=DOT_PRECISION))
        c_new = f * c + i * g
        h_new = to_output(o * _tanh(c_new), out_ptr.dtype.element_ty, SOFTWARE_BF16)
        # Rows not active at this step keep their state: finished (forward) or not yet started
        # (reverse, still h0 / c0), as the active rows are a prefix.
        c = tl.where(ok, c_new, c)
        h = tl.where(ok, h_new.to(tl.float32), h)
        step_rows = (off + rows)[:, None]
        tl.store(out_ptr + step_rows * H + units[None, :], h_new, mask=ok)
        if SAVE:
            tl.store(cells_ptr + step_rows * H + units[None, :], c_new, mask=ok)
            gp = g_ptr + step_rows * (4 * H) + units[None, :]
            tl.store(gp, i, mask=ok)
            tl.store(gp + H, f, mask=ok)
            tl.store(gp + 2 * H, g, mask=ok)
            tl.store(gp + 3 * H, o, mask=ok)
    tl.store(h_n_ptr + state, h.to(h_n_ptr.dtype.element_ty), mask=state_ok)
    tl.store(c_n_ptr + state, c, mask=state_ok)


@triton.jit
def _lstm_cell_bwd(
    dha_ptr, dhb_ptr, dc_ptr, g_ptr, c_ptr, cprev_ptr, c0_ptr, dz_ptr, hraw_ptr,
    n, prev_rows, H,
    HAS_DHB: tl.constexpr, HAS_HRAW: tl.constexpr, SOFTWARE_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < n)[:, None] & (cols < H)[None, :]
    offs = rows[:, None] * H + cols[None, :]
    dh = tl.load(dha_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_DHB:
        dh += tl.load(dhb_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gp = g_ptr + rows[:, None] * (4 * H) + cols[None, :]
    i = tl.load(gp, mask=ok, other=0.0)
    f = tl.load(gp + H, mask=ok, other=0.0)
    g = tl.load(gp + 2 * H, mask=ok, other=0.0)
    o = tl.load(gp + 3 * H, mask=ok, other=0.0)
    tc = _tanh(tl.load(c_ptr + offs, mask=ok, other=0.0))
    cp = _load_prev(cprev_ptr, c0_ptr, rows, cols, H, prev_rows, ok)
    dc = tl.load(dc_ptr + offs, mask=ok, other=0.0) + dh * o * (1.0 - tc * tc)
    dtype = dz_ptr.dtype.element_ty
    dz = dz_ptr + rows[:, None] * (4 * H) + cols[None, :]
    tl.store(dz, to_output(dc * g * i * (1.0 - i), dtype, SOFTWARE_BF16), mask=ok)
    tl.store(dz + H, to_output(dc * cp * f * (1.0 - f), dtype, SOFTWARE_BF16), mask=ok)
    tl.store(dz + 2 * H, to_output(dc * i * (1.0 - g * g), dtype, SOFTWARE_BF16), mask=ok)
    tl.store(dz + 3 * H, to_output(dh * tc * o * (1.0 - o), dtype, SOFTWARE_BF16), mask=ok)
    tl.store(dc_ptr + offs, dc * f, mask=ok)
    if HAS_HRAW:
        tl.store(hraw_ptr + offs, to_output(o * tc, hraw_ptr.dtype.element_ty, SOFTWARE_BF16), mask=ok)


# (BLOCK_B, BLOCK_H, BLOCK_K, num_warps): the batch is small next to 4H, so tiles are short
# in rows; the interpreter takes the smallest tiles tl.dot allows.
_GPU_FWD_TILE = {True: (16, 64, 64, 4), False: (64, 64, 32, 4)}  # key: batch <= 16
_FP32_FWD_TILE = (16, 32, 32, 4)
_INTERPRETER_FWD_TILE = (16, 16, 16, 1)
_CELL_TILE = (16, 64)
_INTERPRETER_CELL_TILE = (16, 16)


def _steps(batch_sizes: torch.Tensor, padded: bool, batch: int, reverse: bool):
    """(walk order of time steps, active rows per step, first row per step), as csrc/lstm.h."""
    sizes = batch_sizes.tolist()
    offsets, rows = [], 0
    for s in sizes:
        offsets.append(rows)
        rows += batch if padded else s
    order = list(range(len(sizes)))
    return (order[::-1] if reverse else order), sizes, offsets, rows


def _previous(order, sizes, offsets, position):
    if position == 0:
        return 0, 0
    t = order[position - 1]
    return offsets[t], sizes[t]


# The persistent kernel keeps four (H, H) weight tiles in registers: up to 128 units (fp16:
# 128 KB per program over 8 warps; fp32 64 units). Batches up to 64: 16 rows per program.
PERSISTENT_MAX_HIDDEN = 128
PERSISTENT_MAX_BATCH = 64
_PERSISTENT_BLOCK_B = 16


def _persistent_applies(x_proj, hidden: int, batch: int, w_hr) -> bool:
    limit = PERSISTENT_MAX_HIDDEN if x_proj.dtype != torch.float32 else PERSISTENT_MAX_HIDDEN // 2
    return w_hr is None and 0 < hidden <= limit and 0 < batch <= PERSISTENT_MAX_BATCH


def _persistent_fwd(x_proj, h0, c0, w_hh, sizes, offsets, rows, padding: bool, reverse: bool, save: bool):
    batch, hidden = h0.shape[0], c0.shape[1]
    device, dtype = x_proj.device, x_proj.dtype
    f32 = dict(device=device, dtype=torch.float32)
    alloc = torch.zeros if padding else torch.empty
    out = alloc((rows, hidden), device=device, dtype=dtype)
    cells = alloc((rows, hidden), **f32) if save else torch.empty(0, **f32)
    gates = alloc((rows, 4 * hidden), **f32) if save else torch.empty(0, **f32)
    h_n, c_n = torch.empty_like(h0), torch.empty((batch, hidden), **f32)
    steps = torch.tensor([sizes, offsets], dtype=torch.int32).to(device)
    block_h = max(16, triton.next_power_of_2(hidden))
    grid = (triton.cdiv(batch, _PERSISTENT_BLOCK_B),)
    _lstm_persistent_fwd[grid](
        x_proj, h0, c0, w_hh, steps[0], steps[1], out, h_n, c_n, gates if save else out, cells if save else c_n,
        batch, len(sizes), hidden, w_hh.stride(0), w_hh.stride(1),
        REVERSE=reverse, SAVE=save, DOT_PRECISION=_dot_precision(dtype), SOFTWARE_BF16=software_bf16(),
        BLOCK_B=_PERSISTENT_BLOCK_B, BLOCK_H=block_h, num_warps=8 if block_h >= 128 else 4,
    )
    return out, h_n, c_n.to(dtype), gates, cells


def layer_fwd(x, w_ih, bias, batch_sizes, padded: bool, h0, c0, w_hh, w_hr, reverse: bool, save: bool):
    """out (rows, P), h_n, c_n, and when ``save`` the activated gates and the cells (float32)."""
    batch, hidden, proj = h0.shape[0], c0.shape[1], h0.shape[1]
    order, sizes, offsets, rows = _steps(batch_sizes, padded, batch, reverse)
    # The input projection of every step, one GEMM (cuBLAS).
    x_proj = torch.addmm(bias, x, w_ih.t()) if bias is not None else x @ w_ih.t()
    if _persistent_applies(x_proj, hidden, batch, w_hr):
        padding = padded and bool(sizes) and sizes[-1] < batch
        return _persistent_fwd(x_proj.contiguous(), h0.contiguous(), c0.float().contiguous(), w_hh, sizes, offsets,
                               rows, padding, reverse, save)
    h0 = h0.contiguous()
    c0 = c0.float().contiguous()
    f32 = dict(device=x_proj.device, dtype=torch.float32)
    padding = padded and bool(sizes) and sizes[-1] < batch
    out = (torch.zeros if padding else torch.empty)((rows, proj), device=x_proj.device, dtype=x_proj.dtype)
    h_n = torch.empty_like(h0)
    c_n = torch.empty((batch, hidden), **f32)
    # Padding rows of the saves are never written: zeros, so the outputs are deterministic.
    saves = torch.zeros if padding else torch.empty
    cells = saves((rows, hidden), **f32) if save else torch.empty((2, batch, hidden), **f32)
    gates = saves((rows, 4 * hidden), **f32) if save else torch.empty((0,), **f32)
    h_raw = torch.empty((batch, hidden), device=x_proj.device, dtype=x_proj.dtype) if w_hr is not None else None
    precision = _dot_precision(x_proj.dtype)
    if x_proj.device.type != "cuda":
        bb, bh, bk, warps = _INTERPRETER_FWD_TILE
    elif precision == "ieee":
        bb, bh, bk, warps = _FP32_FWD_TILE
    else:
        bb, bh, bk, warps = _GPU_FWD_TILE[batch <= 16]
    for position, t in enumerate(order):
        n, off = sizes[t], offsets[t]
        if n == 0:
            continue
        prev_off, prev_rows = _previous(order, sizes, offsets, position)
        if save:
            c_prev = cells[prev_off:] if prev_rows else c0
            c_out = cells[off:]
        else:
            c_prev, c_out = cells[(position + 1) % 2], cells[position % 2]
        h_dst = h_raw if w_hr is not None else out[off:]
        grid = (triton.cdiv(n, bb), triton.cdiv(hidden, bh))
        _lstm_step_fwd[grid](
            x_proj[off:], out[prev_off:] if prev_rows else h0, h0, w_hh, c_prev, c0,
            c_out, c_n, h_dst, h_n, gates[off:] if save else gates,
            n, prev_rows, hidden, proj, w_hh.stride(0), w_hh.stride(1),
            SAVE=save, HAS_H2=w_hr is None, DOT_PRECISION=precision, SOFTWARE_BF16=software_bf16(),
            BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, num_warps=warps,
        )
        if w_hr is not None:
            torch.mm(h_raw[:n], w_hr.t(), out=out[off:off + n])
            h_n[:n].copy_(out[off:off + n])
    if not order:
        h_n.copy_(h0)
        c_n.copy_(c0)
    if not save:
        cells = torch.empty(0, **f32)
    return out, h_n, c_n.to(x_proj.dtype), gates, cells


def layer_bwd(grad_out, grad_h_n, grad_c_n, x, w_ih, has_bias: bool, needs_input_grad: bool, batch_sizes,
              padded: bool, h0, c0, w_hh, w_hr, out, gates, cells, reverse: bool):
    """grad_x (empty unless needs_input_grad), grad_w_ih, grad_bias (empty unless has_bias),
    grad_h0, grad_c0, grad_w_hh, grad_w_hr (empty without a projection)."""
    batch, hidden, proj = h0.shape[0], c0.shape[1], h0.shape[1]
    order, sizes, offsets, rows = _steps(batch_sizes, padded, batch, reverse)
    dtype, device = out.dtype, out.device
    grad_out, h0 = grad_out.to(dtype).contiguous(), h0.contiguous()
    c0 = c0.float().contiguous()
    padding = padded and bool(sizes) and sizes[-1] < batch
    alloc = torch.zeros if padding else torch.empty
    dh_run = grad_h_n.to(dtype).contiguous().clone()
    dc_run = grad_c_n.float().contiguous().clone()
    dgates = alloc((rows, 4 * hidden), device=device, dtype=dtype)
    h_prev = alloc((rows, proj), device=device, dtype=dtype)
    if w_hr is not None:
        dh_all = alloc((rows, proj), device=device, dtype=dtype)
        h_raw_all = alloc((rows, hidden), device=device, dtype=dtype)
    bb, bh = _CELL_TILE if device.type == "cuda" else _INTERPRETER_CELL_TILE
    for position in range(len(order) - 1, -1, -1):
        t = order[position]
        n, off = sizes[t], offsets[t]
        if n == 0:
            continue
        prev_off, prev_rows = _previous(order, sizes, offsets, position)
        from_prev = min(n, prev_rows)
        h_prev[off:off + from_prev].copy_(out[prev_off:prev_off + from_prev])
        h_prev[off + from_prev:off + n].copy_(h0[from_prev:n])
        if w_hr is not None:
            dh = torch.add(dh_run[:n], grad_out[off:off + n], out=dh_all[off:off + n])
            dh_a, dh_b, h_raw = torch.mm(dh, w_hr), None, h_raw_all[off:]
        else:
            dh_a, dh_b, h_raw = dh_run, grad_out[off:], None
        grid = (triton.cdiv(n, bb), triton.cdiv(hidden, bh))
        _lstm_cell_bwd[grid](
            dh_a, dh_b if dh_b is not None else dh_a, dc_run, gates[off:], cells[off:],
            cells[prev_off:] if prev_rows else c0, c0, dgates[off:], h_raw if h_raw is not None else dh_a,
            n, prev_rows, hidden,
            HAS_DHB=dh_b is not None, HAS_HRAW=h_raw is not None, SOFTWARE_BF16=software_bf16(),
            BLOCK_B=bb, BLOCK_H=bh,
        )
        torch.mm(dgates[off:off + n], w_hh, out=dh_run[:n])
    grad_x = dgates @ w_ih if needs_input_grad else out.new_empty(0)
    grad_bias = dgates.sum(0, dtype=torch.float32).to(dtype) if has_bias else out.new_empty(0)
    grad_w_hh = dgates.t() @ h_prev
    grad_w_hr = dh_all.t() @ h_raw_all if w_hr is not None else out.new_empty(0)
    return grad_x, dgates.t() @ x, grad_bias, dh_run, dc_run.to(dtype), grad_w_hh, grad_w_hr
