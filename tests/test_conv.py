"""conv2d_act: every backend available here against the float64 PyTorch reference (output
and the gradients of x, weight, bias, residual) over strides, padding, dilation, groups,
1x1 and stem shapes, NCHW and channels-last; the modules (Conv2dAct, ConvBNAct with BatchNorm
folded), compile, opcheck; bad input.

bf16 on the Triton backend runs only on CUDA: the interpreter computes bf16 dots wrongly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fuseformer
from fuseformer.ops.linear import activation_fn
from accuracy import assert_matches_reference, backend_device_pairs

PAIRS = backend_device_pairs("conv")
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]

# (x shape, out channels, kernel, stride, padding, dilation, groups)
SHAPES = [
    ((2, 8, 9, 11), 12, 3, 1, 1, 1, 1),
    ((2, 8, 9, 11), 12, 3, 2, 1, 1, 1),
    ((1, 3, 16, 16), 16, 7, 2, 3, 1, 1),  # ResNet stem
    ((2, 16, 8, 8), 24, 1, 1, 0, 1, 1),  # 1x1
    ((2, 6, 10, 10), 10, 3, 1, 2, 2, 1),  # dilated
    ((2, 8, 7, 7), 8, 3, 1, 1, 1, 2),  # grouped (not on Triton)
    ((1, 4, 5, 5), 1, 5, 1, 0, 1, 1),  # one output element
]
ACTS = ["relu", "silu", "gelu", "none", "gelu_tanh", "relu2", "relu"]


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" or backend != "triton" else [])


def _out_elements(case) -> int:
    (n, _, h, w), k, r, stride, pad, dil, _ = case
    p = (h + 2 * pad - dil * (r - 1) - 1) // stride + 1
    q = (w + 2 * pad - dil * (r - 1) - 1) // stride + 1
    return n * k * p * q


def reference_cases():
    # Results of a handful of elements are a few roundings each in half precision, so their
    # ratio to PyTorch's error is chance: the one-element case runs in float32.
    out = []
    for b, d in PAIRS:
        for i, case in enumerate(SHAPES):
            if b == "triton" and case[-1] != 1:
                continue
            for dt in dtypes_for(b, d):
                if dt != torch.float32 and _out_elements(case) < 32:
                    continue
                for layout in ("nchw", "nhwc"):
                    out.append(pytest.param(b, d, dt, case, ACTS[i], layout,
                                            id=f"{b}-{d}-{str(dt)[6:]}-case{i}-{ACTS[i]}-{layout}"))
    return out


def make_inputs(case, dtype, device, layout, with_residual, bias=True):
    shape, k, r, stride, pad, dil, groups = case
    x = torch.randn(shape, device=device)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = shape[1] // groups * r * r
    w = torch.randn(k, shape[1] // groups, r, r, device=device) / fan_in**0.5
    tensors = [x.to(dtype), w.to(dtype), torch.randn(k, device=device).to(dtype) if bias else None]
    if with_residual:
        out_shape = F.conv2d(x[:, :, :, :], w, None, stride, pad, dil, groups).shape
        tensors.append(torch.randn(out_shape, device=device).to(dtype))
    else:
        tensors.append(None)
    for t in tensors:
        if t is not None:
            t.requires_grad_()
    return tensors


def reference(tensors, case, activation):
    x, w, b, res = tensors
    _, _, _, stride, pad, dil, groups = case
    z = F.conv2d(x, w, b, stride, pad, dil, groups)
    return activation_fn(activation)(z + res if res is not None else z)


def check(backend, tensors, case, activation):
    _, _, _, stride, pad, dil, groups = case
    x, w, b, res = tensors
    with fuseformer.use_backend(backend):
        out = fuseformer.ops.conv2d_act(x, w, b, stride, pad, dil, groups, activation, res)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(out)
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, g)
    t64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    ref = reference(t64, case, activation)
    ref_grads = torch.autograd.grad(ref, [t for t in t64 if t is not None and t.requires_grad], g.double())
    low = reference(tensors, case, activation)
    low_grads = torch.autograd.grad(low, leaves, g)
    assert_matches_reference("out", out.detach(), ref.detach(), low.detach())
    names = [n for n, t in zip(["x", "weight", "bias", "residual"], tensors) if t is not None and t.requires_grad]
    for name, a, r, lo in zip(names, grads, ref_grads, low_grads):
        assert_matches_reference(f"grad {name}", a, r, lo)


@pytest.mark.parametrize("backend,device,dtype,case,activation,layout", reference_cases())
def test_matches_reference(poison_outputs, backend, device, dtype, case, activation, layout):
    tensors = make_inputs(case, dtype, device, layout, with_residual=layout == "nhwc")
    check(backend, tensors, case, activation)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_without_bias_and_frozen_weights(backend, device):
    case = SHAPES[0]
    tensors = make_inputs(case, torch.float32, device, "nchw", with_residual=False, bias=False)
    tensors[1].requires_grad_(False)
    check(backend, tensors, case, "gelu")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_padding_strings(backend, device):
    x = torch.randn(1, 4, 8, 8, device=device)
    for kernel, padding in ((3, "same"), (3, "valid"), (4, "same")):
        w = torch.randn(6, 4, kernel, kernel, device=device)
        expected = F.relu(F.conv2d(x, w, None, 1, padding))
        if kernel == 4:  # asymmetric 'same': the kernels do not take it; unforced, the reference runs
            torch.testing.assert_close(fuseformer.ops.conv2d_act(x, w, padding=padding), expected)
            with fuseformer.use_backend(backend), pytest.raises(ValueError, match="symmetric padding"):
                fuseformer.ops.conv2d_act(x, w, padding=padding)
            continue
        with fuseformer.use_backend(backend):
            torch.testing.assert_close(fuseformer.ops.conv2d_act(x, w, padding=padding), expected)


def test_grouped_convolution_on_triton_is_a_clear_error():
    if ("triton", "cpu") not in PAIRS:
        pytest.skip("Triton interpreter not available")
    case = SHAPES[5]
    x, w, b, _ = make_inputs(case, torch.float32, "cpu", "nchw", with_residual=False)
    with fuseformer.use_backend("triton"), pytest.raises(ValueError, match="groups=1"):
        fuseformer.ops.conv2d_act(x, w, b, padding=1, groups=2)
    # Unforced, the default backend takes it.
    torch.testing.assert_close(fuseformer.ops.conv2d_act(x, w, b, padding=1, groups=2),
                               F.relu(F.conv2d(x, w, b, 1, 1, 1, 2)))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_opcheck(backend, device):
    fwd = (torch.ops.fuseformer.triton_conv2d_act_fwd if backend == "triton"
           else torch.ops.fuseformer.conv2d_act_fwd).default
    for layout in ("nchw", "nhwc"):
        x, w, b, res = make_inputs(SHAPES[0], torch.float32, device, layout, with_residual=True)
        torch.library.opcheck(fwd, (x, w, b, res, [1, 1], [1, 1], [1, 1], 1, "silu", True))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_compiles_fullgraph(backend, device):
    x, w, b, res = make_inputs(SHAPES[1], torch.float32, device, "nhwc", with_residual=True)

    def block(x, w, b, res):
        return fuseformer.ops.conv2d_act(x, w, b, 2, 1, 1, 1, "relu", res).sum((2, 3))

    with fuseformer.use_backend(backend):
        y = torch.compile(block, fullgraph=True)(x, w, b, res)
        y_ref = block(x, w, b, res)
    torch.testing.assert_close(y, y_ref)
    for a, r in zip(torch.autograd.grad(y.sum(), [x, w, b, res]), torch.autograd.grad(y_ref.sum(), [x, w, b, res])):
        torch.testing.assert_close(a, r)


# ---- modules ------------------------------------------------------------------------------


def test_conv2d_act_module_is_a_drop_in():
    theirs = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect")
    ours = fuseformer.nn.Conv2dAct(8, 16, 3, stride=2, padding=1, padding_mode="reflect", activation="silu")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(ours(x), F.silu(theirs(x)))
    assert "activation='silu'" in repr(ours)


def _conv_bn(ours):
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(16)
    conv.load_state_dict(ours.conv.state_dict())
    return conv, bn


def test_conv_bn_act_folds_batchnorm_in_eval():
    torch.manual_seed(0)
    ours = fuseformer.nn.ConvBNAct(8, 16, 3, padding=1)
    conv, bn = _conv_bn(ours)
    # Train a few steps so BatchNorm's running statistics and affine parameters are not trivial.
    for _ in range(3):
        x = torch.randn(4, 8, 9, 9) * 2 + 0.5
        ours(x).sum().backward()
        F.relu(bn(conv(x))).sum().backward()
    with torch.no_grad():
        bn.weight.copy_(ours.bn.weight)
        bn.bias.copy_(ours.bn.bias)
    torch.testing.assert_close(bn.running_mean, ours.bn.running_mean)
    ours.eval(), conv.eval(), bn.eval()
    x = torch.randn(2, 8, 9, 9).double()
    ref = F.relu(bn.double()(conv.double()(x)))
    torch.testing.assert_close(ours.double()(x), ref, rtol=1e-12, atol=1e-12)  # folding is exact
    x32 = x.float()
    low = F.relu(bn.float()(conv.float()(x32)))
    assert_matches_reference("folded fp32", ours.float()(x32), ref, low)
    assert set(ours.state_dict()) == {f"conv.{k}" for k in conv.state_dict()} | {f"bn.{k}" for k in bn.state_dict()}


# ---- bad input ----------------------------------------------------------------------------

_x, _w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
BAD = [
    (lambda: fuseformer.ops.conv2d_act(_x[0], _w), ValueError, "x must be 4-D"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w[0]), ValueError, "weight must be 4-D"),
    (lambda: fuseformer.ops.conv2d_act(_x, torch.randn(6, 3, 3, 3)), ValueError, "expects 3 input channels"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, torch.randn(5)), ValueError, r"bias must have shape \[6\]"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w.half()), TypeError, "weight has dtype float16"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, stride=0), ValueError, "stride must be >= 1"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, padding="full"), ValueError, "padding must be 'valid', 'same'"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, stride=2, padding="same"), ValueError, "needs stride 1"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, activation="tanh"), ValueError, "activation must be one of"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, groups=3), ValueError, "groups must be a positive int"),
    (lambda: fuseformer.ops.conv2d_act(_x, _w, residual=torch.randn(1, 6, 8, 8)), ValueError, "residual must have"),
    (lambda: fuseformer.ops.conv2d_act(_x, torch.randn(6, 4, 11, 11)), ValueError, "output would be empty"),
]


@pytest.mark.parametrize("make_call,error,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_clear_error(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call()
