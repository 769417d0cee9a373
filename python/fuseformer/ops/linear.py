"""Linear layers with the activation (and the SwiGLU/GeGLU gate) fused into the GEMM.

Public functions:
  linear_act(x, weight, bias=None, activation="gelu")
      = act(F.linear(x, weight, bias))
  gated_linear(x, weight_gate, weight_up, bias_gate=None, bias_up=None, activation="silu")
      = act(F.linear(x, weight_gate, bias_gate)) * F.linear(x, weight_up, bias_up)
        (SwiGLU with "silu", GeGLU with "gelu" / "gelu_tanh")

Activations (``ACTIVATIONS``): "none", "relu", "gelu" (erf), "gelu_tanh" (the tanh
approximation, F.gelu(approximate="tanh")), "silu", "relu2" (squared ReLU).

Shapes and dtypes as ``F.linear``: x (..., K), weights (N, K), biases (N,), one floating dtype
(float32, float16, bfloat16; float64 runs on the "torch" backend); under autocast the
inputs are cast to the autocast dtype as F.linear's are. Float32 GEMMs use TF32 on a GPU
exactly when PyTorch would (``torch.backends.cuda.matmul.allow_tf32``).

What the backward reads: the kernels save the activation's *derivative* at the
pre-activation (gated: act(zg) and zu·act'(zg)) instead of the pre-activation itself, the
same memory, so the backward's elementwise work is one multiply fused into the loads of the
gradient GEMMs (kernels/linear.py).

Registered ops: "fuseformer::linear_fwd" / "fuseformer::linear_bwd" (C++ CPU kernels; autograd
in C++, csrc/autograd/linear.cpp) and "fuseformer::triton_linear_fwd" /
"fuseformer::triton_linear_bwd" (Triton; autograd registered here). Each has a fake
implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuseformer import _extension, backends
from fuseformer.ops import _checks

Tensor = torch.Tensor

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "relu2")


_ACTIVATION_FNS = {
    "none": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "relu2": lambda z: torch.square(F.relu(z)),
}


def activation_fn(name: str):
    """The PyTorch function of an activation name (the reference)."""
    return _ACTIVATION_FNS[name]


# ---- the Triton backend as custom ops ---------------------------------------------------


@torch.library.custom_op("fuseformer::triton_linear_fwd", mutates_args=())
def _triton_linear_fwd(
    x: Tensor,
    weight: Tensor,
    weight_up: Tensor | None,
    bias: Tensor | None,
    bias_up: Tensor | None,
    activation: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fuseformer.kernels import linear as triton_linear

    return triton_linear.linear_fwd(x, weight, weight_up, bias, bias_up, activation, save)


@torch.library.custom_op("fuseformer::triton_linear_bwd", mutates_args=())
def _triton_linear_bwd(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    weight_up: Tensor | None,
    saved: Tensor,
    saved2: Tensor,
    activation: str,
    has_bias: bool,
    has_bias_up: bool,
    needs_input_grad: bool,
    needs_weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fuseformer.kernels import linear as triton_linear

    return triton_linear.linear_bwd(
        grad_out, x, weight, weight_up, saved, saved2, activation, has_bias, has_bias_up,
        needs_input_grad, needs_weight_grad,
    )


# ---- fake implementations and autograd, shared by the C++ and Triton ops ---------------


def _linear_fwd_fake(x, weight, weight_up, bias, bias_up, activation, save):
    shape = (*x.shape[:-1], weight.shape[0])  # the C++ op takes x (..., K); the Triton op (M, K)
    out = x.new_empty(shape)
    gated = weight_up is not None
    save_factor = save and (gated or activation != "none")
    saved = x.new_empty(shape) if save_factor else x.new_empty(0)
    saved2 = x.new_empty(shape) if save_factor and gated else x.new_empty(0)
    return out, saved, saved2


def _linear_bwd_fake(grad_out, x, weight, weight_up, saved, saved2, activation, has_bias, has_bias_up,
                     needs_input_grad, needs_weight_grad):
    n = weight.shape[0]
    grad_x = x.new_empty(x.shape if needs_input_grad else 0)
    grad_w = weight.new_empty(weight.shape if needs_weight_grad else 0)
    grad_w2 = weight.new_empty(weight.shape if needs_weight_grad and weight_up is not None else 0)
    grad_b = x.new_empty(n if needs_weight_grad and has_bias else 0, dtype=torch.float32)
    grad_b2 = x.new_empty(n if needs_weight_grad and has_bias_up else 0, dtype=torch.float32)
    return grad_x, grad_w, grad_w2, grad_b, grad_b2


def _linear_setup_context(ctx, inputs, output):
    x, weight, weight_up, bias, bias_up, activation, _save = inputs
    _out, saved, saved2 = output
    ctx.save_for_backward(x, weight, weight_up, saved, saved2)
    ctx.activation = activation
    ctx.bias_dtypes = (bias.dtype if bias is not None else None, bias_up.dtype if bias_up is not None else None)
    ctx.mark_non_differentiable(saved, saved2)
    ctx.set_materialize_grads(False)  # no zero-filled (M, N) gradients for the saves


def _linear_backward(ctx, grad_out, _grad_saved, _grad_saved2):
    x, weight, weight_up, saved, saved2 = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_weight_grad = any(needs[1:5])
    bias_dtype, bias_up_dtype = ctx.bias_dtypes
    grad_x, grad_w, grad_w2, grad_b, grad_b2 = _triton_linear_bwd(
        grad_out, x, weight, weight_up, saved, saved2, ctx.activation,
        bias_dtype is not None, bias_up_dtype is not None, needs[0], needs_weight_grad,
    )
    return (
        grad_x if needs[0] else None,
        grad_w if needs_weight_grad else None,
        grad_w2 if needs_weight_grad and weight_up is not None else None,
        grad_b.to(bias_dtype) if needs_weight_grad and bias_dtype is not None else None,
        grad_b2.to(bias_up_dtype) if needs_weight_grad and bias_up_dtype is not None else None,
        None,
        None,
    )


torch.library.register_fake("fuseformer::triton_linear_fwd")(_linear_fwd_fake)
torch.library.register_fake("fuseformer::triton_linear_bwd")(_linear_bwd_fake)
torch.library.register_autograd(
    "fuseformer::triton_linear_fwd", _linear_backward, setup_context=_linear_setup_context
)

if _extension.loaded():
    torch.library.register_fake("fuseformer::linear_fwd")(_linear_fwd_fake)
    torch.library.register_fake("fuseformer::linear_bwd")(_linear_bwd_fake)
    # The C++ op's autograd is registered in C++ (csrc/autograd/linear.cpp).


# ---- public API ---------------------------------------------------------------------------


def _check_activation(activation: object, op: str) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
    return activation


def _check_args(op: str, x: Tensor, weights: dict[str, Tensor], biases: dict[str, Tensor | None]) -> None:
    _checks.tensor(x, "x", op)
    _checks.float_dtype(x, "x", op, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    first = None
    for name, w in weights.items():
        _checks.tensor(w, name, op)
        _checks.same_device(w, name, x, op, "x")
        if w.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (out_features, in_features), got shape {list(w.shape)}")
        if w.shape[1] != x.shape[-1]:
            raise ValueError(
                f"{op}: {name} has in_features={w.shape[1]} but x has {x.shape[-1]} features "
                f"(x shape {list(x.shape)}, {name} shape {list(w.shape)})"
            )
        if first is not None and w.shape != first[1].shape:
            raise ValueError(
                f"{op}: {name} must have {first[0]}'s shape {list(first[1].shape)}, got {list(w.shape)}"
            )
        first = first or (name, w)
    n = first[1].shape[0]
    for name, b in biases.items():
        if b is None:
            continue
        _checks.tensor(b, name, op)
        _checks.same_device(b, name, x, op, "x")
        if tuple(b.shape) != (n,):
            raise ValueError(f"{op}: {name} must have shape [{n}] (out_features), got {list(b.shape)}")
    for name, t in (*weights.items(), *biases.items()):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {_checks.dtype_name(t.dtype)} but x has "
                f"{_checks.dtype_name(x.dtype)} (one dtype expected, as F.linear; use autocast for mixed precision)"
            )


def _autocast(tensors: list[Tensor | None], device: torch.device) -> list[Tensor | None]:
    """F.linear's autocast rule: run in the autocast dtype (floating inputs cast to it)."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    return tensors


