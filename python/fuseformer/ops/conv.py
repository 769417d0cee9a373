"""2-D convolution with the bias, an optional residual add and the activation fused.

Public functions:
  conv2d_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
             activation="relu", residual=None)
      = act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)
  conv2d_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5,
                stride=1, padding=0, dilation=1, groups=1, activation="relu", residual=None)
      = act(F.batch_norm(F.conv2d(x, weight, bias, ...), running_mean, running_var, bn_weight,
                         bn_bias, training=False, eps=eps) + residual)
      with the BatchNorm folded into the convolution (inference: ConvBNAct in eval mode).

Arguments as F.conv2d's (padding may be "valid" or "same"); activations as
fuseformer.ops.linear_act's. x (N, C, H, W) in NCHW or channels-last; the output keeps x's
memory format. Dtypes: float32, float16, bfloat16, one dtype for all tensors (autocast casts
as it does for F.conv2d); float64 runs on the reference.

Backends: "cpu" (csrc/cpu/conv.cpp: for inference in float32 one oneDNN convolution with the
bias, residual and activation as post-ops and the weight packed once and cached; otherwise
ATen's convolution, then one fused pass for bias + residual + activation), "triton"
(implicit-GEMM forward with the epilogue fused, groups = 1, kernels/conv.py), "torch" (the
reference). For the backward the kernels save act', which it multiplies into the upstream
gradient before ATen's convolution_backward; except for "relu" and "none", whose derivative
is read off the output (out > 0) or is 1, so their training forward writes no more than
inference does (on the CPU: the same single oneDNN call). conv2d_bn_act folds the BatchNorm
into the weight and bias (float arithmetic, differentiably) and calls conv2d_act; on the CPU,
without gradients, the C++ op folds it and caches the folded, packed weight.

Registered ops: "fuseformer::conv2d_act_fwd" (C++; its autograd in C++, csrc/autograd/conv.cpp,
the same formula) and "fuseformer::triton_conv2d_act_fwd" (Triton; the autograd formula
below), each with a fake implementation;
"fuseformer::conv2d_bn_act_fwd" (C++ CPU) with a fake implementation and an autograd formula
that differentiates the folded form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuseformer import _extension, backends
from fuseformer.ops import _checks
from fuseformer.ops.linear import ACTIVATIONS, activation_fn

Tensor = torch.Tensor


def _out_format(x: Tensor) -> torch.memory_format:
    """The memory format of the output: x's, as ATen's convolution chooses it."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _out_shape(x, weight, stride, padding, dilation):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return (n, k, p, q)


# ---- the Triton backend as a custom op -----------------------------------------------------


@torch.library.custom_op("fuseformer::triton_conv2d_act_fwd", mutates_args=())
def _triton_conv2d_act_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str,
    save: bool,
) -> tuple[Tensor, Tensor]:
    from fuseformer.kernels import conv as triton_conv
    from fuseformer.kernels.linear import ACTIVATIONS as CODES

    return triton_conv.conv2d_act_fwd(x, weight, bias, residual, stride, padding, dilation, CODES[activation], save,
                                      _out_format(x))


def _conv_fwd_fake(x, weight, bias, residual, stride, padding, dilation, groups, activation, save):
    shape = _out_shape(x, weight, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))
    return out, (torch.empty_like(out) if save else x.new_empty(0))


def saves_act_grad(activation: str) -> bool:
    """Whether the forward must write act' for the backward (relu's is out > 0, none's 1)."""
    return activation not in ("none", "relu")


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, activation, save = inputs
    out, saved = output
    if not save and saves_act_grad(activation):
        raise RuntimeError(f"fuseformer conv2d_act: the gradient through activation {activation!r} needs the op "
                           "called with save=True (fuseformer.ops.conv2d_act passes it when an input requires grad)")
    ctx.save_for_backward(x, weight, saved if save else (out if activation == "relu" else None))
    ctx.act_grad_saved = save
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.activation = activation
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the save (output-sized)


