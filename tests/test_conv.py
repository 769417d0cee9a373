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


def _case_grid():
    """(backend, device, dtype, shape index, shape, layout) over everything each backend takes.
    Results of a handful of elements are a few roundings each in half precision, so their
    ratio to PyTorch's error is chance: the one-element case runs in float32."""
    for b, d in PAIRS:
        for i, case in enumerate(SHAPES):
            if b == "triton" and case[-1] != 1:
                continue
            for dt in dtypes_for(b, d):
                if dt != torch.float32 and _out_elements(case) < 32:
                    continue
                for layout in ("nchw", "nhwc"):
                    yield b, d, dt, i, case, layout


def reference_cases():
    return [pytest.param(b, d, dt, case, ACTS[i], layout, id=f"{b}-{d}-{str(dt)[6:]}-case{i}-{ACTS[i]}-{layout}")
            for b, d, dt, i, case, layout in _case_grid()]


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


@pytest.mark.skipif(("triton", "cpu") not in PAIRS, reason="Triton interpreter not available")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["gpu-tile-fp16", "fp32-tile"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_tile_configs_under_the_interpreter(monkeypatch, dtype, layout):
    # The interpreter otherwise runs a 32x16x16 tile; a GPU the 128x64x32 GEMM tile (the
    # float32 one for full-precision dots). 2x13x13 output pixels (338 rows), 70 channels
    # and a 40x3x3 reduction leave a remainder in each.
    from fuseformer.kernels import conv as kernels

    monkeypatch.setattr(kernels, "_INTERPRETER_TILE", kernels._GPU_TILE if dtype != torch.float32 else kernels._FP32_TILE)
    case = ((2, 40, 13, 13), 70, 3, 1, 1, 1, 1)
    check("triton", make_inputs(case, dtype, "cpu", layout, with_residual=True), case, "relu")


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
        # relu's training form: nothing saved, the backward reads the output
        torch.library.opcheck(fwd, (x, w, b, res, [1, 1], [1, 1], [1, 1], 1, "relu", False))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_gradient_without_a_saved_derivative_is_a_clear_error(backend, device):
    fwd = torch.ops.fuseformer.triton_conv2d_act_fwd if backend == "triton" else torch.ops.fuseformer.conv2d_act_fwd
    x, w, b, _ = make_inputs(SHAPES[0], torch.float32, device, "nchw", with_residual=False)
    with pytest.raises(RuntimeError, match="'gelu' needs the op called with save=True"):
        fwd(x, w, b, None, [1, 1], [1, 1], [1, 1], 1, "gelu", False)


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


# ---- inference (no act' saved: on the CPU in float32, one oneDNN call with post-ops) -------


def inference_cases():
    out = []
    for b, d, dt, i, case, layout in _case_grid():
        for residual in (False, True):
            # Every activation meets every shape across the layouts and residuals.
            act = ACTS[(i + 2 * (layout == "nhwc") + residual) % 6]
            out.append(pytest.param(b, d, dt, case, act, layout, residual,
                                    id=f"{b}-{d}-{str(dt)[6:]}-case{i}-{act}-{layout}-res{int(residual)}"))
    return out


@pytest.mark.parametrize("backend,device,dtype,case,activation,layout,residual", inference_cases())
def test_inference_matches_reference(poison_outputs, backend, device, dtype, case, activation, layout, residual):
    _, _, _, stride, pad, dil, groups = case
    tensors = [t.detach() if t is not None else None
               for t in make_inputs(case, dtype, device, layout, with_residual=residual)]
    x, w, b, res = tensors
    with torch.no_grad(), fuseformer.use_backend(backend):
        out = fuseformer.ops.conv2d_act(x, w, b, stride, pad, dil, groups, activation, res)
    channels_last = layout == "nhwc" and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref = reference([t.double() if t is not None else None for t in tensors], case, activation)
    assert_matches_reference("out", out, ref, reference(tensors, case, activation))


def test_packed_weight_follows_every_kind_of_weight_change():
    """The CPU inference path keeps the weight packed across calls; each way of changing the
    weight (in place, through .data, a new tensor) must reach the result."""
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(8, 12, 3, padding=1)
    changes = [
        lambda: conv.weight.data.mul_(0.5),
        lambda: conv.weight.requires_grad_(False).add_(1.0),
        lambda: setattr(conv, "weight", torch.nn.Parameter(torch.randn(12, 8, 3, 3))),
        lambda: conv.weight.data.copy_(torch.randn(12, 8, 3, 3)),
    ]
    with torch.no_grad(), fuseformer.use_backend("cpu"):
        for change in [lambda: None, *changes]:
            change()
            for _ in range(2):  # the second call reads the cached pack
                out = fuseformer.ops.conv2d_act(x, conv.weight, conv.bias, padding=1)
                torch.testing.assert_close(out, F.relu(conv(x)), rtol=1e-4, atol=1e-4)


def test_inference_takes_weight_views():
    """A weight that is a view (not cached: its TensorImpl is new at each call) or has any
    strides takes the CPU inference path all the same."""
    w = torch.randn(3, 3, 8, 12).permute(3, 2, 0, 1)  # (12, 8, 3, 3), non-contiguous view
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fuseformer.use_backend("cpu"):
        for _ in range(2):
            torch.testing.assert_close(fuseformer.ops.conv2d_act(x, w, None, 1, 1), F.relu(F.conv2d(x, w, None, 1, 1)),
                                       rtol=1e-4, atol=1e-4)


def _bn_inputs(device, dtype, k=12, c=8):
    torch.manual_seed(3)
    w = torch.randn(k, c, 3, 3, device=device) / (9 * c) ** 0.5
    return [w.to(dtype), torch.randn(k, device=device).to(dtype), (1 + torch.rand(k, device=device)).to(dtype),
            torch.randn(k, device=device).to(dtype), torch.randn(k, device=device).to(dtype),
            (0.5 + torch.rand(k, device=device)).to(dtype)]


def _bn_reference(x, w, b, gamma, beta, mean, var, eps, residual, activation, stride=1):
    z = F.batch_norm(F.conv2d(x, w, b, stride, 1), mean, var, gamma, beta, False, 0.0, eps)
    return activation_fn(activation)(z + residual if residual is not None else z)


@pytest.mark.parametrize("activation,residual,layout,affine", [
    ("relu", True, "nhwc", True), ("silu", False, "nhwc", True), ("gelu", True, "nchw", False),
    ("none", False, "nchw", True), ("relu2", True, "nhwc", False)])
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_conv2d_bn_act_matches_reference(backend, device, activation, residual, layout, affine):
    w, b, gamma, beta, mean, var = _bn_inputs(device, torch.float32)
    if not affine:
        b = gamma = beta = None
    x = torch.randn(2, 8, 9, 9, device=device)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 12, 9, 9, device=device) if residual else None
    args = (x, w, b, gamma, beta, mean, var, 1e-3, 1, 1, 1, 1, activation, res)
    with fuseformer.use_backend(backend):
        with torch.no_grad():
            out = fuseformer.ops.conv2d_bn_act(*args)
        # With gradients (fine-tuning with frozen statistics): the differentiable fold.
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, gamma, beta)]
        out_grad = fuseformer.ops.conv2d_bn_act(*leaves, mean, var, 1e-3, 1, 1, 1, 1, activation, res)
    as64 = [t.double() if t is not None else None for t in (x, w, b, gamma, beta, mean, var)]
    ref = _bn_reference(*as64, 1e-3, res.double() if res is not None else None, activation)
    low = _bn_reference(x, w, b, gamma, beta, mean, var, 1e-3, res, activation)
    assert_matches_reference("out", out, ref, low)
    assert_matches_reference("out (grad mode)", out_grad.detach(), ref, low)
    g = torch.randn_like(out)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out_grad, used, g)
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    ref = _bn_reference(*ref_leaves, mean.double(), var.double(), 1e-3, res.double() if res is not None else None,
                        activation)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], g.double())
    low_leaves = [t.detach().requires_grad_() if t is not None else None for t in leaves]
    low = _bn_reference(*low_leaves, mean, var, 1e-3, res, activation)
    low_grads = torch.autograd.grad(low, [t for t in low_leaves if t is not None], g)
    for i, (a, r, lo) in enumerate(zip(grads, ref_grads, low_grads)):
        assert_matches_reference(f"grad {i}", a, r, lo)


