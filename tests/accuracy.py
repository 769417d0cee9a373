"""The correctness rule of ENGINEERING.md: a kernel's error against the float64 reference is
at most twice the error of PyTorch's own op run in the same precision, plus a small floor."""

from __future__ import annotations

import torch

from fuseformer import backends

# Floors: well under one rounding unit of each dtype; they matter only where PyTorch's own
# low-precision error is close to zero (e.g. outputs that are exact in that dtype).
ABS_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def relative_error(out: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """||out - ref|| / ||ref||, or / scale where the result is a cancellation of larger terms
    and ||ref|| would measure the conditioning of the problem rather than the kernel."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item() if scale is None else scale
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_matches_reference(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_lowp: torch.Tensor,
    scale: float | None = None,
    inherited: float = 0.0,
) -> None:
    """out: the kernel's result; ref64: float64 reference; torch_lowp: PyTorch in out's dtype.
    ``inherited``: the error (same measure) the exact computation makes when fed the
    kernel's own earlier result, itself already checked (a backward reading the forward's
    output); the kernel's own error is bounded on top of it."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert out.dtype == torch_lowp.dtype, f"{name}: dtype {out.dtype} != {torch_lowp.dtype}"
    assert torch.isfinite(out).all(), f"{name}: {int((~torch.isfinite(out)).sum())} non-finite elements"
    err = relative_error(out, ref64, scale)
    torch_err = relative_error(torch_lowp, ref64, scale)
    bound = 2 * torch_err + ABS_FLOOR[out.dtype] + inherited
    assert err <= bound, (
        f"{name}: relative error {err:.3e} > bound {bound:.3e} "
        f"(PyTorch {out.dtype} error {torch_err:.3e}, inherited {inherited:.3e}, max abs diff "
        f"{(out.double() - ref64.double()).abs().max().item():.3e})"
    )


def kernel_backends(device_type: str = "cpu", family: str = "layer_norm") -> list[str]:
    """Every non-reference backend that implements ``family`` and can run on ``device_type`` here."""
    return [
        b for b in backends.available_backends(device_type) if b != "torch" and b in backends.IMPLEMENTED[family]
    ]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs(family: str = "layer_norm") -> list[tuple[str, str]]:
    return [(b, d) for d in devices() for b in kernel_backends(d, family)]
