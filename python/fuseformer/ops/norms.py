"""LayerNorm and RMSNorm, plain and with a fused residual add.

Public functions (semantics of ``F.layer_norm`` / ``F.rms_norm``):
  layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)
  rms_norm(input, normalized_shape, weight=None, eps=None)
  add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5)
      -> (layer_norm(input + residual), input + residual)
  add_rms_norm(input, residual, normalized_shape, weight=None, eps=None)
      -> (rms_norm(input + residual), input + residual)

Dtypes: float32, float16, bfloat16 inputs; statistics in float32. weight/bias may be the
input's dtype or float32 (mixed precision: fp32 master weights, half activations); the
output has the input's dtype.

Backend limits on the normalized size N (the product of normalized_shape): "triton", "cpu"
and "cuda" take 1 <= N <= MAX_NORMALIZED_SIZE (2**20, the largest size tested); "torch" has
no limit of its own.

Registered ops: "fuseformer::norm_fwd" / "fuseformer::norm_bwd" (C++, CPU and CUDA kernels;
autograd in C++, csrc/autograd/norms.cpp) and "fuseformer::triton_norm_fwd" /
"fuseformer::triton_norm_bwd" (Triton; autograd registered here). Each has a fake
implementation, and each forward its autograd formula (the matching backward op).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fuseformer import _extension, backends
from fuseformer.ops import _checks

MAX_NORMALIZED_SIZE = 1 << 20

Tensor = torch.Tensor


# ---- the Triton backend as custom ops ---------------------------------------------------


@torch.library.custom_op("fuseformer::triton_norm_fwd", mutates_args=())
def _triton_norm_fwd(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fuseformer.kernels import norms as triton_norms

    return triton_norms.norm_fwd(input, residual, weight, bias, eps, rms)


@torch.library.custom_op("fuseformer::triton_norm_bwd", mutates_args=())
def _triton_norm_bwd(
    grad_out: Tensor,
    grad_residual_out: Tensor | None,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fuseformer.kernels import norms as triton_norms

    return triton_norms.norm_bwd(grad_out, grad_residual_out, input, weight, mean, rstd, rms, has_bias)


# ---- fake implementations and autograd, shared by the C++ and Triton ops ---------------


def _norm_fwd_fake(input, residual, weight, bias, eps, rms):
    stats_shape = input.shape[:-1]
    out = input.new_empty(input.shape)
    residual_out = input.new_empty(input.shape) if residual is not None else input.new_empty(0)
    mean = input.new_empty(0 if rms else stats_shape, dtype=torch.float32)
    rstd = input.new_empty(stats_shape, dtype=torch.float32)
    return out, residual_out, mean, rstd


def _norm_bwd_fake(grad_out, grad_residual_out, input, weight, mean, rstd, rms, has_bias):
    n = input.shape[-1]
    grad_input = input.new_empty(input.shape)
    grad_weight = input.new_empty(n if weight is not None else 0, dtype=torch.float32)
    grad_bias = input.new_empty(n if has_bias else 0, dtype=torch.float32)
    return grad_input, grad_weight, grad_bias


def _norm_setup_context(ctx, inputs, output):
    input, residual, weight, bias, _eps, rms = inputs
    _out, residual_out, mean, rstd = output
    ctx.save_for_backward(residual_out if residual is not None else input, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.set_materialize_grads(False)  # mean / rstd, and residual_out when unused: no zero fills


def _make_norm_backward(bwd_op):
    def backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
        normalized, weight, mean, rstd = ctx.saved_tensors
        if grad_out is None:  # only the sum was used downstream
            grad_out = torch.zeros_like(normalized)
        grad_input, grad_weight, grad_bias = bwd_op(
            grad_out,
            grad_residual_out if ctx.has_residual else None,
            normalized,
            weight,
            mean,
            rstd,
            ctx.rms,
            ctx.bias_dtype is not None,
        )
        return (
            grad_input,
            grad_input if ctx.has_residual else None,
            grad_weight.to(weight.dtype) if weight is not None else None,
            grad_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
            None,
            None,
        )

    return backward


def _register(fwd_name: str, bwd_op) -> None:
    torch.library.register_autograd(
        fwd_name, _make_norm_backward(bwd_op), setup_context=_norm_setup_context
    )


torch.library.register_fake("fuseformer::triton_norm_fwd")(_norm_fwd_fake)
torch.library.register_fake("fuseformer::triton_norm_bwd")(_norm_bwd_fake)
_register("fuseformer::triton_norm_fwd", _triton_norm_bwd)

if _extension.loaded():
    torch.library.register_fake("fuseformer::norm_fwd")(_norm_fwd_fake)
    torch.library.register_fake("fuseformer::norm_bwd")(_norm_bwd_fake)
    # The C++ op's autograd is registered in C++ (csrc/autograd/norms.cpp): no Python on the
    # hot path of a training step.


def _fwd_op(backend: str):
    if backend == "triton":
        return torch.ops.fuseformer.triton_norm_fwd.default
    return torch.ops.fuseformer.norm_fwd.default  # "cpu" and "cuda": dispatch by device


# ---- public API ---------------------------------------------------------------------------


def _check_param(param, name, input, normalized_shape, op):
    if param is None:
        return
    _checks.tensor(param, name, op)
    _checks.same_device(param, name, input, op)
    if param.shape != normalized_shape:  # torch.Size compares equal to a tuple
        raise ValueError(
            f"{op}: {name} must have shape normalized_shape={list(normalized_shape)}, "
            f"got {list(param.shape)}"
        )
    if param.dtype is not input.dtype and param.dtype is not torch.float32:
        _checks.float_dtype(param, name, op, allowed=(input.dtype, torch.float32))


def _plainly_valid(input, residual, normalized_shape, weight, bias, eps) -> bool:
    """The common case (a module's own parameters, one dtype and device) in a few comparisons:
    host time per call matters at decode (dtypes are singletons; CPU tensors share one
    device). Anything else takes the checks that explain it."""
    if type(input) is not Tensor or type(normalized_shape) is not tuple or len(normalized_shape) != 1:
        return False
    dtype, n = input.dtype, normalized_shape[0]
    if dtype not in _checks.FLOAT_DTYPES or input.dim() < 1 or input.shape[-1] != n:
        return False
    if type(eps) is not float or not 0.0 <= eps < math.inf:
        return False
    for t in (weight, bias):
        if t is not None and (t.dtype is not dtype or t.dim() != 1 or t.shape[0] != n
                              or not _checks.on_device_of(t, input)):
            return False
    return residual is None or (type(residual) is Tensor and residual.dtype is dtype and residual.shape == input.shape
                                and _checks.on_device_of(residual, input))


def _norm(
    op: str,
    input: Tensor,
    residual: Tensor | None,
    normalized_shape,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | None,
    rms: bool,
) -> tuple[Tensor, Tensor | None]:
    if _plainly_valid(input, residual, normalized_shape, weight, bias, eps):
        if _small_cpu_layer_norm(input, rms):
            # Small CPU LayerNorm (decode): straight to ATen's op (F.layer_norm without its
            # Python frame; the arguments are plain tensors, checked above).
            summed = input + residual if residual is not None else input
            return torch.layer_norm(summed, normalized_shape, weight, bias, eps), (summed if residual is not None else None)
        return _run_norm(op, input, residual, normalized_shape, weight, bias, eps, rms)
    _checks.tensor(input, "input", op)
    _checks.float_dtype(input, "input", op, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    normalized_shape = _checks.shape_tuple(normalized_shape, "normalized_shape", op)
    if tuple(input.shape[input.dim() - len(normalized_shape) :]) != normalized_shape or input.dim() < len(
        normalized_shape
    ):
        raise ValueError(
            f"{op}: normalized_shape={list(normalized_shape)} must match the last dimensions "
            f"of input, whose shape is {list(input.shape)}"
        )
    _check_param(weight, "weight", input, normalized_shape, op)
    _check_param(bias, "bias", input, normalized_shape, op)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"{op}: weight ({weight.dtype}) and bias ({bias.dtype}) must share a dtype")
    if residual is not None:
        _checks.tensor(residual, "residual", op)
        _checks.same_device(residual, "residual", input, op)
        if residual.shape != input.shape or residual.dtype != input.dtype:
            raise ValueError(
                f"{op}: residual must have input's shape {list(input.shape)} and dtype "
                f"{input.dtype}; got {list(residual.shape)} and {residual.dtype}"
            )
    if eps is None:
        # As PyTorch: the epsilon of the computation type (float32 for half inputs).
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite non-negative float, got {eps!r}")
    return _run_norm(op, input, residual, normalized_shape, weight, bias, eps, rms)


# Unforced CPU LayerNorm calls this small stay on PyTorch's (decode, small models): the C++
# kernel's op call costs ~2 us more host time than F.layer_norm's, and the 4-layer GPT / BERT
# of bench models measured no gain below it; on larger inputs the kernel measured 1.02-1.08x
# eager forward and 1.03-1.07x forward+backward (benchmarks/results/cpu/norms.md).
CPU_LAYER_NORM_MIN_ELEMENTS = 1 << 17


def _small_cpu_layer_norm(input, rms: bool) -> bool:
    """An unforced CPU LayerNorm below CPU_LAYER_NORM_MIN_ELEMENTS: PyTorch's call runs it."""
    return (not rms and input.is_cpu and input.numel() < CPU_LAYER_NORM_MIN_ELEMENTS
            and backends.forced_backend() is None)


def _run_norm(op, input, residual, normalized_shape, weight, bias, eps, rms):
    """The validated call on its backend."""
    backend = backends.resolve("rms_norm" if rms else "layer_norm", input.device)
    if backend == "cpu" and _small_cpu_layer_norm(input, rms):
        backend = "torch"
    if backend != "torch" and input.dtype == torch.float64:
        # The kernels are for training/inference dtypes; float64 is the reference's.
        if backends.forced_backend() is not None:
            raise TypeError(
                f"{op}: the {backend!r} backend takes float32, float16 or bfloat16 input, got "
                'float64 (float64 runs on the "torch" backend)'
            )
        backend = "torch"
    n = math.prod(normalized_shape)
    if backend != "torch" and n == 0:  # an empty normalized dimension: an empty output
        if backends.forced_backend() is not None:
            raise ValueError(f"{op}: the {backend!r} backend takes a normalized size of at least 1, got "
                             f"normalized_shape={list(normalized_shape)}")
        backend = "torch"
    if backend == "torch":
        return _torch_norm(input, residual, normalized_shape, weight, bias, eps, rms)

    if n > MAX_NORMALIZED_SIZE:
        raise ValueError(
            f"{op}: the {backend!r} backend takes a normalized size of at most "
            f"{MAX_NORMALIZED_SIZE}, got {n} (normalized_shape={list(normalized_shape)}); "
            f'use fuseformer.use_backend("torch") for larger rows'
        )
    lead = input.shape[: input.dim() - len(normalized_shape)]
    flat = (*lead, n)
    out, residual_out, _mean, _rstd = _fwd_op(backend)(
        input.reshape(flat),
        residual.reshape(flat) if residual is not None else None,
        weight.reshape(n) if weight is not None else None,
        bias.reshape(n) if bias is not None else None,
        float(eps),
        rms,
    )
    out = out.view(input.shape)
    return out, (residual_out.view(input.shape) if residual is not None else None)


def _torch_norm(input, residual, normalized_shape, weight, bias, eps, rms):
    """The "torch" backend: PyTorch's own ops (also the reference the tests use)."""
    summed = input + residual if residual is not None else input
    if weight is not None and weight.dtype != input.dtype:
        weight = weight.to(input.dtype)
    if rms:
        out = F.rms_norm(summed, normalized_shape, weight, eps)
    else:
        if bias is not None and bias.dtype != input.dtype:
            bias = bias.to(input.dtype)
        out = F.layer_norm(summed, normalized_shape, weight, bias, eps)
    return out, (summed if residual is not None else None)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm over the last ``len(normalized_shape)`` dimensions, as ``F.layer_norm``."""
    return _norm("fuseformer.ops.layer_norm", input, None, normalized_shape, weight, bias, eps, False)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMSNorm as ``F.rms_norm``; ``eps=None`` is the epsilon of the computation type, as in
    PyTorch: ``torch.finfo(torch.float32).eps`` for float32/16/bf16 input."""
    return _norm("fuseformer.ops.rms_norm", input, None, normalized_shape, weight, None, eps, True)[0]


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """``(layer_norm(input + residual), input + residual)`` in one pass (pre-norm blocks)."""
    if residual is None:
        raise TypeError("fuseformer.ops.add_layer_norm: residual must be a tensor, got None")
    return _norm("fuseformer.ops.add_layer_norm", input, residual, normalized_shape, weight, bias, eps, False)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(input + residual), input + residual)`` in one pass (pre-norm blocks)."""
    if residual is None:
        raise TypeError("fuseformer.ops.add_rms_norm: residual must be a tensor, got None")
    return _norm("fuseformer.ops.add_rms_norm", input, residual, normalized_shape, weight, None, eps, True)
