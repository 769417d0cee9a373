"""Flash attention: softmax(scale * Q Kᵀ + bias) V without materialising the S×L matrix.

Forward (FlashAttention-2 schedule): one program per (query tile, batch·head). The query tile
stays in registers while key/value tiles stream past; the softmax is computed online in
base 2 (running row max and row sum, fp32 accumulator rescaled when the max grows), and
the log-sum-exp of each row is saved for the backward.

Backward: two kernels, no atomics, so the result is deterministic. ``_attn_bwd_dkdv`` keeps a
key/value tile and walks every query tile of every query head that shares it (GQA groups
are summed in registers); ``_attn_bwd_dq`` keeps a query tile and walks the key tiles.
Both recompute P from the saved log-sum-exp. ``delta = rowsum(dO * O)`` comes first.

Decode (flash-decoding): the few new queries of every head in a GQA group are packed into
the rows of one tile, and the cache is split into chunks over a second grid axis, so a
batch-1 decode still fills the GPU; a second kernel merges the chunks by their
log-sum-exps.

Scores and masking, shared by every kernel (``_scores``): s = scale·q·k, then
softcap·tanh(s/softcap), then ALiBi (-slope·|pos_q - pos_k|) and the additive or boolean
mask; keys outside [pos_q - left, pos_q + right] (window; causal is right = 0) or past the
sequence end are -inf. ``pos_q`` of query row i is i + offset, with offset 0 (upper-left
alignment, as SDPA's is_causal) or seqlen_k - seqlen_q (lower-right, the KV-cache case).
Rows with no visible key produce zeros and a log-sum-exp of -inf.

Dropout uses Philox counters (tl.rand) keyed by the seed and the element's (batch·head,
query, key) index, so the backward regenerates the forward's mask exactly.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import autotuning
from .rounding import software_bf16, to_output
from .mathfn import tanh as _tanh

LOG2E = 1.4426950408889634

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _scores(
    qk,
    pos_q,  # (BLOCK_M,) position of each query row in key coordinates
    offs_n,  # (BLOCK_N,) key index
    seqlen_k,
    scale,
    softcap,
    slope,  # scalar, or (BLOCK_M, 1) per row
    mask_ptrs,  # (BLOCK_M, BLOCK_N) pointers into the mask, when MASK_KIND != 0
    mask_ok,  # (BLOCK_M, BLOCK_N) in-bounds loads of the mask
    window_left,
    window_right,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr,
):
    """Scores in natural-log units, -inf where the key is not visible; and tanh(s/softcap)
    (the backward's softcap derivative), or s when there is no softcap. CHECK_BOUNDS=False:
    the caller knows every key of the tile exists and lies in every row's window (interior
    tiles), so only the user's mask can hide one."""
    s = qk * scale
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    if HAS_ALIBI:
        s = s - slope * tl.abs(pos_q[:, None] - offs_n[None, :]).to(tl.float32)
    if MASK_KIND == 2:
        s = s + tl.load(mask_ptrs, mask=mask_ok, other=0.0).to(tl.float32)
    if CHECK_BOUNDS:
        rel = pos_q[:, None] - offs_n[None, :]
        valid = offs_n[None, :] < seqlen_k
        if LIMIT_RIGHT:
            valid = valid & (rel >= -window_right)
        if LIMIT_LEFT:
            valid = valid & (rel <= window_left)
        if MASK_KIND == 1:
            valid = valid & (tl.load(mask_ptrs, mask=mask_ok, other=0) != 0)
        s = tl.where(valid, s, float("-inf"))
    else:
        if MASK_KIND == 1:
            s = tl.where(tl.load(mask_ptrs, mask=mask_ok, other=0) != 0, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, rows_per_head, cols_per_row, dropout_p):
    """Keep-mask of dropout for a (BLOCK_M, BLOCK_N) tile: one Philox draw per element,
    counter = (bh * rows_per_head + row) * cols_per_row + col."""
    counter = (bh.to(tl.int64) * rows_per_head + offs_m[:, None].to(tl.int64)) * cols_per_row + offs_n[None, :]
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _key_range(m_start, seqlen_k, offset, window_left, window_right, BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT):
    """Key tiles of a query tile [m_start, m_start + BLOCK_M): (lo, full_lo, full_hi, hi).
    [lo, hi) holds every key any row can see (lo a multiple of BLOCK_N); the tiles in
    [full_lo, full_hi) are interior (every key exists and every row sees it, apart from the
    user's mask), so they skip the bounds checks. The rest are edge tiles."""
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_end = seqlen_k
    if LIMIT_RIGHT:
        hi = tl.minimum(hi, m_start + BLOCK_M + offset + window_right)
        full_end = tl.minimum(full_end, tl.maximum(m_start + offset + window_right + 1, 0))
    if LIMIT_LEFT:
        lo = tl.maximum(0, m_start + offset - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
        first = tl.maximum(m_start + BLOCK_M - 1 + offset - window_left, 0)
        full_lo = ((first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum((full_end // BLOCK_N) * BLOCK_N, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(n_start, seqlen_q, seqlen_k, offset, window_left, window_right, BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT):
    """Query tiles that see the key tile [n_start, n_start + BLOCK_N): (lo, full_lo, full_hi,
    hi), as _key_range: interior query tiles see every key of the tile."""
    lo = 0
    hi = seqlen_q
    full_lo = 0
    full_hi = seqlen_q
    if LIMIT_RIGHT:
        lo = tl.maximum(0, n_start - offset - window_right)
        lo = (lo // BLOCK_M) * BLOCK_M
        first = tl.maximum(n_start + BLOCK_N - 1 - offset - window_right, 0)
        full_lo = ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if LIMIT_LEFT:
        hi = tl.minimum(hi, n_start + BLOCK_N - offset + window_left)
        full_hi = (tl.maximum(n_start - offset + window_left + 1, 0) // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    # A key tile that runs past the keys is an edge tile for every query tile. (Its missing
    # keys' columns of P only reach their own, unstored rows of dK and dV, but unchecked they
    # can overflow there.)
    full_lo = tl.where(n_start + BLOCK_N <= seqlen_k, full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _range_part(PART: tl.constexpr, lo, full_lo, full_hi, hi):
    """Part PART of a range from _key_range / _query_range, the order a program walks them:
    0 the interior tiles [full_lo, full_hi) (no bounds checks), 1 and 2 the edge tiles
    [lo, full_lo) and [full_hi, hi). Callers unroll over PART with tl.static_range(3)."""
    start = full_lo
    end = full_hi
    if PART == 1:
        start = lo
        end = full_lo
    if PART == 2:
        start = full_hi
        end = hi
    return start, end


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first row of the batch's queries, its query length, first key row, its key length)."""
    # Tensors, not Python ints: callers take .to(tl.int64) of them.
    q_row0 = tl.full([], 0, tl.int32)
    k_row0 = tl.full([], 0, tl.int32)
    if VARLEN:
        q_row0 = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_row0
        k_row0 = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_row0
    return q_row0, seqlen_q, k_row0, seqlen_k


@triton.jit
def _query_tile(CU_Q, CU_K, H, GROUPS, seqlen_q, seqlen_k, IS_LOWER_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
                LIMIT_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Where a query-tile program (forward, dQ) stands: (b, h, kv head, q_row0, seqlen_q,
    k_row0, seqlen_k, m_start, offset of the causal diagonal). The caller returns when
    m_start >= seqlen_q (a varlen batch shorter than the grid)."""
    m_block = tl.program_id(0)
    if LIMIT_RIGHT:
        # Causal: the last query tiles see the most keys; launch them first, so the
        # short ones fill the tail of the grid.
        m_block = tl.num_programs(0) - 1 - m_block
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_row0, seqlen_q, k_row0, seqlen_k = _seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, VARLEN)
    offset = 0
    if IS_LOWER_RIGHT:
        offset = seqlen_k - seqlen_q
    return b, h, h // GROUPS, q_row0, seqlen_q, k_row0, seqlen_k, m_block * BLOCK_M, offset


@triton.jit
def _row_tile_inputs(
    K, V, SLOPES, MASK, SEED, b, h, kvh, k_row0, offs_m, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, ss_b, sm_b, sm_h, sm_s,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """What a query-tile program (forward, dQ) reads besides its queries: the bases of its
    kv head's keys and values, its ALiBi slope, its rows of the mask, the dropout seed."""
    k_base = K + b.to(tl.int64) * sk_b + kvh * sk_h + k_row0.to(tl.int64) * sk_s
    v_base = V + b.to(tl.int64) * sv_b + kvh * sv_h + k_row0.to(tl.int64) * sv_s
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * ss_b + h).to(tl.float32)
    mask_base = MASK + b.to(tl.int64) * sm_b + h * sm_h + offs_m[:, None].to(tl.int64) * sm_s
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    return k_base, v_base, slope, mask_base, seed


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, q, k_base, v_base, start, end,
    offs_m, m_ok, pos_q, offs_d, d_ok, seqlen_k, sk_s, sv_s,
    scale, softcap, slope, mask_base, sm_l, window_left, window_right,
    seed, bh, rows_per_head, cols_per_row, dropout_p,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
):
    """The online softmax over key tiles [start, end) (one step of BLOCK_N each)."""
    for n_start in range(start, end, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        n_ok = cols < seqlen_k
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _t = _scores(
            qk, pos_q, cols, seqlen_k, scale, softcap, slope,
            mask_base + cols[None, :] * sm_l, m_ok[:, None] & n_ok[None, :],
            window_left, window_right,
            HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, LIMIT_LEFT, LIMIT_RIGHT, CHECK_BOUNDS,
        )
        s = s * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps max -inf; exponentiate around 0 then.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, cols, rows_per_head, cols_per_row, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, MASK, SLOPES, SEED, CU_Q, CU_K,
    sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s,
    sv_b, sv_h, sv_s,
    so_b, so_h, so_s,
    sl_b, sl_h,
    sm_b, sm_h, sm_s, sm_l,
    ss_b,
    H, GROUPS, seqlen_q, seqlen_k, head_dim,
    scale, softcap, window_left, window_right, dropout_p, rows_per_head, cols_per_row,
    IS_LOWER_RIGHT: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, h, kvh, q_row0, seqlen_q, k_row0, seqlen_k, m_start, offset = _query_tile(
        CU_Q, CU_K, H, GROUPS, seqlen_q, seqlen_k, IS_LOWER_RIGHT, VARLEN, LIMIT_RIGHT, BLOCK_M)
    if m_start >= seqlen_q:
        return
    bh = tl.program_id(1)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seqlen_q
    pos_q = offs_m + offset

    q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + (q_row0 + offs_m[:, None]).to(tl.int64) * sq_s + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base, v_base, slope, mask_base, seed = _row_tile_inputs(
        K, V, SLOPES, MASK, SEED, b, h, kvh, k_row0, offs_m, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, ss_b, sm_b, sm_h, sm_s,
        HAS_ALIBI, HAS_DROPOUT,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m_start, seqlen_k, offset, window_left, window_right, BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    # Interior tiles first (no bounds checks), then the edge tiles on either side.
    for part in tl.static_range(3):
        start, end = _range_part(part, lo, full_lo, full_hi, hi)
        acc, m_i, l_i = _fwd_tiles(
            acc, m_i, l_i, q, k_base, v_base, start, end, offs_m, m_ok, pos_q, offs_d, d_ok, seqlen_k, sk_s, sv_s,
            scale, softcap, slope, mask_base, sm_l, window_left, window_right, seed, bh, rows_per_head, cols_per_row, dropout_p,
            HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, LIMIT_LEFT, LIMIT_RIGHT, HAS_DROPOUT, DOT_PRECISION, BLOCK_N, part != 0,
        )

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + b.to(tl.int64) * so_b + h * so_h + (q_row0 + offs_m[:, None]).to(tl.int64) * so_s + offs_d[None, :]
    tl.store(o_ptrs, to_output(out, O.dtype.element_ty, SOFTWARE_BF16), mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(LSE + b.to(tl.int64) * sl_b + h * sl_h + q_row0 + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA,
    so_b, so_h, so_s,
    sdo_b, sdo_h, sdo_s,
    sl_b, sl_h,
    H, rows, head_dim,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SUM_F64: tl.constexpr,
):
    """delta = rowsum(dO * O), in the log-sum-exp's layout. Rows are the flat query rows of
    one head (varlen: every batch's rows, b = 0). SUM_F64 (float32 inputs): the products are
    summed in float64. delta's error e shifts every dS by -P e, which does not cancel where
    dQ does (a query between nearly tied keys): a float32 sum's rounding there made dQ's
    error 1.7x larger (a fuzzed case, test_attention.py). A half-precision O's own rounding
    is far larger than a float32 sum's."""
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < rows) & (offs_d[None, :] < head_dim)
    o = tl.load(O + b.to(tl.int64) * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_s + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdo_b + h * sdo_h + offs_m[:, None].to(tl.int64) * sdo_s + offs_d[None, :], mask=ok, other=0.0)
    if SUM_F64:
        delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1).to(tl.float32)
    else:
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b.to(tl.int64) * sl_b + h * sl_h + offs_m, delta, mask=offs_m < rows)


@triton.jit
def _recompute_p(
    q, k, cols, pos_q, lse, m_ok, n_ok, seqlen_k, scale, softcap, slope,
    mask_base, sm_l, window_left, window_right,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
):
    """P = exp(s - lse) for a (BLOCK_M, BLOCK_N) tile, and tanh(s/softcap)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s, t = _scores(
        qk, pos_q, cols, seqlen_k, scale, softcap, slope,
        mask_base + cols[None, :] * sm_l, m_ok[:, None] & n_ok[None, :],
        window_left, window_right,
        HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, LIMIT_LEFT, LIMIT_RIGHT, CHECK_BOUNDS,
    )
    # Rows with no visible key have lse -inf and s -inf everywhere: P = 0 there.
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.math.exp2((s - lse_safe[:, None]) * 1.4426950408889634)
    return p, t


@triton.jit
def _grad_scores(p, dp, delta, t, keep, dropout_p, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """dL/d(scale·q·k) from P, dP = dO·Vᵀ and delta, through dropout and the softcap."""
    if HAS_DROPOUT:
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, cols, n_ok, start, end,
    Q, DO, LSE, DELTA, MASK, b, h, bh, q_row0, offset, seqlen_q, seqlen_k, offs_d, d_ok,
    sq_b, sq_h, sq_s, sdo_b, sdo_h, sdo_s, sl_b, sl_h, sm_b, sm_h, sm_s, sm_l,
    scale, softcap, slope, window_left, window_right, seed, rows_per_head, cols_per_row, dropout_p,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
):
    """dK, dV of one key tile from the query tiles [start, end) of head h."""
    for m_start in range(start, end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        q_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b.to(tl.int64) * sq_b + h * sq_h + (q_row0 + offs_m[:, None]).to(tl.int64) * sq_s + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * sdo_b + h * sdo_h + (q_row0 + offs_m[:, None]).to(tl.int64) * sdo_s + offs_d[None, :], mask=q_ok, other=0.0)
        lse_ptrs = b.to(tl.int64) * sl_b + h * sl_h + q_row0 + offs_m
        lse = tl.load(LSE + lse_ptrs, mask=m_ok, other=float("-inf"))
        delta = tl.load(DELTA + lse_ptrs, mask=m_ok, other=0.0)
        mask_base = MASK + b.to(tl.int64) * sm_b + h * sm_h + offs_m[:, None].to(tl.int64) * sm_s
        p, t = _recompute_p(
            q, k, cols, offs_m + offset, lse, m_ok, n_ok, seqlen_k, scale, softcap, slope,
            mask_base, sm_l, window_left, window_right,
            HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, LIMIT_LEFT, LIMIT_RIGHT, DOT_PRECISION, CHECK_BOUNDS,
        )
        keep = p > 0.0
        p_used = p
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, cols, rows_per_head, cols_per_row, dropout_p)
            p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dv += tl.dot(tl.trans(p_used.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = _grad_scores(p, dp, delta, t, keep, dropout_p, HAS_SOFTCAP, HAS_DROPOUT)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, SLOPES, SEED, CU_Q, CU_K,
    sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s,
    sv_b, sv_h, sv_s,
    sdo_b, sdo_h, sdo_s,
    sdk_b, sdk_h, sdk_s,
    sdv_b, sdv_h, sdv_s,
    sl_b, sl_h,
    sm_b, sm_h, sm_s, sm_l,
    ss_b,
    H_KV, GROUPS, seqlen_q, seqlen_k, head_dim,
    scale, softcap, window_left, window_right, dropout_p, rows_per_head, cols_per_row,
    IS_LOWER_RIGHT: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    n_block = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    kvh = bhk % H_KV
    q_row0, seqlen_q, k_row0, seqlen_k = _seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, VARLEN)
    n_start = n_block * BLOCK_N
    if n_start >= seqlen_k:
        return
    offset = 0
    if IS_LOWER_RIGHT:
        offset = seqlen_k - seqlen_q

    cols = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    n_ok = cols < seqlen_k
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * sk_b + kvh * sk_h + (k_row0 + cols[:, None]).to(tl.int64) * sk_s + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * sv_b + kvh * sv_h + (k_row0 + cols[:, None]).to(tl.int64) * sv_s + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    lo, full_lo, full_hi, hi = _query_range(n_start, seqlen_q, seqlen_k, offset, window_left, window_right, BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    for g in range(0, GROUPS):
        h = kvh * GROUPS + g
        bh = b * (H_KV * GROUPS) + h
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + b * ss_b + h).to(tl.float32)
        for part in tl.static_range(3):
            start, end = _range_part(part, lo, full_lo, full_hi, hi)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, cols, n_ok, start, end,
                Q, DO, LSE, DELTA, MASK, b, h, bh, q_row0, offset, seqlen_q, seqlen_k, offs_d, d_ok,
                sq_b, sq_h, sq_s, sdo_b, sdo_h, sdo_s, sl_b, sl_h, sm_b, sm_h, sm_s, sm_l,
                scale, softcap, slope, window_left, window_right, seed, rows_per_head, cols_per_row, dropout_p,
                HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, LIMIT_LEFT, LIMIT_RIGHT, HAS_DROPOUT, DOT_PRECISION, BLOCK_M, part != 0,
            )

    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * sdk_b + kvh * sdk_h + (k_row0 + cols[:, None]).to(tl.int64) * sdk_s + offs_d[None, :], to_output(dk, DK.dtype.element_ty, SOFTWARE_BF16), mask=kv_ok)
    tl.store(DV + b.to(tl.int64) * sdv_b + kvh * sdv_h + (k_row0 + cols[:, None]).to(tl.int64) * sdv_s + offs_d[None, :], to_output(dv, DV.dtype.element_ty, SOFTWARE_BF16), mask=kv_ok)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, k_base, v_base, start, end,
    offs_m, m_ok, pos_q, offs_d, d_ok, seqlen_k, sk_s, sv_s,
    scale, softcap, slope, mask_base, sm_l, window_left, window_right,
    seed, bh, rows_per_head, cols_per_row, dropout_p,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
):
    """dQ of one query tile from the key tiles [start, end)."""
    for n_start in range(start, end, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        n_ok = cols < seqlen_k
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=kv_ok, other=0.0)
        p, t = _recompute_p(
            q, k, cols, pos_q, lse, m_ok, n_ok, seqlen_k, scale, softcap, slope,
            mask_base, sm_l, window_left, window_right,
            HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, LIMIT_LEFT, LIMIT_RIGHT, DOT_PRECISION, CHECK_BOUNDS,
        )
        keep = p > 0.0
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, cols, rows_per_head, cols_per_row, dropout_p)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = _grad_scores(p, dp, delta, t, keep, dropout_p, HAS_SOFTCAP, HAS_DROPOUT)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, SLOPES, SEED, CU_Q, CU_K,
    sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s,
    sv_b, sv_h, sv_s,
    sdo_b, sdo_h, sdo_s,
    sdq_b, sdq_h, sdq_s,
    sl_b, sl_h,
    sm_b, sm_h, sm_s, sm_l,
    ss_b,
    H, GROUPS, seqlen_q, seqlen_k, head_dim,
    scale, softcap, window_left, window_right, dropout_p, rows_per_head, cols_per_row,
    IS_LOWER_RIGHT: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    LIMIT_LEFT: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTWARE_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, h, kvh, q_row0, seqlen_q, k_row0, seqlen_k, m_start, offset = _query_tile(
        CU_Q, CU_K, H, GROUPS, seqlen_q, seqlen_k, IS_LOWER_RIGHT, VARLEN, LIMIT_RIGHT, BLOCK_M)
    if m_start >= seqlen_q:
        return
    bh = tl.program_id(1)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seqlen_q
    q_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * sq_b + h * sq_h + (q_row0 + offs_m[:, None]).to(tl.int64) * sq_s + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdo_b + h * sdo_h + (q_row0 + offs_m[:, None]).to(tl.int64) * sdo_s + offs_d[None, :], mask=q_ok, other=0.0)
    lse_ptrs = b.to(tl.int64) * sl_b + h * sl_h + q_row0 + offs_m
    lse = tl.load(LSE + lse_ptrs, mask=m_ok, other=float("-inf"))
    delta = tl.load(DELTA + lse_ptrs, mask=m_ok, other=0.0)
    k_base, v_base, slope, mask_base, seed = _row_tile_inputs(
        K, V, SLOPES, MASK, SEED, b, h, kvh, k_row0, offs_m, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, ss_b, sm_b, sm_h, sm_s,
        HAS_ALIBI, HAS_DROPOUT,
    )

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pos_q = offs_m + offset
    lo, full_lo, full_hi, hi = _key_range(m_start, seqlen_k, offset, window_left, window_right, BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    for part in tl.static_range(3):
        start, end = _range_part(part, lo, full_lo, full_hi, hi)
        dq = _dq_tiles(
            dq, q, do, lse, delta, k_base, v_base, start, end, offs_m, m_ok, pos_q, offs_d, d_ok, seqlen_k, sk_s, sv_s,
            scale, softcap, slope, mask_base, sm_l, window_left, window_right, seed, bh, rows_per_head, cols_per_row, dropout_p,
            HAS_SOFTCAP, HAS_ALIBI, MASK_KIND, LIMIT_LEFT, LIMIT_RIGHT, HAS_DROPOUT, DOT_PRECISION, BLOCK_N, part != 0,
        )

    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * sdq_b + h * sdq_h + (q_row0 + offs_m[:, None]).to(tl.int64) * sdq_s + offs_d[None, :], to_output(dq, DQ.dtype.element_ty, SOFTWARE_BF16), mask=q_ok)


@triton.jit
def _dropout_mask_kernel(KEEP, SEED, H, seqlen_q, seqlen_k, dropout_p, rows_per_head, cols_per_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the attention kernels draw, materialised (B, H, S, L) for tests."""
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(SEED)
    for n_start in range(0, seqlen_k, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, offs_m, cols, rows_per_head, cols_per_row, dropout_p)
        ptrs = KEEP + bh.to(tl.int64) * seqlen_q * seqlen_k + offs_m[:, None].to(tl.int64) * seqlen_k + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


@triton.jit
def _attn_decode_split(
    Q, K, V, PART_O, PART_LSE, SLOPES, SEQLENS_K,
    sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s,
    sv_b, sv_h, sv_s,
    ss_b,
    H_KV, GROUPS, n_q, head_dim, chunk, num_splits,
    scale, softcap, window_left, window_right,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    LIMIT_LEFT: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One chunk of the cache against every query of one GQA group. Row r of the tile is
    query token r // GROUPS of head kvh * GROUPS + r % GROUPS. Writes the chunk's normalized
    partial output and log-sum-exp (float32) for ``_attn_decode_combine``."""
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    kvh = bhk % H_KV
    seqlen_k = tl.load(SEQLENS_K + b)
    rows = tl.arange(0, BLOCK_M)
    token = rows // GROUPS
    h = kvh * GROUPS + rows % GROUPS
    r_ok = token < n_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b.to(tl.int64) * sq_b + h[:, None] * sq_h + token[:, None] * sq_s + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    pos_q = seqlen_k - n_q + token
    slope = tl.zeros([BLOCK_M, 1], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * ss_b + h, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    k_base = K + b.to(tl.int64) * sk_b + kvh * sk_h
    v_base = V + b.to(tl.int64) * sv_b + kvh * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seqlen_k)
    if LIMIT_LEFT:
        lo = tl.maximum(lo, ((seqlen_k - n_q - window_left) // BLOCK_N) * BLOCK_N)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        n_ok = cols < hi
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=kv_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _t = _scores(
            qk, pos_q, cols, hi, scale, softcap, slope, None, None, window_left, window_right,
            HAS_SOFTCAP, HAS_ALIBI, 0, LIMIT_LEFT, LIMIT_RIGHT, True,
        )
        s = s * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))  # base 2
    # Partial layout (B, H, n_q, num_splits, D) and (B, H, n_q, num_splits).
    part_row = ((b.to(tl.int64) * (H_KV * GROUPS) + h) * n_q + token) * num_splits + split
    tl.store(PART_O + part_row[:, None] * BLOCK_D + offs_d[None, :], out, mask=r_ok[:, None])
    tl.store(PART_LSE + part_row, lse, mask=r_ok)


@triton.jit
def _attn_decode_combine(
    PART_O, PART_LSE, O, LSE,
    so_b, so_h, so_s,
    H, n_q, head_dim, num_splits,
    SOFTWARE_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # (b, h, token) flattened
    token = row % n_q
    bh = row // n_q
    b = bh // H
    h = bh % H
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    lse = tl.load(PART_LSE + row.to(tl.int64) * num_splits + splits, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    part = tl.load(PART_O + (row.to(tl.int64) * num_splits + splits[:, None]) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b.to(tl.int64) * so_b + h * so_h + token * so_s + offs_d, to_output(out, O.dtype.element_ty, SOFTWARE_BF16), mask=offs_d < head_dim)
    lse_out = tl.where(total == 0.0, float("-inf"), (m_safe + tl.math.log2(tl.where(total == 0.0, 1.0, total))) / 1.4426950408889634)
    tl.store(LSE + row, lse_out)


# ---- launchers ----------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Autotuning (on a GPU, per head-dim class and masking mode): the candidate tiles come from
# the FlashAttention-2 Triton schedules for Ampere/Hopper. FUSEFORMER_TRITON_AUTOTUNE=0 (the
# test suite sets it: every new constexpr combination would tune again) uses the first one.
# The interpreter takes one asymmetric config, so BLOCK_M != BLOCK_N paths are tested on CPU.
AUTOTUNE_KEY = ["BLOCK_D", "LIMIT_LEFT", "LIMIT_RIGHT", "MASK_KIND", "HAS_DROPOUT", "HAS_SOFTCAP", "DOT_PRECISION"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first of each list is the untuned default.
_FWD_TILES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 4)],
    256: [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 64, 8, 3)],
}
# dK/dV: a key tile of BLOCK_N walks query tiles of BLOCK_M; dQ the other way round.
_DKDV_TILES = {
    64: [(32, 128, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3)],
    128: [(32, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3)],
    256: [(32, 64, 4, 2), (32, 32, 4, 1), (64, 64, 8, 1)],
}
_DQ_TILES = {
    64: [(128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
    128: [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
    256: [(64, 32, 4, 2), (32, 32, 4, 1), (64, 64, 8, 1)],
}
_INTERPRETER_TILES = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
# float32 inputs take full-precision (non-tensor-core) dots: large tiles need more shared
# memory than a GPU has (362 KB for dK/dV at 128x64, D 128) and minutes to compile, so they
# get small fixed tiles (compiled for sm_90 and sm_80 with benchmarks/compile_triton_aot.py).
_FP32_TILES = {
    "fwd": {64: (64, 32, 4, 1), 128: (64, 32, 4, 1), 256: (32, 32, 4, 1)},
    "dkdv": {64: (32, 64, 4, 1), 128: (32, 64, 4, 1), 256: (32, 32, 4, 1)},
    "dq": {64: (64, 32, 4, 1), 128: (64, 32, 4, 1), 256: (32, 32, 4, 1)},
}
_TILES = {"fwd": _FWD_TILES, "dkdv": _DKDV_TILES, "dq": _DQ_TILES}


def _autotune_enabled() -> bool:
    return os.environ.get("FUSEFORMER_TRITON_AUTOTUNE", "1") != "0"


def _d_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, d_class: int):
    kernel = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[kind]
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in _TILES[kind][d_class]
    ]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY)(kernel)


def _launch(kind: str, block_d: int, device: torch.device, grid_of, *args, **constexprs) -> None:
    """Run kernel ``kind`` with autotuned tiles on a GPU, else with the fixed tiles.
    ``grid_of(BLOCK_M, BLOCK_N)`` gives the grid."""
    kernel = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[kind]
    if device.type != "cuda":
        m, n, w, st = _INTERPRETER_TILES[kind]
    elif constexprs["DOT_PRECISION"] == "ieee":
        m, n, w, st = _FP32_TILES[kind][_d_class(block_d)]
    elif _autotune_enabled():
        autotuning.launch(_tuned(kind, _d_class(block_d)), lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"]),
                          args, constexprs)
        return
    else:
        m, n, w, st = _TILES[kind][_d_class(block_d)][0]
    kernel[grid_of(m, n)](*args, **constexprs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots (the reference rule is fp32 accuracy, not tf32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(t: torch.Tensor | None, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, S, D) tensor, or of a packed (total, H, D) one."""
    if t is None:
        return 0, 0, 0
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


class Problem:
    """Shapes and options common to the forward and backward launches."""

    def __init__(self, q, k, v, mask, slopes, seed, cu_q, cu_k, max_q, max_k, scale,
                 softcap, window, lower_right, dropout_p):
        self.varlen = cu_q is not None
        if self.varlen:
            self.batch = cu_q.numel() - 1
            self.heads, self.head_dim = q.shape[1], q.shape[2]
            self.kv_heads = k.shape[1]
            self.total_q = q.shape[0]
        else:
            self.batch, self.heads, _, self.head_dim = q.shape
            self.kv_heads = k.shape[1]
        self.seqlen_q, self.seqlen_k = max_q, max_k
        self.groups = self.heads // self.kv_heads
        self.q, self.k, self.v = q, k, v
        self.mask, self.slopes, self.seed = mask, slopes, seed
        self.cu_q, self.cu_k = cu_q, cu_k
        self.scale, self.softcap, self.dropout_p = scale, softcap, dropout_p
        left, right = window
        self.window_left, self.window_right = max(left, 0), max(right, 0)
        self.limit_left, self.limit_right = left >= 0, right >= 0
        self.lower_right = lower_right
        self.block_d = _block_d(self.head_dim)

    def lse_shape(self) -> tuple[int, ...]:
        if self.varlen:
            return (self.heads, self.total_q)
        return (self.batch, self.heads, self.seqlen_q)

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        if self.varlen:
            return 0, lse.stride(0)
        return lse.stride(0), lse.stride(1)

    def mask_args(self):
        if self.mask is None:
            return self.q, (0, 0, 0, 0), MASK_NONE
        kind = MASK_BOOL if self.mask.dtype == torch.bool else MASK_ADD
        return self.mask, tuple(self.mask.stride()), kind

    def common_args(self):
        """Pointer-free runtime scalars shared by the three main kernels, in kernel order."""
        return (
            self.seqlen_q, self.seqlen_k, self.head_dim,
            self.scale, self.softcap, self.window_left, self.window_right, self.dropout_p,
            self.seqlen_q, self.seqlen_k,  # rows_per_head, cols_per_row of the dropout counter
        )

    def constexprs(self, dtype: torch.dtype) -> dict:
        _mask, _strides, kind = self.mask_args()
        return dict(
            IS_LOWER_RIGHT=self.lower_right,
            VARLEN=self.varlen,
            HAS_SOFTCAP=self.softcap > 0,
            HAS_ALIBI=self.slopes is not None,
            MASK_KIND=kind,
            LIMIT_LEFT=self.limit_left,
            LIMIT_RIGHT=self.limit_right,
            HAS_DROPOUT=self.dropout_p > 0,
            DOT_PRECISION=_dot_precision(dtype),
            SOFTWARE_BF16=software_bf16(),
            BLOCK_D=self.block_d,
        )

    def pointer_extras(self):
        dummy = self.q
        return (
            self.slopes if self.slopes is not None else dummy,
            self.seed if self.seed is not None else dummy,
            self.cu_q if self.cu_q is not None else dummy,
            self.cu_k if self.cu_k is not None else dummy,
        )

    def slope_stride(self) -> int:
        return self.slopes.stride(0) if self.slopes is not None and self.slopes.dim() == 2 else 0


def attention_fwd(q, k, v, mask, slopes, seed, cu_q, cu_k, max_q, max_k, scale, softcap,
                  window, lower_right, dropout_p):
    """Launch the forward. Dense tensors are (B, H, S, D); varlen ones (total, H, D) with
    cu_q/cu_k int32 offsets. Returns (out like q, lse float32: (B, H, S) or (H, total_q))."""
    pb = Problem(q, k, v, mask, slopes, seed, cu_q, cu_k, max_q, max_k, scale, softcap,
                 window, lower_right, dropout_p)
    if pb.varlen:  # packed rows past the last offset belong to no sequence: zeros, lse -inf
        out = torch.zeros_like(q)
        lse = torch.full(pb.lse_shape(), float("-inf"), device=q.device, dtype=torch.float32)
    else:  # (B, H, S, D) in (B, S, H, D) memory, as the C++ CPU op (ops/attention.py)
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        lse = torch.empty(pb.lse_shape(), device=q.device, dtype=torch.float32)
    if out.numel() == 0 or pb.seqlen_q == 0:
        lse.fill_(float("-inf"))
        if out.numel():
            out.zero_()
        return out, lse
    mask_t, mask_strides, _kind = pb.mask_args()
    slopes_t, seed_t, cu_q_t, cu_k_t = pb.pointer_extras()
    _launch(
        "fwd", pb.block_d, q.device, lambda bm, bn: (triton.cdiv(pb.seqlen_q, bm), pb.batch * pb.heads),
        q, k, v, out, lse, mask_t, slopes_t, seed_t, cu_q_t, cu_k_t,
        *_strides3(q, pb.varlen), *_strides3(k, pb.varlen), *_strides3(v, pb.varlen),
        *_strides3(out, pb.varlen), *pb.lse_strides(lse), *mask_strides, pb.slope_stride(),
        pb.heads, pb.groups, *pb.common_args(),
        **pb.constexprs(q.dtype),
    )
    return out, lse


def attention_bwd(grad_out, grad_lse, q, k, v, out, lse, mask, slopes, seed, cu_q, cu_k, max_q, max_k,
                  scale, softcap, window, lower_right, dropout_p):
    """Launch the backward; returns (dq, dk, dv) shaped and typed like q, k, v. grad_lse (or
    None) is the gradient reaching the log-sum-exp: since d lse / d s = P, it enters as
    delta - grad_lse."""
    pb = Problem(q, k, v, mask, slopes, seed, cu_q, cu_k, max_q, max_k, scale, softcap,
                 window, lower_right, dropout_p)
    # Packed rows past the last offset belong to no sequence and are never written: zeros.
    alloc = torch.zeros_like if pb.varlen else torch.empty_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if pb.seqlen_q == 0 or pb.seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = torch.empty_like(lse)
    block_m = 64 if q.device.type == "cuda" else 32
    rows = pb.total_q if pb.varlen else pb.seqlen_q
    batch_for_rows = 1 if pb.varlen else pb.batch
    _attn_bwd_delta[(triton.cdiv(rows, block_m), batch_for_rows * pb.heads)](
        out, grad_out, delta, *_strides3(out, pb.varlen), *_strides3(grad_out, pb.varlen), *pb.lse_strides(lse),
        pb.heads, rows, pb.head_dim, BLOCK_D=pb.block_d, BLOCK_M=block_m, SUM_F64=out.dtype == torch.float32,
    )
    if grad_lse is not None:
        delta -= grad_lse
    mask_t, mask_strides, _kind = pb.mask_args()
    slopes_t, seed_t, cu_q_t, cu_k_t = pb.pointer_extras()
    consts = pb.constexprs(q.dtype)
    _launch(
        "dkdv", pb.block_d, q.device, lambda bm, bn: (triton.cdiv(pb.seqlen_k, bn), pb.batch * pb.kv_heads),
        q, k, v, grad_out, lse, delta, dk, dv, mask_t, slopes_t, seed_t, cu_q_t, cu_k_t,
        *_strides3(q, pb.varlen), *_strides3(k, pb.varlen), *_strides3(v, pb.varlen),
        *_strides3(grad_out, pb.varlen), *_strides3(dk, pb.varlen), *_strides3(dv, pb.varlen),
        *pb.lse_strides(lse), *mask_strides, pb.slope_stride(),
        pb.kv_heads, pb.groups, *pb.common_args(),
        **consts,
    )
    _launch(
        "dq", pb.block_d, q.device, lambda bm, bn: (triton.cdiv(pb.seqlen_q, bm), pb.batch * pb.heads),
        q, k, v, grad_out, lse, delta, dq, mask_t, slopes_t, seed_t, cu_q_t, cu_k_t,
        *_strides3(q, pb.varlen), *_strides3(k, pb.varlen), *_strides3(v, pb.varlen),
        *_strides3(grad_out, pb.varlen), *_strides3(dq, pb.varlen),
        *pb.lse_strides(lse), *mask_strides, pb.slope_stride(),
        pb.heads, pb.groups, *pb.common_args(),
        **consts,
    )
    return dq, dk, dv


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The (B, H, S, L) bool keep-mask that the dense kernels draw for ``seed``."""
    keep = torch.empty((batch, heads, seqlen_q, seqlen_k), device=seed.device, dtype=torch.int8)
    if keep.numel():
        block = 32
        _dropout_mask_kernel[(triton.cdiv(seqlen_q, block), batch * heads)](
            keep, seed, heads, seqlen_q, seqlen_k, dropout_p, seqlen_q, seqlen_k, BLOCK_M=block, BLOCK_N=block,
        )
    return keep.bool()


# The decode kernel's key tile: (head dims up to 128, past 128) on a GPU; the interpreter's.
_DECODE_GPU_BLOCK_N = (64, 32)
_INTERPRETER_DECODE_BLOCK_N = 32
_INTERPRETER_DECODE_PROGRAMS = 4


def _num_splits(batch_kv_heads: int, max_k: int, block_n: int, device: torch.device) -> int:
    """Chunks of the cache per (batch, kv head): enough programs for two waves of the SMs,
    never a chunk shorter than one tile."""
    programs = 2 * _sm_count(device.index or 0) if device.type == "cuda" else _INTERPRETER_DECODE_PROGRAMS
    splits = max(1, -(-programs // batch_kv_heads))
    return max(1, min(splits, -(-max_k // block_n), 128))


def attention_decode(q, k_cache, v_cache, seqlens_k, slopes, scale, softcap, window, num_splits=None):
    """Split-K attention of a few queries (B, H, n_q, D) against a cache (B, H_kv, L_max, D)
    whose batch b holds seqlens_k[b] valid keys (queries sit at the end: lower-right). Returns
    (out like q, lse float32 (B, H, n_q))."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, max_k = k_cache.shape[1], k_cache.shape[2]
    groups = heads // kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the op's fake
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    block_d = _block_d(head_dim)
    block_m = max(16, triton.next_power_of_2(n_q * groups))
    block_n = _DECODE_GPU_BLOCK_N[block_d > 128] if q.device.type == "cuda" else _INTERPRETER_DECODE_BLOCK_N
    splits = num_splits or _num_splits(batch * kv_heads, max_k, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(max_k, splits), block_n) * block_n
    splits = triton.cdiv(max_k, chunk) if max_k else 1
    part_o = torch.empty((batch, heads, n_q, splits, block_d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((batch, heads, n_q, splits), device=q.device, dtype=torch.float32)
    left, right = window
    _attn_decode_split[(splits, batch * kv_heads)](
        q, k_cache, v_cache, part_o, part_lse, slopes if slopes is not None else q, seqlens_k,
        *_strides3(q, False), *_strides3(k_cache, False), *_strides3(v_cache, False),
        slopes.stride(0) if slopes is not None and slopes.dim() == 2 else 0,
        kv_heads, groups, n_q, head_dim, chunk, splits,
        scale, softcap, max(left, 0), max(right, 0),
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=slopes is not None, LIMIT_LEFT=left >= 0, LIMIT_RIGHT=right >= 0,
        DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=2 if q.device.type == "cuda" else 1,
    )
    _attn_decode_combine[(batch * heads * n_q,)](
        part_o, part_lse, out, lse, *_strides3(out, False), heads, n_q, head_dim, splits,
        SOFTWARE_BF16=software_bf16(), BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )
    return out, lse
