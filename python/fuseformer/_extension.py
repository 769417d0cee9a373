"""Loads the compiled extension (fuseformer._C), whose import registers the C++ ops."""

from __future__ import annotations

import torch

try:
    from fuseformer import _C  # import registers torch.ops.fuseformer.*

    LOAD_ERROR: str | None = None
except ImportError as exc:  # a source checkout without a build, or a broken build
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    return LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered ``fuseformer::<op>`` for ``dispatch_key`` (CPU, CUDA)."""
    if not loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fuseformer::{op}", dispatch_key)


def vendor_cpu_gemm_library() -> str:
    """Where this CPU sends the C++ kernels' per-call float32 GEMMs without FUSEFORMER_CPU_GEMM:
    "aten" (MKL, on Intel CPUs) or "onednn"; the extension's own answer (csrc/cpu/gemm.h), so
    the Python dispatch and the kernels agree. "onednn" without the extension (no kernels)."""
    return _C.vendor_cpu_gemm_library() if loaded() else "onednn"


def empty_cpu_cache() -> int:
    """Frees the blocks the C++ CPU kernels keep for their large outputs (csrc/allocate.h:
    outputs of 1 MiB or more, freed blocks kept up to FUSEFORMER_CPU_CACHE_MIB, default 512,
    so that the next output of that size needs no fresh pages) and returns the bytes freed;
    as torch.cuda.empty_cache() does for PyTorch's CUDA cache."""
    return _C.empty_cpu_cache() if loaded() else 0


def cpu_cache_bytes() -> int:
    """The bytes that cache holds now (freed outputs kept for reuse)."""
    return _C.cpu_cache_bytes() if loaded() else 0


def cpu_cache_budget() -> int:
    """The most bytes that cache holds (FUSEFORMER_CPU_CACHE_MIB, in bytes; 0: off)."""
    return _C.cpu_cache_budget() if loaded() else 0