# Below this many rows (decode) half-precision CPU calls stay on PyTorch's call: the C++
# kernels' GEMM would be ATen's too, and PyTorch's call costs less host time. float32 takes
# the C++ kernels' AVX-512 small-row GEMM (csrc/cpu/gemv.cpp: 1.3-4.7x ATen's at 1-7 rows)
# from weights of CPU_SMALL_ROWS_MIN_WEIGHT elements; below that the call's ~1 us of host
# time over F.linear's outweighs the GEMM (1-row module calls, 2 threads: 128x256 8.3 vs
# 7.5 us; 256x256 8.85 vs 9.0; 384x256 9.5 vs 10.8; 256x512 9.9 vs 12.1).
CPU_KERNEL_MIN_ROWS = 8
CPU_SMALL_ROWS_MIN_WEIGHT = 1 << 16


def _plainly_valid(x, weight, weight_up, bias, bias_up) -> bool:
    """The common case in a few comparisons (host time per call matters at decode: dtypes
    are singletons, CPU tensors share one device); anything else goes through _check_args,
    which explains what is wrong or accepts it."""
    if type(weight) not in _checks.PARAM_TYPES or weight.dim() != 2 or x.dim() < 1:
        return False
    dtype = x.dtype
    if (weight.dtype is not dtype or dtype not in _checks.FLOAT_DTYPES or weight.shape[1] != x.shape[-1]
            or not _checks.on_device_of(weight, x)):
        return False
    n = weight.shape[0]
    if bias is not None and (type(bias) not in _checks.PARAM_TYPES or bias.dtype is not dtype or bias.dim() != 1
                             or bias.shape[0] != n or not _checks.on_device_of(bias, x)):
        return False
    if weight_up is None and bias_up is None:
        return True
    for t, shape in ((weight_up, weight.shape), (bias_up, weight.shape[:1])):
        if t is not None and (not isinstance(t, Tensor) or t.shape != shape or t.dtype != dtype or t.device != x.device):
            return False
    return True


