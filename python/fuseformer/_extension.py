"""Loads the compiled extension (fuseformer._C), whose import registers the C++ ops."""

from __future__ import annotations

import torch

try:
    from fuseformer import _C  # noqa: F401  (import registers torch.ops.fuseformer.*)

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
