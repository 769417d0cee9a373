"""Benchmark cases for attention: the dense op forward and forward+backward against SDPA with
each of its backends (flash, memory-efficient, cuDNN, math), the unfused eager math,
torch.compile of it and flash-attn when installed; and KV-cache decode against SDPA over
the same cache.

Shapes follow FlashAttention's benchmarks: 16k tokens per batch (B = 16384 / S) and a model
width of 2048 (H = 2048 / D). FLOPs: 4·B·H·S·L·D forward, halved when causal; the backward
is 2.5x the forward, so forward+backward counts 3.5x.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import Case
from fuseformer.ops.attention import math_attention

FAMILY = "attention"
TOKENS, WIDTH = 16384, 2048

SDPA_BACKENDS = {
    "SDPA flash": "FLASH_ATTENTION",
    "SDPA efficient": "EFFICIENT_ATTENTION",
    "SDPA cuDNN": "CUDNN_ATTENTION",
    "SDPA math": "MATH",
}


def _dense_shapes(device: str, quick: bool) -> list[tuple[int, int, bool]]:
    """(S, D, with backward) per case."""
    if device == "cuda":
        if quick:
            return [(1024, 128, True), (4096, 128, True)]
        # Every length at D = 128 (forward and backward), three at D = 64 and 256 (forward).
        return [(s, 128, True) for s in (512, 1024, 2048, 4096, 8192, 16384)] + [
            (s, d, False) for d in (64, 256) for s in (1024, 4096, 16384)
        ]
    return [(256, 64, True)] if quick else [(512, 64, True), (1024, 64, True), (2048, 128, True)]


def _kernel_backends(device: str, family: str = "attention") -> list[str]:
    return [b for b in backends.available_backends(device) if b != "torch" and b in backends.IMPLEMENTED[family]]


def _sdpa(name: str, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _eager(causal: bool):
    def run(q, k, v):
        return math_attention(q, k, v, scale=q.shape[-1] ** -0.5, window=(-1, 0) if causal else (-1, -1))[0]

    return run


def _flash_attn(causal: bool):
    from flash_attn import flash_attn_func

    def run(q, k, v):  # flash-attn's layout is (B, S, H, D): the transposes are views
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

    return run


def _ours(backend: str, causal: bool):
    def run(q, k, v):
        with fuseformer.use_backend(backend):
            return fuseformer.ops.attention(q, k, v, is_causal=causal)

    return run


def _timed(fn, q, k, v, direction: str):
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(q, k, v)
        return fwd
    grad = torch.randn_like(q)

    def fwd_bwd():
        return torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

    return fwd_bwd


def _dense_cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    has_flash_attn = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    for seqlen, head_dim, with_bwd in _dense_shapes(device, quick):
        batch = max(1, (TOKENS if device == "cuda" else 2048) // seqlen)
        heads = (WIDTH if device == "cuda" else 512) // head_dim
        for causal in (False, True):
            for direction in ("fwd", "fwd+bwd") if with_bwd else ("fwd",):
                requires_grad = direction != "fwd"
                q, k, v = (
                    torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype, requires_grad=requires_grad)
                    for _ in range(3)
                )
                flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
                flops *= 3.5 if requires_grad else 1.0
                # Ideal traffic: q, k, v read and o written once forward; backward reads q, k,
                # v, o, dO and writes dq, dk, dv.
                tensor_bytes = q.numel() * q.element_size()
                traffic = tensor_bytes * (4 + (8 if requires_grad else 0))
                fns = {f"fuseformer[{b}]": _ours(b, causal) for b in _kernel_backends(device)}
                if device == "cuda":
                    fns.update({name: _sdpa(name, causal) for name in SDPA_BACKENDS})
                    if has_flash_attn:
                        fns["flash-attn"] = _flash_attn(causal)
                else:
                    fns["SDPA"] = lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)
                # The unfused math holds B·H·S·S scores (and compiles per shape): up to 4k.
                if seqlen <= 4096:
                    fns["torch eager"] = _eager(causal)
                    fns["torch.compile"] = torch.compile(_eager(causal), dynamic=False)
                op = "attention causal" if causal else "attention"
                yield Case(
                    FAMILY, op, direction, (batch, heads, seqlen, head_dim), dtype,
                    {name: _timed(fn, q, k, v, direction) for name, fn in fns.items()}, flops=flops, bytes=traffic,
                )


def _decode_cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    """One new token per sequence against a full cache (GQA 32 query / 8 KV heads, D 128):
    memory-bound, so the figure is the cache bytes read per second."""
    heads, kv_heads, head_dim = 32, 8, 128
    if device == "cuda":
        shapes = [(1, 4096), (16, 16384)] if quick else [(b, n) for b in (1, 4, 16) for n in (4096, 16384, 32768)]
    else:
        heads, kv_heads, head_dim = 8, 2, 64
        shapes = [(1, 1024)] if quick else [(1, 4096), (4, 4096)]
    for batch, cache_len in shapes:
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        k_cache = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
        impls = _decode_impls(device, q, k_cache, v_cache, seqlens)
        cache_bytes = 2 * k_cache.numel() * k_cache.element_size()
        yield Case(FAMILY, "decode", "fwd", (batch, heads, kv_heads, cache_len, head_dim), dtype,
                   {n: torch.no_grad()(fn) for n, fn in impls.items()}, bytes=cache_bytes,
                   flops=4 * batch * heads * cache_len * head_dim, tokens=batch)


def _decode_impls(device, q, k_cache, v_cache, seqlens) -> dict:
    """The implementations of one decode case, bound to its tensors (the harness lists every
    case before it times any, so closures over the case loop's variables would all time the
    last case)."""
    impls = {}
    for b in _kernel_backends(device, "attention_decode"):
        def ours(b=b):
            with fuseformer.use_backend(b):
                return fuseformer.ops.attention_with_kv_cache(q, k_cache, v_cache, seqlens)
        impls[f"fuseformer[{b}]"] = ours
    impls["SDPA"] = lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
    impls["torch eager"] = lambda: math_attention(q, k_cache, v_cache, scale=q.shape[-1] ** -0.5)[0]
    return impls


def missing_baselines(device: str) -> dict[str, str]:
    """Peer libraries this family compares against when installed, and why each is absent."""
    missing = {}
    if importlib.util.find_spec("flash_attn") is None:
        missing["flash-attn"] = "not installed"
    elif device != "cuda":
        missing["flash-attn"] = "CUDA only"
    return missing


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    yield from _dense_cases(device, dtype, quick)
    yield from _decode_cases(device, dtype, quick)