def test_conv2d_bn_act_follows_changes_to_the_batchnorm():
    """The folded, packed weight is cached on the CPU: a BatchNorm update (a training step's
    running statistics, a new affine parameter) must reach the next eval-mode call."""
    torch.manual_seed(0)
    unit = fuseformer.nn.ConvBNAct(8, 12, 3, padding=1)
    conv, bn = _conv_bn(unit, 12)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    for step in range(4):
        unit.train(), bn.train()
        batch = torch.randn(4, 8, 9, 9) * (step + 1)
        with torch.no_grad():
            unit(batch), bn(conv(batch))  # running statistics move
            unit.bn.weight.data.mul_(1.5), bn.weight.data.mul_(1.5)
        unit.eval(), bn.eval()
        with torch.no_grad(), fuseformer.use_backend("cpu"):
            for _ in range(2):
                torch.testing.assert_close(unit(x), F.relu(bn(conv(x))), rtol=1e-4, atol=1e-4)


def test_conv2d_bn_act_opcheck():
    if "cpu" not in fuseformer.backends.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    w, b, gamma, beta, mean, var = _bn_inputs("cpu", torch.float32)
    for layout in ("nchw", "nhwc"):
        x = torch.randn(2, 8, 9, 9)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        res = torch.randn(2, 12, 9, 9)
        for t in (x, w, b, gamma, beta, res):
            t.requires_grad_()
        torch.library.opcheck(torch.ops.fuseformer.conv2d_bn_act_fwd.default,
                              (x, w, b, gamma, beta, mean, var, 1e-5, res, [1, 1], [1, 1], [1, 1], 1, "relu"))


