"""Attention: softmax(scale · Q Kᵀ + bias) V, dense, packed variable-length, and KV-cache decode.

Public functions:
  attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False, *, window=None, softcap=None, alibi_slopes=None,
            causal_variant="upper_left", return_lse=False)
      The semantics of ``F.scaled_dot_product_attention`` on (B, H, S, D) tensors, plus
      sliding windows, logit soft-capping, ALiBi and the log-sum-exp.
  attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
      Packed (total, H, D) sequences of different lengths, no padding.
  attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, ...)
      Decode: a few new queries against a (B, H_kv, L_max, D) cache; k_new/v_new are
      written into the cache in place first.

Masking, in key positions j for query row i at position pos(i) = i + offset:
  offset = 0 ("upper_left", SDPA's is_causal) or L - S ("lower_right", the KV-cache case);
  is_causal keeps j <= pos(i); window=(left, right) keeps pos(i) - left <= j <= pos(i) + right
  (-1: unbounded on that side); a boolean attn_mask keeps True, a float one is added; ALiBi
  adds -slope[h] · |pos(i) - j|; softcap replaces s by softcap · tanh(s / softcap) before the
  bias. A query row that sees no key at all returns zeros (and log-sum-exp -inf), never NaN.

Backends: "triton" (flash-attention-2 kernels, kernels/attention.py; head dims 16-256; fp16,
bf16, fp32), "cpu" (C++ flash kernels, csrc/cpu/attention.cpp; float32 inside, any head dim;
dropout there runs on the math path) and "torch" (the math path below, the tests'
reference, float64 too; it calls PyTorch's SDPA when the call needs none of the
extensions). The KV-cache decode is its own op family ("attention_decode") for defaults.

Dropout: the Triton kernels draw Philox numbers keyed by a seed drawn from torch's default
generator on every call, so ``torch.manual_seed`` makes a call reproducible and the backward
reuses the forward's mask. The "torch" backend uses torch's own dropout (another stream).

The backward is deterministic: no atomics (kernels/attention.py). Gradients flow to q, k, v
(and through the log-sum-exp when it is returned); a float attn_mask that requires grad
runs on the "torch" backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fuseformer import _extension, backends
from fuseformer.ops import _checks

Tensor = torch.Tensor

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # the Triton kernels' range (any size in it)
CAUSAL_VARIANTS = ("upper_left", "lower_right")


# ---- the Triton backend as custom ops ---------------------------------------------------


@torch.library.custom_op("fuseformer::triton_attention_fwd", mutates_args=())
def _triton_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    seed: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    lower_right: bool,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    from fuseformer.kernels import attention as kernels

    return kernels.attention_fwd(
        q, k, v, mask, alibi_slopes, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, softcap, (window_left, window_right), lower_right, dropout_p,
    )


@torch.library.custom_op("fuseformer::triton_attention_bwd", mutates_args=())
def _triton_attention_bwd(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    seed: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    lower_right: bool,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from fuseformer.kernels import attention as kernels

    return kernels.attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, mask, alibi_slopes, seed, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, scale, softcap, (window_left, window_right), lower_right, dropout_p,
    )


@torch.library.custom_op("fuseformer::triton_attention_decode", mutates_args=())
def _triton_attention_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    alibi_slopes: Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    from fuseformer.kernels import attention as kernels

    return kernels.attention_decode(
        q, k_cache, v_cache, seqlens_k, alibi_slopes, scale, softcap, (window_left, window_right), num_splits or None
    )


def _lse_shape(q: Tensor, cu_seqlens_q: Tensor | None, max_seqlen_q: int) -> tuple[int, ...]:
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])  # (H, total_q)
    return (q.shape[0], q.shape[1], q.shape[2])


@torch.library.register_fake("fuseformer::triton_attention_fwd")
def _(q, k, v, mask, alibi_slopes, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *_args):
    out = torch.empty_like(q) if cu_seqlens_q is not None else _heads_interleaved(q)
    return out, q.new_empty(_lse_shape(q, cu_seqlens_q, max_seqlen_q), dtype=torch.float32)


@torch.library.register_fake("fuseformer::triton_attention_bwd")
def _(grad_out, grad_lse, q, k, v, *_args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("fuseformer::triton_attention_decode")
def _decode_fake(q, k_cache, v_cache, seqlens_k, *_args):
    """Both decode ops (Triton and C++ CUDA): out contiguous like q, lse float32 (B, H, n)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, mask, slopes, seed, cu_q, cu_k, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, slopes, seed, cu_q, cu_k)
    ctx.options = options
    ctx.set_materialize_grads(False)  # an unused lse: no zero-filled gradient, no work for it


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, slopes, seed, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:  # only the lse was used downstream
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _triton_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, mask, slopes, seed, cu_q, cu_k, *ctx.options
    )
    return dq, dk, dv, *([None] * 13)