def _conv_backward(ctx, grad_out, _grad_saved):
    x, weight, saved = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    if ctx.activation == "none":
        dz = grad_out
    elif ctx.act_grad_saved:
        dz = grad_out * saved
    else:  # relu: saved is the output
        dz = torch.ops.aten.threshold_backward(grad_out, saved, 0)
    needs = ctx.needs_input_grad
    want_bias = ctx.has_bias and needs[2]
    half = grad_out.dtype != torch.float32
    # float32: the bias gradient comes out of ATen's convolution backward (oneDNN/cuDNN sum it
    # in the same pass). Half dtypes: summed from the float product instead of the rounded dz,
    # one rounding fewer than dz carries.
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        dz, x, weight, [weight.shape[0]] if want_bias and not half else None, stride, padding, dilation, False,
        [0, 0], groups, [needs[0], needs[1], want_bias and not half],
    )
    if want_bias and half:
        # relu / none: dz is grad_out or zero, exact in any dtype
        full = grad_out.float() * saved.float() if ctx.act_grad_saved else dz.float()
        grad_b = full.sum((0, 2, 3)).to(grad_out.dtype)
    elif not want_bias:
        grad_b = None
    grad_r = dz if ctx.has_residual and needs[3] else None
    return grad_x, grad_w, grad_b, grad_r, None, None, None, None, None, None