def _run(op: str, x: Tensor, weight: Tensor, weight_up: Tensor | None, bias: Tensor | None,
         bias_up: Tensor | None, activation: str) -> Tensor:
    if activation not in ACTIVATIONS:
        _check_activation(activation, op)
    if type(x) is not Tensor:
        _checks.tensor(x, "x", op)
    device_type = "cpu" if x.is_cpu else x.device.type
    if torch.is_autocast_enabled(device_type):
        x, weight, weight_up, bias, bias_up = _autocast([x, weight, weight_up, bias, bias_up], x.device)
    if not _plainly_valid(x, weight, weight_up, bias, bias_up):
        weights = {"weight_gate": weight, "weight_up": weight_up} if weight_up is not None else {"weight": weight}
        biases = {"bias_gate": bias, "bias_up": bias_up} if weight_up is not None else {"bias": bias}
        _check_args(op, x, weights, biases)

    forced = backends.forced_backend()
    if forced is None:
        backend = backends.default_backend("linear", device_type)
        if backend == "cuda" or backend == "triton":
            if activation == "none" and weight_up is None and device_type == "cuda":
                backend = "torch"  # nothing to fuse: cuBLAS (backends.DEFAULTS)
        elif backend == "cpu" and x.numel() < CPU_KERNEL_MIN_ROWS * x.shape[-1] and (
                x.dtype is not torch.float32 or weight.numel() < CPU_SMALL_ROWS_MIN_WEIGHT):
            backend = "torch"  # decode-sized: see CPU_KERNEL_MIN_ROWS
    else:
        backend = backends.resolve("linear", x.device)
    if backend == "torch":
        return _torch_linear(x, weight, weight_up, bias, bias_up, activation)
    if x.dtype is torch.float64:
        if forced is not None:
            raise TypeError(
                f"{op}: the {backend!r} backend takes float32, float16 or bfloat16 input, got "
                'float64 (float64 runs on the "torch" backend)'
            )
        return _torch_linear(x, weight, weight_up, bias, bias_up, activation)
    if x.numel() == 0 or weight.numel() == 0:
        # Empty problems have nothing to fuse; PyTorch's ops give their exact semantics.
        return _torch_linear(x, weight, weight_up, bias, bias_up, activation)
    save = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or any(
        t is not None and t.requires_grad for t in (weight_up, bias, bias_up)))
    if backend != "triton":  # the C++ op takes x (..., K) itself
        return torch.ops.fuseformer.linear_fwd.default(x, weight, weight_up, bias, bias_up, activation, save)[0]
    out, _saved, _saved2 = torch.ops.fuseformer.triton_linear_fwd.default(
        x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x, weight, weight_up, bias, bias_up, activation, save
    )
    return out.view(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


def _torch_linear(x, weight, weight_up, bias, bias_up, activation):
    """The "torch" backend: PyTorch's own ops (also the reference the tests use)."""
    if activation == "none" and weight_up is None:
        return F.linear(x, weight, bias)
    act = _ACTIVATION_FNS[activation](F.linear(x, weight, bias))
    return act if weight_up is None else act * F.linear(x, weight_up, bias_up)


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "gelu") -> Tensor:
    """``act(F.linear(x, weight, bias))`` with the bias and activation fused into the GEMM."""
    return _run("fuseformer.ops.linear_act", x, weight, None, bias, None, activation)


def gated_linear(
    x: Tensor,
    weight_gate: Tensor,
    weight_up: Tensor,
    bias_gate: Tensor | None = None,
    bias_up: Tensor | None = None,
    activation: str = "silu",
) -> Tensor:
    """``act(F.linear(x, weight_gate, bias_gate)) * F.linear(x, weight_up, bias_up)`` as one
    GEMM pass with both products and the gate in its epilogue (SwiGLU: "silu"; GeGLU: "gelu")."""
    if weight_up is None:
        raise TypeError("fuseformer.ops.gated_linear: weight_up must be a tensor, got None")
    return _run("fuseformer.ops.gated_linear", x, weight_gate, weight_up, bias_gate, bias_up, activation)