torch.library.register_autograd(
    "fuseformer::triton_attention_fwd", _attention_backward, setup_context=_attention_setup_context
)


# ---- the C++ CPU backend (csrc/cpu/attention.cpp): float32 kernels ------------------------


def _heads_interleaved(q: Tensor) -> Tensor:
    """An empty (B, H, S, D) tensor in (B, S, H, D) memory: the forward kernels' output layout
    (as SDPA's flash kernels), so that the transpose(1, 2).contiguous() before an output
    projection is free."""
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


def _cpp_fwd_fake(q, k, v, mask, alibi_slopes, seqlens_k, *_args):
    return _heads_interleaved(q), q.new_empty(q.shape[:3])


def _cpp_bwd_fake(grad_out, grad_lse, q, k, v, *_args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


if _extension.loaded():
    torch.library.register_fake("fuseformer::attention_decode")(_decode_fake)
    torch.library.register_fake("fuseformer::attention_fwd")(_cpp_fwd_fake)
    torch.library.register_fake("fuseformer::attention_bwd")(_cpp_bwd_fake)
    # The C++ op's autograd is registered in C++ (csrc/autograd/attention.cpp).


def _additive_mask(attn_mask: Tensor | None, shape) -> Tensor | None:
    """A user mask as the float32 additive (B, H, S, L) view the C++ kernels take; bool masks
    are converted before they are broadcast, so no (B, H, S, L) copy is made."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.float().expand(shape)


def _cpp_attention(q, k, v, attn_mask, scale, window, softcap, slopes, lower_right, seqlens_k=None):
    """The "cpu" backend on (B, H, S, D) tensors: float32 in the kernels (half inputs are
    upcast), the output in q's dtype."""
    dtype = q.dtype
    q32, k32, v32 = (_last_dim_contiguous(t.float()) for t in (q, k, v))
    mask = _additive_mask(attn_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    out, lse = torch.ops.fuseformer.attention_fwd.default(
        q32, k32, v32, mask, slopes, seqlens_k, scale, softcap, window[0], window[1], lower_right
    )
    return out.to(dtype), lse


# ---- the reference math path -------------------------------------------------------------


def _visible_keys(seqlen_q, seqlen_k, offset, left, right, device):
    """(S, L) bool: keys inside the window (causal is right = 0), or None if unbounded."""
    if left < 0 and right < 0:
        return None
    pos = torch.arange(seqlen_q, device=device)[:, None] + offset
    rel = pos - torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= rel >= -right
    if left >= 0:
        visible &= rel <= left
    return visible


def safe_softmax(scores: Tensor) -> Tensor:
    """softmax over the last dim, with rows that are all -inf (no visible key) giving zeros
    instead of NaN."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom == 0, torch.ones_like(denom), denom)


def math_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    lower_right: bool = False,
    dropout_p: float = 0.0,
    dropout_keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The math path in the inputs' dtype (float64 inputs give the reference): dense
    (B, H, S, D) tensors with H a multiple of k's heads. Returns (out, lse float32/64).
    ``dropout_keep`` (B, H, S, L bool) replaces torch's dropout draw, for tests."""
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    offset = seqlen_k - seqlen_q if lower_right else 0
    if alibi_slopes is not None:
        pos = torch.arange(seqlen_q, device=q.device)[:, None] + offset
        dist = (pos - torch.arange(seqlen_k, device=q.device)[None, :]).abs().to(scores.dtype)
        slopes = alibi_slopes.to(scores.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        scores = scores - slopes * dist
    visible = _visible_keys(seqlen_q, seqlen_k, offset, *window, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = attn_mask if visible is None else attn_mask & visible
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    # Safe softmax: rows with no visible key are all -inf and give zeros, not NaN.
    probs = safe_softmax(scores)
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs.to(v.dtype), v), lse


# Below this many scores per head (S x L) the C++ CPU kernels lose to SDPA, causal or not
# (measured at B x H = 4 and 32, D = 64: S = L = 64 0.71-0.92x, 96 0.95-1.19x, 128 1.04-1.29x
# forward and forward+backward; benchmarks/NOTES.md). Where the tile GEMMs are MKL's (Intel
# CPUs: backends.cpu_gemm_library() == "aten"), SDPA's are too and the crossover is later:
# causal S = L = 128 0.67-0.77x forward, 256 0.96-0.98x, 384 1.13-1.15x (forward+backward
# 0.76-0.90x, 1.02-1.14x, 1.23-1.27x); non-causal calls lose at every length measured there
# (0.74-0.97x forward up to 512, 0.84-0.92x at 1024-2048), so they stay on SDPA.
CPU_SDPA_BELOW_SCORES = {"onednn": 128 * 128, "aten": 384 * 384}


def _sdpa_can_run(mask, slopes, softcap, window, lower_right, need_lse, seqlen_q, seqlen_k) -> bool:
    """Whether F.scaled_dot_product_attention computes this call: no extension, and at most
    a causal mask SDPA can express (upper-left, or lower-right with S == L)."""
    plain = mask is None and slopes is None and softcap == 0 and window[0] < 0 and not need_lse
    causal_only = window[1] == 0 and (not lower_right or seqlen_q == seqlen_k)
    return plain and (window[1] < 0 or causal_only)


def _torch_attention(q, k, v, mask, scale, window, softcap, slopes, lower_right, dropout_p, need_lse):
    """The "torch" backend: SDPA when the call needs nothing SDPA lacks, else the math path."""
    sdpa = _sdpa_can_run(mask, slopes, softcap, window, lower_right, need_lse, q.shape[-2], k.shape[-2])
    if sdpa and q.dtype != torch.float64:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=window[1] == 0, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out, None
    return math_attention(
        q, k, v, mask, scale=scale, window=window, softcap=softcap, alibi_slopes=slopes,
        lower_right=lower_right, dropout_p=dropout_p,
    )


# ---- argument checks ----------------------------------------------------------------------


def _check_qkv(op, q, k, v, rank, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(t, name, op)
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")
    _checks.float_dtype(q, "q", op, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: q, k and v must share a dtype; q is {q.dtype}, {name} is {t.dtype}")
        _checks.same_device(t, name, q, op, "q")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: q and k must have the same head dim; got {q.shape[-1]} and {k.shape[-1]}")


def _check_heads(op, q_heads, k_heads, v_heads, enable_gqa):
    if k_heads != v_heads:
        raise ValueError(f"{op}: k and v must have the same number of heads; got {k_heads} and {v_heads}")
    if q_heads != k_heads:
        if not enable_gqa:
            raise ValueError(
                f"{op}: q has {q_heads} heads but k/v have {k_heads}; pass enable_gqa=True for "
                "grouped-query attention"
            )
        if k_heads == 0 or q_heads % k_heads:
            raise ValueError(
                f"{op}: grouped-query attention needs q's heads ({q_heads}) to be a multiple of "
                f"k/v's heads ({k_heads})"
            )


def _check_options(op, q, heads, batch, dropout_p, scale, window, softcap, alibi_slopes, causal_variant):
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")
    if window is None:
        window = (-1, -1)
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and w >= -1 for w in window)
    ):
        raise ValueError(
            f"{op}: window must be a pair of ints (left, right), each >= 0 or -1 for unbounded; got {window!r}"
        )
    if softcap is None:
        softcap = 0.0
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{op}: softcap must be a positive float or None, got {softcap!r}")
    if alibi_slopes is not None:
        _checks.tensor(alibi_slopes, "alibi_slopes", op)
        _checks.same_device(alibi_slopes, "alibi_slopes", q, op, "q")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"{op}: alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(
                f"{op}: alibi_slopes must have shape ({heads},) or ({batch}, {heads}) (heads of q), "
                f"got {list(alibi_slopes.shape)}"
            )
        alibi_slopes = alibi_slopes.contiguous()
    if causal_variant not in CAUSAL_VARIANTS:
        raise ValueError(f"{op}: causal_variant must be one of {CAUSAL_VARIANTS}, got {causal_variant!r}")
    return float(dropout_p), float(scale), (int(window[0]), int(window[1])), float(softcap), alibi_slopes


def _causal_window(is_causal: bool, window: tuple[int, int]) -> tuple[int, int]:
    left, right = window
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _broadcast_mask(op, attn_mask, q, batch, heads, seqlen_q, seqlen_k):
    """attn_mask expanded (without copying) to (B, H, S, L)."""
    _checks.tensor(attn_mask, "attn_mask", op)
    _checks.same_device(attn_mask, "attn_mask", q, op, "q")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
        raise TypeError(
            f"{op}: attn_mask must be bool (True = attend) or a float mask of q's dtype ({q.dtype}) "
            f"or float32 (added to the scores), got {attn_mask.dtype}"
        )
    try:
        return attn_mask.expand(batch, heads, seqlen_q, seqlen_k)
    except RuntimeError:
        raise ValueError(
            f"{op}: attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
            f"(batch, heads, seqlen_q, seqlen_k) = {[batch, heads, seqlen_q, seqlen_k]}"
        ) from None


def _kernel_backend(family, q, op, head_dim_v, mask_needs_grad, dropout_p=0.0):
    """The backend for a call, with what a kernel backend cannot take (float64, head dims,
    mask gradients; dropout on the C++ CPU kernels) routed to "torch", or an error when a
    kernel backend was forced."""
    backend = backends.resolve(family, q.device)
    if backend == "torch":
        return backend
    forced = backends.forced_backend() is not None
    reason = None
    if q.dtype == torch.float64:
        reason = "takes float32, float16 or bfloat16 input, not float64"
    elif backend == "triton" and not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        reason = f"takes head dims {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    elif head_dim_v != q.shape[-1]:
        reason = f"needs v's head dim ({head_dim_v}) to equal q's ({q.shape[-1]})"
    elif mask_needs_grad:
        reason = "computes no gradient for attn_mask, which requires grad"
    elif backend == "cpu" and dropout_p > 0:
        # The issue allows it: dropout on the CPU runs in plain PyTorch.
        return "torch"
    if reason is None:
        return backend
    if forced:
        raise ValueError(f'{op}: the {backend!r} backend {reason}; use fuseformer.use_backend("torch")')
    return "torch"


def _draw_seed(device: torch.device) -> Tensor:
    """The Philox seed of one dropout call, drawn from torch's default generator (CPU), so
    torch.manual_seed reproduces it; a tensor, so torch.compile traces it without a sync."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- public API ---------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    causal_variant: str = "upper_left",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention on (B, H, S, D) tensors, as F.scaled_dot_product_attention.

    attn_mask broadcasts to (B, H, S, L): bool (True = attend) or float (added). is_causal and
    attn_mask may be combined. Extensions: window=(left, right), softcap, alibi_slopes ((H,) or
    (B, H) float32), causal_variant ("upper_left" as SDPA, or "lower_right" as
    FlashAttention), return_lse (also return the float32 (B, H, S) log-sum-exp).
    """
    op = "fuseformer.ops.attention"
    _check_qkv(op, q, k, v, 4, "(batch, heads, seq, head_dim)")
    batch, heads, seqlen_q, _ = q.shape
    if k.shape[0] != batch or v.shape[0] != batch or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"{op}: q, k, v must be (B, H, S, D), (B, H_kv, L, D), (B, H_kv, L, D_v) with one B and L; "
            f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    _check_heads(op, heads, k.shape[1], v.shape[1], enable_gqa)
    seqlen_k = k.shape[2]
    dropout_p, scale, window, softcap, alibi_slopes = _check_options(
        op, q, heads, batch, dropout_p, scale, window, softcap, alibi_slopes, causal_variant
    )
    window = _causal_window(is_causal, window)
    lower_right = causal_variant == "lower_right"
    mask = _broadcast_mask(op, attn_mask, q, batch, heads, seqlen_q, seqlen_k) if attn_mask is not None else None

    backend = _kernel_backend(
        "attention", q, op, v.shape[-1], mask is not None and mask.requires_grad and torch.is_grad_enabled(), dropout_p
    )
    if backend == "cpu" and backends.forced_backend() is None and _sdpa_can_run(
        mask, alibi_slopes, softcap, window, lower_right, return_lse, seqlen_q, seqlen_k
    ):
        # SDPA's CPU flash path is faster below ~128x128 scores (calls too small to amortize
        # our per-call cost); backends.DEFAULTS.
        library = backends.cpu_gemm_library()
        if seqlen_q * seqlen_k < CPU_SDPA_BELOW_SCORES[library] or (library == "aten" and window[1] != 0):
            backend = "torch"
    if backend == "torch":
        out, lse = _torch_attention(q, k, v, mask, scale, window, softcap, alibi_slopes, lower_right, dropout_p, return_lse)
    elif backend == "cpu":
        out, lse = _cpp_attention(q, k, v, attn_mask, scale, window, softcap, alibi_slopes, lower_right)
    else:
        seed = _draw_seed(q.device) if dropout_p > 0 else None
        out, lse = _triton_attention_fwd(
            _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
            mask, alibi_slopes, seed, None, None, seqlen_q, seqlen_k,
            scale, softcap, window[0], window[1], lower_right, dropout_p,
        )
    return (out, lse) if return_lse else out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    causal_variant: str = "upper_left",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences: q (total_q, H, D), k/v (total_k, H_kv, D); sequence b
    is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (int32 offsets, B + 1 of them, from 0).
    GQA when H is a multiple of H_kv. The log-sum-exp (return_lse) is (H, total_q)."""
    op = "fuseformer.ops.attention_varlen"
    _check_qkv(op, q, k, v, 3, "(total, heads, head_dim)")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{op}: k and v must have the same number of rows; got {k.shape[0]} and {v.shape[0]}")
    _check_heads(op, q.shape[1], k.shape[1], v.shape[1], True)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        _checks.tensor(cu, name, op)
        _checks.same_device(cu, name, q, op, "q")
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{op}: {name} must be a 1-D int32 tensor of B + 1 offsets, got {cu.dtype} {list(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must hold the same number of sequences")
    batch = cu_seqlens_q.numel() - 1
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{op}: {name} must be a non-negative int, got {value!r}")
    # Offsets that run past the tensors would read out of bounds; a sequence longer than the
    # max_seqlen given would be cut short.
    for name, cu, total, longest in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        lengths = cu.diff()
        _checks.values_hold(
            (cu[:1] == 0) & (cu[-1:] <= total) & (lengths >= 0).all() & (lengths <= longest).all(),
            f"{op}: {name} must start at 0, not decrease, end at most at {total} (rows of the "
            f"tensor) and hold no sequence longer than {longest} (the max_seqlen given)",
        )
    dropout_p, scale, window, softcap, alibi_slopes = _check_options(
        op, q, q.shape[1], batch, dropout_p, scale, window, softcap, alibi_slopes, causal_variant
    )
    window = _causal_window(is_causal, window)
    lower_right = causal_variant == "lower_right"
    backend = _kernel_backend("attention", q, op, v.shape[-1], False, dropout_p)
    if backend in ("torch", "cpu"):
        out, lse = _varlen_by_sequence(
            backend, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, softcap, alibi_slopes, lower_right, dropout_p
        )
    else:
        seed = _draw_seed(q.device) if dropout_p > 0 else None
        out, lse = _triton_attention_fwd(
            _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
            None, alibi_slopes, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            scale, softcap, window[0], window[1], lower_right, dropout_p,
        )
    return (out, lse) if return_lse else out


def _varlen_by_sequence(backend, q, k, v, cu_q, cu_k, scale, window, softcap, slopes, lower_right, dropout_p):
    """The packed form one sequence at a time through the dense path of ``backend`` ("torch":
    the reference math; "cpu": the C++ kernels, which parallelize within a sequence)."""
    outs, lses = [], []
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(starts_q) - 1):
        qb = q[starts_q[b] : starts_q[b + 1]].transpose(0, 1)[None]
        kb = k[starts_k[b] : starts_k[b + 1]].transpose(0, 1)[None]
        vb = v[starts_k[b] : starts_k[b + 1]].transpose(0, 1)[None]
        sb = slopes[b : b + 1] if slopes is not None and slopes.dim() == 2 else slopes
        if backend == "cpu":
            out, lse = _cpp_attention(qb, kb, vb, None, scale, window, softcap, sb, lower_right)
        else:
            out, lse = math_attention(
                qb, kb, vb, scale=scale, window=window, softcap=softcap, alibi_slopes=sb,
                lower_right=lower_right, dropout_p=dropout_p,
            )
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    if out.shape[0] < q.shape[0]:  # rows past cu_seqlens_q[-1] belong to no sequence
        out = torch.cat([out, q.new_zeros((q.shape[0] - out.shape[0], *q.shape[1:]))])
        lse = torch.cat([lse, lse.new_full((q.shape[1], q.shape[0] - lse.shape[1]), float("-inf"))], dim=1)
    return out, lse


def attention_with_kv_cache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor | int,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode: q (B, H, n, D) against k_cache/v_cache (B, H_kv, L_max, D) that hold
    cache_seqlens[b] valid keys (an int32 (B,) tensor or an int). k_new/v_new (B, H_kv, n, D),
    when given, are first written into the caches at cache_seqlens[b] (in place; cache_seqlens
    itself is not advanced). The n queries sit at the end of the sequence (lower-right), so
    is_causal lets new token i see the cache and new tokens <= i. GQA when H is a multiple of
    H_kv. num_splits: chunks of the cache per (batch, kv head), 0 = chosen for the GPU."""
    op = "fuseformer.ops.attention_with_kv_cache"
    if (type(cache_seqlens) is int and scale is None and window is None and softcap is None and alibi_slopes is None
            and type(num_splits) is int and num_splits >= 0 and _plain_decode_call(q, k_cache, v_cache, k_new, v_new,
                                                                                  cache_seqlens)):
        # The model's common call in a few comparisons (host time per decode step).
        return _decode(op, q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_seqlens,
                       k_new.shape[2] if k_new is not None else 0, 1.0 / math.sqrt(q.shape[-1]),
                       (-1, 0) if is_causal else (-1, -1), 0.0, None, num_splits, return_lse)
    _check_qkv(op, q, k_cache, v_cache, 4, "(batch, heads, seq, head_dim)")
    batch, heads, n_new, head_dim = q.shape
    kv_heads, max_k = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != batch or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"{op}: k_cache and v_cache must be (B, H_kv, L_max, D) with q's batch {batch}; got "
            f"{list(k_cache.shape)} and {list(v_cache.shape)}"
        )
    _check_heads(op, heads, kv_heads, v_cache.shape[1], True)
    # An int (every sequence equally long, the common model case) stays an int: no index
    # tensors, no device-side checks, plain slice writes (host time per decode step).
    uniform = cache_seqlens if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool) else None
    if uniform is None:
        _checks.tensor(cache_seqlens, "cache_seqlens", op)
        _checks.same_device(cache_seqlens, "cache_seqlens", q, op, "q")
        if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (batch,):
            raise ValueError(
                f"{op}: cache_seqlens must be an int32 tensor of shape ({batch},) or an int, got "
                f"{cache_seqlens.dtype} {list(cache_seqlens.shape)}"
            )
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: pass both k_new and v_new, or neither")
    appended = 0
    if k_new is not None:
        for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            _checks.tensor(t, name, op)
            _checks.same_device(t, name, q, op, "q")
            if t.dtype != cache.dtype or t.dim() != 4 or t.shape[:2] != cache.shape[:2] or t.shape[3] != cache.shape[3]:
                raise ValueError(
                    f"{op}: {name} must be (B, H_kv, n, D) = {[batch, kv_heads, 'n', cache.shape[3]]} with "
                    f"the cache's dtype {cache.dtype}; got {list(t.shape)} {t.dtype}"
                )
        if k_new.shape[2] != v_new.shape[2]:
            raise ValueError(f"{op}: k_new and v_new must hold the same number of tokens")
        appended = k_new.shape[2]
    if uniform is not None:
        if not 0 <= uniform <= max_k - appended:
            raise ValueError(
                f"{op}: cache_seqlens (+ {appended} new tokens) must lie in [0, {max_k}] (L_max of the cache); "
                f"got {uniform}"
            )
    else:
        _checks.values_hold(
            (cache_seqlens >= 0) & (cache_seqlens <= max_k - appended),
            lambda: f"{op}: cache_seqlens (+ {appended} new tokens) must lie in [0, {max_k}] (L_max of the cache); "
            f"got {cache_seqlens.tolist()}",
        )
    dropout_p, scale, window, softcap, alibi_slopes = _check_options(
        op, q, heads, batch, 0.0, scale, window, softcap, alibi_slopes, "lower_right"
    )
    window = _causal_window(is_causal, window)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{op}: num_splits must be a non-negative int, got {num_splits!r}")
    return _decode(op, q, k_cache, v_cache, cache_seqlens, k_new, v_new, uniform, appended, scale, window, softcap,
                   alibi_slopes, num_splits, return_lse)