def fold_batch_norm(weight: Tensor, bias: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
                    running_mean: Tensor, running_var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The convolution's weight and bias with an eval-mode BatchNorm folded in (differentiable):
    scale = bn_weight / sqrt(running_var + eps); weight * scale per output channel;
    (bias - running_mean) * scale + bn_bias."""
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -running_mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    folded = weight * scale.to(weight.dtype)[:, None, None, None]
    folded_bias = shift if bias is None else bias * scale + shift
    return folded, folded_bias.to(weight.dtype)


def _bn_fwd_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding,
                 dilation, groups, activation):
    shape = _out_shape(x, weight, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x))


def _bn_setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, *rest = inputs
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual)
    ctx.eps, ctx.rest = eps, rest


def _bn_backward(ctx, grad_out):
    # The op serves inference (conv2d_bn_act takes the differentiable fold when gradients are
    # wanted); its gradient is that of the folded form, recomputed here.
    saved = ctx.saved_tensors
    stride, padding, dilation, groups, activation = ctx.rest
    differentiable = (0, 1, 2, 3, 4, 8)  # x, weight, bias, bn_weight, bn_bias, residual
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(ctx.needs_input_grad[i]) if t is not None and i in differentiable
                  else t for i, t in zip((0, 1, 2, 3, 4, 5, 6, 8), saved)]
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual = leaves
        folded, folded_bias = fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, ctx.eps)
        z = F.conv2d(x, folded, folded_bias, stride, padding, dilation, groups)
        if residual is not None:
            z = z + residual
        y = activation_fn(activation)(z)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_out, allow_unused=True) if wanted else ())
    by_slot = {i: (next(grads) if t is not None and t.requires_grad else None)
               for i, t in zip((0, 1, 2, 3, 4, 5, 6, 8), leaves)}
    return tuple(by_slot.get(i) for i in range(14))


torch.library.register_fake("fuseformer::triton_conv2d_act_fwd")(_conv_fwd_fake)
torch.library.register_autograd("fuseformer::triton_conv2d_act_fwd", _conv_backward, setup_context=_conv_setup_context)
if _extension.loaded():
    torch.library.register_fake("fuseformer::conv2d_act_fwd")(_conv_fwd_fake)  # autograd: csrc/autograd/conv.cpp
    torch.library.register_fake("fuseformer::conv2d_bn_act_fwd")(_bn_fwd_fake)
    torch.library.register_autograd("fuseformer::conv2d_bn_act_fwd", _bn_backward, setup_context=_bn_setup_context)


# ---- public API ---------------------------------------------------------------------------


def _pair(value, name: str, op: str, minimum: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {tuple(value)}")
    return [int(v) for v in value]


def _padding(padding, weight, dilation, stride, op) -> list[int] | None:
    """Explicit padding, or None for a 'same' that needs asymmetric padding (reference path)."""
    if padding == "valid":
        return [0, 0]
    if padding == "same":
        if stride != [1, 1]:
            raise ValueError(f"{op}: padding='same' needs stride 1 (as F.conv2d), got stride {tuple(stride)}")
        total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
        return [t // 2 for t in total] if all(t % 2 == 0 for t in total) else None
    if isinstance(padding, str):
        raise ValueError(f"{op}: padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    return _pair(padding, "padding", op, 0)


def _route(backend: str, x: Tensor, pad, groups: int, save: bool, op: str) -> str:
    """The backend that runs this call: ``backend`` unless it cannot take it (an error when
    forced; the reference otherwise), or, on the CPU unforced, where the C++ kernels lose."""
    if backend == "cpu" and backends.forced_backend() is None and (save or x.dtype != torch.float32):
        # Measured (benchmarks/results/cpu/conv.md): the oneDNN path (float32 inference) beats
        # eager; training (ATen's convolution + our pass + ATen's backward) does not.
        return "torch"
    if backend != "torch":
        why = None
        if x.dtype == torch.float64:
            why = "takes float32, float16 or bfloat16 (float64 runs on the \"torch\" backend)"
        elif pad is None:
            why = "takes symmetric padding ('same' with an even dilated kernel needs the \"torch\" backend)"
        elif backend == "triton" and groups != 1:
            why = "takes groups=1 (grouped and depthwise convolutions run on \"cpu\" or \"torch\")"
        elif x.numel() == 0:
            why = "takes non-empty input"
        if why is not None:
            if backends.forced_backend() is not None:
                raise ValueError(f"{op}: the {backend!r} backend {why}")
            return "torch"
    return backend


def _check_conv(op, x, weight, bias, residual, stride, padding, dilation, groups, activation):
    """Validated (x, weight, bias, residual, stride, pad, dilation) after autocast; pad is None
    for a 'same' padding only the reference takes."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
    _checks.tensor(x, "x", op)
    _checks.tensor(weight, "weight", op)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        residual = residual.to(dtype) if residual is not None else None
    _checks.float_dtype(x, "x", op, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {list(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D (out_channels, in_channels/groups, kH, kW), got {list(weight.shape)}")
    _checks.same_device(weight, "weight", x, op, "x")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"{op}: groups must be a positive int dividing in_channels {x.shape[1]} and "
                         f"out_channels {weight.shape[0]}, got {groups!r}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"{op}: weight expects {weight.shape[1] * groups} input channels (in_channels/groups="
                         f"{weight.shape[1]}, groups={groups}) but x has {x.shape[1]}")
    stride = _pair(stride, "stride", op, 1)
    dilation = _pair(dilation, "dilation", op, 1)
    pad = _padding(padding, weight, dilation, stride, op)
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t is not weight:
            _checks.tensor(t, name, op)
            _checks.same_device(t, name, x, op, "x")
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {_checks.dtype_name(t.dtype)} but x has "
                            f"{_checks.dtype_name(x.dtype)} (one dtype expected, as F.conv2d)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape [{weight.shape[0]}] (out_channels), got {list(bias.shape)}")
    if pad is not None:
        out_shape = _out_shape(x, weight, stride, pad, dilation)
        if min(out_shape[2:]) < 1:
            raise ValueError(f"{op}: the output would be empty ({list(out_shape)}): the input is smaller than the "
                             "dilated kernel after padding")
        if residual is not None and tuple(residual.shape) != out_shape:
            raise ValueError(f"{op}: residual must have the output's shape {list(out_shape)}, got {list(residual.shape)}")
    return x, weight, bias, residual, stride, pad, dilation


def _int_pair(value, minimum: int) -> list[int] | None:
    if type(value) is int:
        return [value, value] if value >= minimum else None
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return [value[0], value[1]] if value[0] >= minimum and value[1] >= minimum else None
    return None


def _plainly_valid(x, weight, bias, residual, stride, padding, dilation, groups):
    """(stride, pad, dilation) for the common case, checked in a few comparisons (a module's
    call pays the checks each time: _check_conv's ~6 us is 2% of a 0.3 ms convolution); None
    sends the call through _check_conv, which explains what is wrong or accepts it."""
    if (type(weight) not in _checks.PARAM_TYPES or x.dim() != 4 or weight.dim() != 4
            or type(groups) is not int or groups < 1):
        return None
    dtype = x.dtype
    if dtype not in _checks.FLOAT_DTYPES or weight.dtype is not dtype or not _checks.on_device_of(weight, x):
        return None
    k = weight.shape[0]
    if weight.shape[1] * groups != x.shape[1] or k % groups:
        return None
    stride, pad, dilation = _int_pair(stride, 1), _int_pair(padding, 0), _int_pair(dilation, 1)
    if stride is None or pad is None or dilation is None:
        return None
    if bias is not None and (type(bias) not in _checks.PARAM_TYPES or bias.dtype is not dtype or bias.dim() != 1
                             or bias.shape[0] != k or not _checks.on_device_of(bias, x)):
        return None
    out_shape = _out_shape(x, weight, stride, pad, dilation)
    if out_shape[2] < 1 or out_shape[3] < 1:
        return None
    if residual is not None and (type(residual) is not Tensor or residual.dtype is not dtype
                                 or residual.shape != out_shape or not _checks.on_device_of(residual, x)):
        return None
    return stride, pad, dilation


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv2d_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: str = "relu",
    residual: Tensor | None = None,
) -> Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` with the
    bias, residual and activation fused into the convolution's output pass."""
    op = "fuseformer.ops.conv2d_act"
    plain = None
    if (type(x) is Tensor and activation in ACTIVATIONS
            and not torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type)):
        plain = _plainly_valid(x, weight, bias, residual, stride, padding, dilation, groups)
    if plain is not None:
        stride, pad, dilation = plain
    else:
        x, weight, bias, residual, stride, pad, dilation = _check_conv(op, x, weight, bias, residual, stride,
                                                                       padding, dilation, groups, activation)
    training = _wants_grad(x, weight, bias, residual)
    backend = _route(backends.resolve("conv", x.device), x, pad, groups, training, op)
    if backend == "torch":
        z = F.conv2d(x, weight, bias, stride, padding if pad is None else pad, dilation, groups)
        if residual is not None:
            z = z + residual
        return activation_fn(activation)(z)
    fwd = torch.ops.fuseformer.triton_conv2d_act_fwd if backend == "triton" else torch.ops.fuseformer.conv2d_act_fwd
    out, _saved = fwd(x, weight, bias, residual, stride, pad, dilation, groups, activation,
                      training and saves_act_grad(activation))
    return out


def conv2d_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float = 1e-5,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: str = "relu",
    residual: Tensor | None = None,
) -> Tensor:
    """``act(batch_norm(conv2d(x, weight, bias), running statistics) + residual)``: an eval-mode
    BatchNorm folded into the convolution. Arguments as conv2d_act's and F.batch_norm's."""
    op = "fuseformer.ops.conv2d_bn_act"
    k = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() >= 1 else None
    for name, t, required in (("running_mean", running_mean, True), ("running_var", running_var, True),
                              ("bn_weight", bn_weight, False), ("bn_bias", bn_bias, False)):
        if t is None and not required:
            continue
        _checks.tensor(t, name, op)
        if k is not None and tuple(t.shape) != (k,):
            raise ValueError(f"{op}: {name} must have shape [{k}] (out_channels), got {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {_checks.dtype_name(t.dtype)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")
    eps = float(eps)
    if not _wants_grad(x, weight, bias, bn_weight, bn_bias, residual):
        x_, weight_, bias_, residual_, stride_, pad, dilation_ = _check_conv(
            op, x, weight, bias, residual, stride, padding, dilation, groups, activation)
        backend = _route(backends.resolve("conv", x_.device), x_, pad, groups, False, op)
        if backend == "cpu" and x_.dtype == torch.float32:
            for name, t in (("running_mean", running_mean), ("running_var", running_var), ("bn_weight", bn_weight),
                            ("bn_bias", bn_bias)):
                if t is not None:
                    _checks.same_device(t, name, x_, op, "x")
            return torch.ops.fuseformer.conv2d_bn_act_fwd(x_, weight_, bias_, bn_weight, bn_bias, running_mean,
                                                          running_var, eps, residual_, stride_, pad, dilation_, groups,
                                                          activation)
    folded, folded_bias = fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return conv2d_act(x, folded, folded_bias, stride, padding, dilation, groups, activation, residual)