# ---- modules ------------------------------------------------------------------------------


def test_conv2d_act_module_is_a_drop_in():
    theirs = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect")
    ours = fuseformer.nn.Conv2dAct(8, 16, 3, stride=2, padding=1, padding_mode="reflect", activation="silu")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 10, 10)
    torch.testing.assert_close(ours(x), F.silu(theirs(x)))
    assert "activation='silu'" in repr(ours)


def _conv_bn(ours, k=16):
    conv = torch.nn.Conv2d(8, k, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(k)
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
    (lambda: fuseformer.ops.conv2d_bn_act(_x, _w, None, None, None, torch.zeros(5), torch.ones(6)), ValueError,
     r"running_mean must have shape \[6\]"),
    (lambda: fuseformer.ops.conv2d_bn_act(_x, _w, None, torch.ones(6, 1), None, torch.zeros(6), torch.ones(6)),
     ValueError, r"bn_weight must have shape \[6\]"),
    (lambda: fuseformer.ops.conv2d_bn_act(_x, _w, None, None, None, torch.zeros(6), torch.ones(6, dtype=torch.long)),
     TypeError, "running_var must be a floating-point"),
    (lambda: fuseformer.ops.conv2d_bn_act(_x, _w, None, None, None, torch.zeros(6), torch.ones(6), eps=-1.0),
     ValueError, "eps must be a non-negative"),
    (lambda: fuseformer.ops.conv2d_bn_act(_x, _w, None, None, None, torch.zeros(6), None), TypeError, "running_var"),
]


@pytest.mark.parametrize("make_call,error,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_clear_error(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call()