def _plain_decode_call(q, k_cache, v_cache, k_new, v_new, length: int) -> bool:
    """Plain tensors of one float dtype and device, (B, H, n, D) / (B, H_kv, L_max, D) caches
    with H a multiple of H_kv, new keys and values of (B, H_kv, n_new, D) that fit."""
    if type(q) is not Tensor or type(k_cache) is not Tensor or type(v_cache) is not Tensor:
        return False
    dtype, device = q.dtype, q.device
    if (dtype not in _checks.FLOAT_DTYPES or q.dim() != 4 or k_cache.dim() != 4 or k_cache.dtype != dtype
            or v_cache.dtype != dtype or k_cache.device != device or v_cache.device != device):
        return False
    batch, heads, _, head_dim = q.shape
    cache_shape = k_cache.shape
    if (v_cache.shape != cache_shape or cache_shape[0] != batch or cache_shape[3] != head_dim or cache_shape[1] == 0
            or heads % cache_shape[1]):
        return False
    appended = 0
    if k_new is not None or v_new is not None:
        if type(k_new) is not Tensor or type(v_new) is not Tensor or k_new.shape != v_new.shape or k_new.dim() != 4:
            return False
        if (k_new.dtype != dtype or v_new.dtype != dtype or k_new.device != device or v_new.device != device
                or k_new.shape[:2] != cache_shape[:2] or k_new.shape[3] != head_dim):
            return False
        appended = k_new.shape[2]
    return 0 <= length <= cache_shape[2] - appended


