"""Quantized linear layers: int8 / int4 weight-only, and W8A8 int8 with dynamic activation scales.

Public functions:
  quantize_weight(weight, scheme, group_size=128, zero_points=True) -> QuantizedWeight
  dequantize_weight(qw, dtype=torch.float32) -> Tensor (N, K)
  quantize_activation(x) -> (qx int8, sx float32): per-row (per-token) symmetric int8
  quantized_linear(x, qw, bias=None)
      weight-only schemes: F.linear(x, dequantize_weight(qw, x.dtype), bias), with the
      dequantization inside the GEMM's main loop; int8_dynamic: sx·sw·(qx · qwᵀ) + bias with an
      int8 GEMM accumulating in int32

Schemes (``SCHEMES``), round-to-nearest:
  "int8_weight_only"  qweight int8 (N, K), symmetric per output row: w = q · s, s = max|w_row| / 127
  "int8_dynamic"      W8A8: the weight as int8_weight_only; each row of x quantized per call to int8
                      with s_x = max|x_row| / 127 (q = round(x / s_x), half to even), the
                      product in int8 x int8 -> int32, then scaled by s_x · s_w
  "fp8"               W8A8 in e4m3 (rowwise): weight codes float8_e4m3fn with s_w = max|w_row| / 448,
                      each row of x likewise per call, the product accumulated in float32 on fp8
                      tensor cores (GPUs sm_89+; elsewhere a clear error)
  "int4_weight_only"  qweight uint8 (N, K/2), two 4-bit codes per byte along K (k even in the low
                      nibble, k odd in the high one), groups of ``group_size`` along K:
                      w = (u - z) · s; with zero points s = (max - min) / 15 and z = round(-min / s)
                      per group (asymmetric), else z = 8 and s = max|w| / 7 (symmetric, codes 1-15)
Scales are float32 (N, K / group) (int8: one group of K); zeros uint8 (N, K / group) (int4
with zero points only). Activations float32 / float16 / bfloat16; accumulation in float32.

Backends: "cpu" (C++: GEMV/GEMM with the dequantization in the inner loop for up to 10 rows,
vectorized int8/int4 -> float32 conversion, parallel over output rows; above, the weight
dequantized once per call and oneDNN's GEMM; csrc/cpu/quant.cpp),
"triton" (weight-only GEMM with the dequantization in the main loop, kernels/quant.py), "torch"
(dequantize, then F.linear: the reference). Inference only: no gradient flows to the
quantized weight (the input gets one, through the float reference's formula).

Registered ops: "fuseformer::quantized_linear" (C++) and "fuseformer::triton_quantized_linear",
with fake implementations and the input's autograd.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fuseformer import _extension, backends
from fuseformer.ops import _checks

Tensor = torch.Tensor

SCHEMES = ("int8_weight_only", "int4_weight_only", "int8_dynamic", "fp8")
GROUP_SIZES = (32, 64, 128, 256)
_BITS = {"int8_weight_only": 8, "int4_weight_only": 4, "int8_dynamic": 8, "fp8": 8}
# Rounding to the nearest integer, half to even, by the float32 magic number 1.5·2^23 (exact
# for |v| < 2^22): what every backend's activation quantizer does, so their codes agree.
_ROUND = 12582912.0


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized (N, K) weight: codes, float32 scales, optional zero points."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    scheme: str
    group_size: int  # along K; int8 per channel: K
    shape: tuple[int, int]

    @property
    def bits(self) -> int:
        return _BITS[self.scheme]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def _check_scheme(scheme: object, op: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"{op}: scheme must be one of {', '.join(map(repr, SCHEMES))}; got {scheme!r}")
    return scheme


def quantize_weight(weight: Tensor, scheme: str, group_size: int = 128, zero_points: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of a (N, K) weight (computed in float32)."""
    op = "fuseformer.ops.quantize_weight"
    _check_scheme(scheme, op)
    _checks.tensor(weight, "weight", op)
    _checks.float_dtype(weight, "weight", op, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{op}: weight must be a non-empty 2-D (out_features, in_features) tensor, got "
                         f"{list(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().float()
    if scheme == "fp8":
        scales = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w / scales).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
        return QuantizedWeight(q, scales, None, scheme, k, (n, k))
    if scheme in ("int8_weight_only", "int8_dynamic"):
        scales = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(q, scales, None, scheme, k, (n, k))
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{op}: in_features {k} is not a multiple of group_size {group_size}; pick a group size "
                         f"that divides it")
    groups = w.view(n, k // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if zero_points:
        lo, hi = groups.amin(dim=2, keepdim=True).clamp(max=0), groups.amax(dim=2, keepdim=True).clamp(min=0)
        scales = ((hi - lo) / 15.0).clamp_min(tiny)
        zeros = torch.round(-lo / scales).clamp_(0, 15)
    else:
        scales = (groups.abs().amax(dim=2, keepdim=True) / 7.0).clamp_min(tiny)
        zeros = torch.full_like(scales, 8.0)
    codes = (torch.round(groups / scales) + zeros).clamp_(0, 15).to(torch.uint8).view(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return QuantizedWeight(packed.contiguous(), scales.view(n, -1).contiguous(),
                           zeros.view(n, -1).to(torch.uint8).contiguous() if zero_points else None,
                           scheme, group_size, (n, k))


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, K) weight the codes stand for, in ``dtype`` (computed in float32; float64 for
    a float64 dtype)."""
    n, k = qw.shape
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if qw.bits == 8:
        return (qw.qweight.to(work) * qw.scales.to(work)).to(dtype)
    codes = torch.stack([qw.qweight & 15, qw.qweight >> 4], dim=-1).view(n, k).to(work)
    zeros = qw.zeros.to(work) if qw.zeros is not None else torch.full_like(qw.scales, 8.0, dtype=work)
    g = qw.group_size
    w = (codes.view(n, k // g, g) - zeros.view(n, -1, 1)) * qw.scales.to(work).view(n, -1, 1)
    return w.view(n, k).to(dtype)


def quantize_activation(x: Tensor, kind: str = "int8") -> tuple[Tensor, Tensor]:
    """Per-row symmetric 8-bit codes (M, K) and float32 scales (M,): int8 with s = max|x_row| /
    127 (half to even), or "fp8" (e4m3) with s = max|x_row| / 448 (round to nearest). A zero row
    gets the smallest normal scale and zero codes. The reference of the kernels' quantizers."""
    if kind not in ("int8", "fp8"):
        raise ValueError(f"fuseformer.ops.quantize_activation: kind must be 'int8' or 'fp8', got {kind!r}")
    xf = x.float()
    qmax = 448.0 if kind == "fp8" else 127.0
    scales = (xf.abs().amax(dim=-1) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    v = xf / scales[..., None]
    if kind == "fp8":
        return v.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scales
    return (((v + _ROUND) - _ROUND).clamp_(-127, 127)).to(torch.int8), scales


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10·log10(‖ref‖² / ‖ref - approx‖²), in dB."""
    ref, approx = reference.double(), approximation.double()
    noise = (ref - approx).square().sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(ref.square().sum() / noise).item()


# ---- the Triton backend as a custom op -----------------------------------------------------


@torch.library.custom_op("fuseformer::triton_quantized_linear", mutates_args=())
def _triton_quantized_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                             bits: int, group_size: int) -> Tensor:
    from fuseformer.kernels import quant as triton_quant

    return triton_quant.quantized_linear(x, qweight, scales, zeros, bias, bits, group_size)


def _quantized_linear_fake(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.group_size, ctx.k, ctx.dtype = bits, group_size, x.shape[1], x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    # dX = g · W (the dequantized weight); the codes and scales get no gradient.
    qweight, scales, zeros = ctx.saved_tensors
    scheme = "int8_weight_only" if ctx.bits == 8 else "int4_weight_only"  # the same dequantization
    w = dequantize_weight(QuantizedWeight(qweight, scales, zeros, scheme, ctx.group_size, (qweight.shape[0], ctx.k)),
                          grad_out.dtype)
    grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return grad_out @ w, None, None, None, grad_bias, None, None


torch.library.register_fake("fuseformer::triton_quantized_linear")(_quantized_linear_fake)
torch.library.register_autograd("fuseformer::triton_quantized_linear", _backward, setup_context=_setup_context)
if _extension.loaded():
    torch.library.register_fake("fuseformer::quantized_linear")(_quantized_linear_fake)
    torch.library.register_autograd("fuseformer::quantized_linear", _backward, setup_context=_setup_context)


@torch.library.custom_op("fuseformer::triton_w8a8_linear", mutates_args=())
def _triton_w8a8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    from fuseformer.kernels import quant as triton_quant

    return triton_quant.w8a8_linear(x, qweight, scales, bias)


def _int8_dynamic_fake(x, qweight, scales, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _dynamic_setup_context(ctx, inputs, output):
    x, qweight, scales, bias = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.has_bias = bias is not None


def _dynamic_backward(ctx, grad_out):
    # dX = g · W with W the dequantized weight (the activation rounding passes the gradient
    # straight through, as quantization-aware training does).
    qweight, scales = ctx.saved_tensors
    w = (qweight.float() * scales).to(grad_out.dtype)
    grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_out @ w, None, None, grad_bias


torch.library.register_fake("fuseformer::triton_w8a8_linear")(_int8_dynamic_fake)
torch.library.register_autograd("fuseformer::triton_w8a8_linear", _dynamic_backward, setup_context=_dynamic_setup_context)
if _extension.loaded():
    torch.library.register_fake("fuseformer::int8_dynamic_linear")(_int8_dynamic_fake)
    torch.library.register_autograd("fuseformer::int8_dynamic_linear", _dynamic_backward,
                                    setup_context=_dynamic_setup_context)


def _torch_w8a8(x: Tensor, qw: QuantizedWeight, bias: Tensor | None) -> Tensor:
    """The reference: the same activation codes, the product exact (float64 holds every int8
    or e4m3 product sum)."""
    qx, sx = quantize_activation(x, "fp8" if qw.scheme == "fp8" else "int8")
    acc = qx.double() @ qw.qweight.double().t()
    out = acc * sx.double()[..., None] * qw.scales.double().view(-1)
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def _fp8_backend(backend: str, device: torch.device, op: str) -> str:
    """fp8 runs on GPUs with fp8 tensor cores (sm_89+) through Triton; elsewhere only the
    emulated reference, and only when the "torch" backend is forced (for accuracy studies)."""
    if backend == "torch" and backends.forced_backend() == "torch":
        return backend
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        if backend == "cpu" or (backend == "cuda" and backends.forced_backend() is None):
            return "triton"
        return backend
    where = f"sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}" if device.type == "cuda" else "a CPU"
    raise ValueError(f"{op}: the fp8 scheme needs a GPU with fp8 tensor cores (sm_89+: Ada, Hopper), not {where}; "
                     'use int8_dynamic there, or fuseformer.use_backend("torch") for the emulated reference')


# ---- public API ---------------------------------------------------------------------------


def quantized_linear(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, dequantize_weight(qw, x.dtype), bias)`` with the dequantization fused into
    the GEMM (x of any leading shape)."""
    op = "fuseformer.ops.quantized_linear"
    _checks.tensor(x, "x", op)
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{op}: qw must be a fuseformer.ops.QuantizedWeight (from quantize_weight), got "
                        f"{type(qw).__name__}")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    _checks.float_dtype(x, "x", op, allowed=(*_checks.FLOAT_DTYPES, torch.float64))
    n, k = qw.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must have in_features={k} as its last dimension, got shape {list(x.shape)}")
    _checks.same_device(qw.qweight, "qw", x, op, "x")
    if bias is not None:
        _checks.tensor(bias, "bias", op)
        _checks.same_device(bias, "bias", x, op, "x")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{op}: bias must have shape [{n}] (out_features), got {list(bias.shape)}")
        bias = bias.to(x.dtype)
    backend = backends.resolve("quant", x.device)
    if backend != "torch" and (x.dtype == torch.float64 or x.numel() == 0):
        if backends.forced_backend() is not None and x.dtype == torch.float64:
            raise TypeError(f'{op}: the {backend!r} backend takes float32, float16 or bfloat16 x, got float64 '
                            '(float64 runs on the "torch" backend)')
        backend = "torch"
    if qw.scheme == "fp8":
        backend = _fp8_backend(backend, x.device, op)
    if qw.scheme in ("int8_dynamic", "fp8"):
        if backend == "cuda":
            if backends.forced_backend() is not None:
                runs = '"triton" and "torch"' if qw.scheme == "fp8" else '"triton", "cpu" and "torch"'
                raise ValueError(f'{op}: the "cuda" backend has no {qw.scheme} kernel (it runs on {runs})')
            backend = "triton"
        if backend == "torch":
            return _torch_w8a8(x, qw, bias)
        fwd = (torch.ops.fuseformer.triton_w8a8_linear if backend == "triton"
               else torch.ops.fuseformer.int8_dynamic_linear)
        return fwd(x.reshape(-1, k), qw.qweight, qw.scales, bias).view(*x.shape[:-1], n)
    if backend == "torch":
        return F.linear(x, dequantize_weight(qw, x.dtype), bias)
    fwd = torch.ops.fuseformer.triton_quantized_linear if backend == "triton" else torch.ops.fuseformer.quantized_linear
    out = fwd(x.reshape(-1, k), qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size)
    return out.view(*x.shape[:-1], n)
