"""Linear + cross-entropy fused and chunked: an LM head's loss without its (tokens, vocab) logits.

Public function:
  linear_cross_entropy(x, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                       reduction="mean", softcap=None, chunk_rows=None)
      = F.cross_entropy(z.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                        label_smoothing=label_smoothing, reduction=reduction)
        with z = F.linear(x, weight, bias), or softcap·tanh(z / softcap) with a softcap (Gemma 2's
        final logit softcapping)

x (..., C), weight (V, C), bias (V,), one floating dtype (float64 runs on the "torch" backend);
target (...) integer class indices in [0, V) or ``ignore_index``, x's leading shape. The loss
has x's dtype, as F.cross_entropy's of x's logits; under autocast x, weight and bias are cast
to the autocast dtype as F.linear's are and the loss is float32, as autocast's F.cross_entropy
is. The softmax runs in float32 either way.

How: the kernels make ``chunk_rows`` rows of logits at a time (None: as many as keep a chunk's
logits under 32 MiB on the CPU, 256 MiB on a GPU) and take the loss *and its gradients* in the
same pass, so a chunk's logits are freed before the next chunk's are made. Eager PyTorch keeps
the whole logits tensor, its log-softmax and (in the backward) its gradient: for a GPT-2 head
(V = 50257) at 8 x 1024 tokens that is 1.6 GB per copy in float32. The backward only scales
the saved gradients by the loss's upstream gradient. reduction "none" is not offered: a
per-token upstream gradient cannot be applied to gradients summed in the forward.

Registered ops: "fuseformer::linear_cross_entropy_fwd" (C++ CPU kernel, csrc/cpu/loss.cpp) and
"fuseformer::triton_linear_cross_entropy_fwd" (Triton row kernel and cuBLAS GEMMs,
kernels/loss.py); fake implementations and autograd registered here for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuseformer import _extension, backends
from fuseformer.ops import _checks

Tensor = torch.Tensor

REDUCTIONS = ("mean", "sum")


# ---- the Triton backend as a custom op ----------------------------------------------------


@torch.library.custom_op("fuseformer::triton_linear_cross_entropy_fwd", mutates_args=())
def _triton_linear_cross_entropy_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    mean: bool,
    chunk_rows: int,
    needs_input_grad: bool,
    needs_weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fuseformer.kernels import loss as triton_loss

    return triton_loss.linear_cross_entropy_fwd(x, weight, bias, target, ignore_index, label_smoothing, softcap,
                                                mean, chunk_rows, needs_input_grad, needs_weight_grad)


# ---- fake implementation and autograd, shared by the C++ and Triton ops -------------------


def _fwd_fake(x, weight, bias, target, ignore_index, label_smoothing, softcap, mean, chunk_rows,
              needs_input_grad, needs_weight_grad):
    loss = x.new_empty((), dtype=torch.float32)
    grad_x = x.new_empty(x.shape if needs_input_grad else 0)
    grad_w = weight.new_empty(weight.shape if needs_weight_grad else 0)
    grad_b = x.new_empty(weight.shape[0] if needs_weight_grad and bias is not None else 0, dtype=torch.float32)
    return loss, grad_x, grad_w, grad_b


def _setup_context(ctx, inputs, output):
    _x, _weight, bias, *_ = inputs
    _loss, grad_x, grad_w, grad_b = output
    ctx.save_for_backward(grad_x, grad_w, grad_b)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(grad_x, grad_w, grad_b)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_x, _grad_w, _grad_b):
    grad_x, grad_w, grad_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_loss is None:
        return (None,) * 11
    # The forward took the gradients of the loss itself; the chain rule scales them.
    g = grad_loss.float()
    return (
        (grad_x * g).to(grad_x.dtype) if needs[0] else None,
        (grad_w * g).to(grad_w.dtype) if needs[1] else None,
        (grad_b * g).to(ctx.bias_dtype) if needs[2] and ctx.bias_dtype is not None else None,
        None, None, None, None, None, None, None, None,
    )


torch.library.register_fake("fuseformer::triton_linear_cross_entropy_fwd")(_fwd_fake)
torch.library.register_autograd("fuseformer::triton_linear_cross_entropy_fwd", _backward,
                                setup_context=_setup_context)

if _extension.loaded():
    torch.library.register_fake("fuseformer::linear_cross_entropy_fwd")(_fwd_fake)
    torch.library.register_autograd("fuseformer::linear_cross_entropy_fwd", _backward,
                                    setup_context=_setup_context)


# ---- public API ---------------------------------------------------------------------------

_OP = "fuseformer.ops.linear_cross_entropy"


def _check_args(x, weight, target, bias, ignore_index, label_smoothing, reduction, softcap, chunk_rows) -> None:
    _checks.tensor(x, "x", _OP)
    _checks.float_dtype(x, "x", _OP, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    _checks.tensor(weight, "weight", _OP)
    _checks.same_device(weight, "weight", x, _OP, "x")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{_OP}: weight must be 2-D (vocab, in_features={x.shape[-1]}), got shape {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{_OP}: weight must have at least one row (class), got shape {list(weight.shape)}")
    if bias is not None:
        _checks.tensor(bias, "bias", _OP)
        _checks.same_device(bias, "bias", x, _OP, "x")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{_OP}: bias must have shape [{weight.shape[0]}] (vocab), got {list(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{_OP}: {name} has dtype {_checks.dtype_name(t.dtype)} but x has {_checks.dtype_name(x.dtype)} "
                "(one dtype expected, as F.linear; use autocast for mixed precision)"
            )
    _checks.tensor(target, "target", _OP)
    _checks.same_device(target, "target", x, _OP, "x")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{_OP}: target must hold integer class indices (int64), got dtype {_checks.dtype_name(target.dtype)} "
            "(class probabilities as targets are not supported)"
        )
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{_OP}: target must have x's leading shape {list(x.shape[:-1])}, got {list(target.shape)}"
        )
    if type(ignore_index) is not int:
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        extra = (" (the gradients are summed over the tokens in the forward, so a per-token loss cannot be "
                 "back-propagated; use F.cross_entropy for it)") if reduction == "none" else ""
        raise ValueError(f"{_OP}: reduction must be 'mean' or 'sum', got {reduction!r}{extra}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap > 0):
        raise ValueError(f"{_OP}: softcap must be a positive float or None, got {softcap!r}")
    if chunk_rows is not None and (type(chunk_rows) is not int or chunk_rows < 1):
        raise ValueError(f"{_OP}: chunk_rows must be a positive int or None, got {chunk_rows!r}")


def _torch_linear_cross_entropy(x, weight, target, bias, ignore_index, label_smoothing, reduction, softcap=None):
    """The "torch" backend: PyTorch's own ops (also the reference the tests use)."""
    logits = F.linear(x, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), target, ...)`` over x's leading dimensions,
    without materializing the logits (module docstring)."""
    autocast = isinstance(x, Tensor) and isinstance(weight, Tensor) and torch.is_autocast_enabled(x.device.type)
    if autocast:
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if isinstance(bias, Tensor) else bias
    _check_args(x, weight, target, bias, ignore_index, label_smoothing, reduction, softcap, chunk_rows)
    vocab = weight.shape[0]
    # Targets index the logits' rows: out-of-range values would read outside them.
    _checks.values_hold(
        (target == ignore_index) | ((target >= 0) & (target < vocab)),
        lambda: (f"{_OP}: target values must be class indices in [0, {vocab}) or ignore_index "
                 f"({ignore_index}); got values in [{int(target.min())}, {int(target.max())}]"),
    )
    backend = backends.resolve("linear_cross_entropy", x.device)
    if backend == "torch" or x.numel() == 0:
        # Empty inputs have nothing to fuse: PyTorch's ops give their exact semantics.
        return _torch_linear_cross_entropy(x, weight, target, bias, ignore_index, label_smoothing, reduction, softcap)
    if x.dtype is torch.float64:
        if backends.forced_backend() is not None:
            raise TypeError(
                f"{_OP}: the {backend!r} backend takes float32, float16 or bfloat16 input, got float64 "
                '(float64 runs on the "torch" backend)'
            )
        return _torch_linear_cross_entropy(x, weight, target, bias, ignore_index, label_smoothing, reduction, softcap)
    grad_on = torch.is_grad_enabled()
    needs_input_grad = grad_on and x.requires_grad
    needs_weight_grad = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    op = (torch.ops.fuseformer.triton_linear_cross_entropy_fwd if backend == "triton"
          else torch.ops.fuseformer.linear_cross_entropy_fwd)
    loss, *_grads = op.default(
        x.reshape(-1, x.shape[-1]), weight, bias, target.reshape(-1).long(), ignore_index, float(label_smoothing),
        float(softcap or 0.0), reduction == "mean", chunk_rows or 0, needs_input_grad, needs_weight_grad,
    )
    # F.cross_entropy's dtype: its input's, or float32 under autocast (which runs it in float32).
    return loss if autocast else loss.to(x.dtype)