def _decode(op, q, k_cache, v_cache, cache_seqlens, k_new, v_new, uniform, appended, scale, window, softcap,
            alibi_slopes, num_splits, return_lse):
    """The validated decode call: append the new keys and values, then attend on the backend."""
    batch = q.shape[0]
    if k_new is not None and appended:
        if uniform is not None:  # narrow + copy_: a fraction of __setitem__'s host time
            k_cache.narrow(2, uniform, appended).copy_(k_new)
            v_cache.narrow(2, uniform, appended).copy_(v_new)
        else:
            positions = (cache_seqlens[:, None].long() + torch.arange(appended, device=q.device)).view(
                batch, 1, appended, 1
            )
            k_cache.scatter_(2, positions.expand(k_new.shape), k_new)
            v_cache.scatter_(2, positions.expand(v_new.shape), v_new)

    backend = _kernel_backend("attention_decode", q, op, v_cache.shape[-1], False)
    if uniform is not None:
        seqlens_k = torch.full((batch,), uniform + appended, dtype=torch.int32, device=q.device)
    else:
        seqlens_k = cache_seqlens + appended
    if backend == "torch":
        out, lse = _torch_decode(q, k_cache, v_cache, seqlens_k, scale, window, softcap, alibi_slopes)
    elif backend == "cpu":
        out, lse = torch.ops.fuseformer.attention_decode.default(
            *(_last_dim_contiguous(t) for t in (q, k_cache, v_cache)), seqlens_k, alibi_slopes, scale, softcap,
            window[0], window[1], num_splits,
        )
    elif backend == "cuda":
        reason = _cuda_decode_limit(q, k_cache, v_cache)
        if reason is not None:
            raise ValueError(f'{op}: the "cuda" backend {reason}; use the "triton" backend')
        out, lse = torch.ops.fuseformer.attention_decode.default(
            q, k_cache, v_cache, seqlens_k, alibi_slopes, scale, softcap, window[0], window[1], num_splits
        )
    else:
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError(f"{op}: the {backend!r} backend needs caches with a contiguous last dimension")
        out, lse = _triton_attention_decode(
            _last_dim_contiguous(q), k_cache, v_cache, seqlens_k, alibi_slopes, scale, softcap,
            window[0], window[1], num_splits,
        )
    return (out, lse) if return_lse else out


def _cuda_decode_limit(q, k_cache, v_cache) -> str | None:
    """Why the C++ CUDA decode kernel cannot take these tensors, or None."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"takes float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"takes head dims that are multiples of 8 up to 256, got {q.shape[-1]}"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st % 8 for st in t.stride()[:3]):
            return f"needs {name} 16-byte aligned with a contiguous last dim and strides that are multiples of 8"
    return None


def _torch_decode(q, k_cache, v_cache, seqlens_k, scale, window, softcap, slopes):
    """The math path over each batch's valid keys, the queries at the end (lower-right): the
    per-batch positions become one additive mask (visibility and ALiBi)."""
    n_new, max_k = q.shape[2], k_cache.shape[2]
    keys = torch.arange(max_k, device=q.device)
    pos_q = seqlens_k[:, None] - n_new + torch.arange(n_new, device=q.device)[None, :]  # (B, n)
    rel = (pos_q[:, :, None] - keys[None, None, :])[:, None]  # (B, 1, n, L)
    visible = keys < seqlens_k[:, None, None, None]
    left, right = window
    if right >= 0:
        visible = visible & (rel >= -right)
    if left >= 0:
        visible = visible & (rel <= left)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = torch.zeros(visible.shape, dtype=compute, device=q.device)
    if slopes is not None:
        s = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        bias = -s.to(compute) * rel.abs().to(compute)
    bias = torch.where(visible, bias, torch.tensor(float("-inf"), dtype=compute, device=q.device))
    return math_attention(q, k_cache, v_cache, bias, scale=scale, softcap=softcap)
