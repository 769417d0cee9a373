"""linear_act / gated_linear: every backend available here against the float64 PyTorch
reference, outputs and all gradients, on awkward shapes, dtypes and layouts; the modules
(state_dict drop-ins, compile, autocast); bad input.

bf16 on the Triton backend runs only on CUDA: the interpreter computes bf16 dots wrongly
(ENGINEERING.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fuseformer
from fuseformer.ops import linear as linear_ops
from accuracy import assert_matches_reference, backend_device_pairs

PAIRS = backend_device_pairs("linear")
ACTIVATIONS = linear_ops.ACTIVATIONS


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    bf16 = device == "cuda" or backend != "triton"
    return [torch.float32, torch.float16] + ([torch.bfloat16] if bf16 else [])


# (x shape, out_features). M = 1 (decode), K = 1, N = 1, leading dimensions, sizes that leave
# remainders in every tile dimension, and exact multiples of the tiles.
SHAPES = [
    ((1, 96), 80),
    ((5, 7), 3),
    ((2, 13, 40), 50),
    ((65, 33), 47),
    ((64, 64), 96),
    ((3, 1), 5),
    ((4, 24), 1),
]
# Every activation on two shapes; the rest of the shapes with one plain and one smooth one.
CASES = [(a, s) for a in ACTIVATIONS for s in SHAPES[1:3]] + [
    (a, s) for s in SHAPES[:1] + SHAPES[3:] for a in ("relu", "silu")
]


def _smallest_result(shape) -> int:
    """Elements of the smallest tensor compared (out, dx, dW, db)."""
    (*lead, k), n = shape
    m = 1
    for d in lead:
        m *= d
    return min(m * n, m * k, n * k, n)


def reference_cases() -> list:
    # Half-precision errors of results with a handful of elements are a few roundings each,
    # so their ratio to PyTorch's is chance: shapes with a result under 32 elements (N = 1,
    # K = 1, 5x7 -> 3) check indexing and remainders in float32, where the error is far
    # below the floor.
    return [
        pytest.param(b, d, dt, a, s, id=f"{b}-{d}-{str(dt).replace('torch.', '')}-{a}-{'x'.join(map(str, s[0]))}-{s[1]}")
        for b, d in PAIRS
        for dt in dtypes_for(b, d)
        for a, s in CASES
        if dt == torch.float32 or _smallest_result(s) >= 32
    ]


def make_inputs(x_shape, n, dtype, device, gated, bias=True, scale=1.0):
    """Leaf tensors [x, weight(s), bias(es)]; weights scaled so pre-activations are O(1)."""
    k = x_shape[-1]
    x = (torch.randn(x_shape, device=device) * scale).to(dtype).requires_grad_()
    ws = [(torch.randn(n, k, device=device) / k**0.5).to(dtype).requires_grad_() for _ in range(1 + gated)]
    bs = [torch.randn(n, device=device).to(dtype).requires_grad_() if bias else None for _ in range(1 + gated)]
    return [x, *ws, *bs]


def call(gated, activation, tensors):
    if gated:
        x, wg, wu, bg, bu = tensors
        return fuseformer.ops.gated_linear(x, wg, wu, bg, bu, activation)
    x, w, b = tensors
    return fuseformer.ops.linear_act(x, w, b, activation)


def reference(gated, activation, tensors):
    act = linear_ops.activation_fn(activation)
    if gated:
        x, wg, wu, bg, bu = tensors
        return act(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    x, w, b = tensors
    return act(F.linear(x, w, b))


def grads_of(out, tensors, grad_out):
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(out, leaves, grad_out)


def check_against_reference(backend, device, gated, activation, tensors, grad_out=None, scale=None):
    """Forward and every gradient of ``backend`` against float64, bounded by PyTorch's own error."""
    with fuseformer.use_backend(backend):
        out = call(gated, activation, tensors)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    ours = grads_of(out, tensors, grad_out)
    tensors64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    ref = reference(gated, activation, tensors64)
    ref_grads = grads_of(ref, tensors64, grad_out.double())
    low = reference(gated, activation, tensors)
    low_grads = grads_of(low, tensors, grad_out)
    assert_matches_reference("out", out.detach(), ref.detach(), low.detach(), scale)
    names = [n for n, t in zip(tensor_names(gated), tensors) if t is not None and t.requires_grad]
    for name, g, r, lg in zip(names, ours, ref_grads, low_grads):
        assert_matches_reference(f"grad {name}", g, r, lg)


def tensor_names(gated):
    return ["x", "weight_gate", "weight_up", "bias_gate", "bias_up"] if gated else ["x", "weight", "bias"]


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend,device,dtype,activation,shape", reference_cases())
def test_matches_reference(poison_outputs, backend, device, dtype, activation, shape, gated):
    x_shape, n = shape
    check_against_reference(backend, device, gated, activation, make_inputs(x_shape, n, dtype, device, gated))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_without_bias(backend, device, gated):
    tensors = make_inputs((9, 20), 30, torch.float32, device, gated, bias=False)
    check_against_reference(backend, device, gated, "gelu_tanh", tensors)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_non_contiguous_operands(backend, device, gated):
    # x a strided slice, weights transposed views, and an upstream gradient with a zero stride
    # (the gradient of a sum).
    k, n = 24, 20
    base = torch.randn(3, 11, 2 * k, device=device)
    x = base[..., ::2].requires_grad_()
    weights = [torch.randn(k, n, device=device).t().requires_grad_() for _ in range(1 + gated)]
    biases = [torch.randn(n, device=device).requires_grad_() for _ in range(1 + gated)]
    tensors = [x, *weights, *biases]
    assert not x.is_contiguous() and not weights[0].is_contiguous()
    grad_out = torch.randn(1, 1, n, device=device).expand(3, 11, n)
    check_against_reference(backend, device, gated, "silu", tensors, grad_out)


def _offset_view(shape, dtype, device, offset=1):
    """A contiguous tensor starting `offset` elements into a buffer: for odd sizes in half
    precision its address is 2 bytes past an alignment that GEMM libraries assume (the rows
    of a fused projection's weight, a slice of its bias)."""
    numel = 1
    for d in shape:
        numel *= d
    buf = torch.randn(numel + offset, device=device)
    return buf.to(dtype)[offset:].view(shape)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_unaligned_operands(backend, device, activation):
    # Every operand a contiguous view at an odd element offset (cuBLASLt's epilogues read the
    # bias and write the saved pre-activation 16 bytes at a time; its heuristic assumes
    # 256-byte aligned matrices unless told): fused and unfused paths, training and inference.
    m, k, n = 9, 37, 45
    for dtype in dtypes_for(backend, device):
        x = _offset_view((m, k), dtype, device).requires_grad_()
        w = (_offset_view((n, k), dtype, device) / k**0.5).requires_grad_()
        b = _offset_view((n,), dtype, device, offset=3).requires_grad_()
        assert x.data_ptr() % 16 != 0 and b.data_ptr() % 16 != 0
        check_against_reference(backend, device, False, activation, [x, w, b])
        with torch.no_grad():
            with fuseformer.use_backend(backend):
                inference = fuseformer.ops.linear_act(x, w, b, activation)
            want = reference(False, activation, [x.double(), w.double(), b.double()])
            assert_matches_reference("inference out", inference, want, reference(False, activation, [x, w, b]))


def gpu_tile_cases() -> list:
    """Every tile config a GPU launch can take (the forward and backward autotune candidates,
    the float32 tile), as _INTERPRETER_TILE replacements."""
    from fuseformer.kernels import linear as kernels

    tiles = list(dict.fromkeys(kernels._FWD_TILES + kernels._BWD_TILES))
    cases = [pytest.param(t, torch.float16, max(t[:2]) <= 128, id="x".join(map(str, t[:3]))) for t in tiles]
    return cases + [pytest.param(kernels._FP32_TILE, torch.float32, True, id="fp32")]


@pytest.mark.parametrize("tile,dtype,gated_too", gpu_tile_cases())
@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p == ("triton", "cpu")], ids=str)
def test_gpu_tile_configs_under_the_interpreter(monkeypatch, backend, device, tile, dtype, gated_too):
    # The interpreter otherwise runs one small tile; a GPU runs these (256-wide tiles, 16-row
    # decode tiles, 128-deep K steps), with the grouped tile order over several row groups.
    # 300 x 200 -> 270 leaves a remainder in every tile size.
    from fuseformer.kernels import linear as kernels

    monkeypatch.setattr(kernels, "_INTERPRETER_TILE", tile)
    for gated in (False, True) if gated_too else (False,):
        tensors = make_inputs((300, 200), 270, dtype, device, gated)
        check_against_reference(backend, device, gated, "gelu_tanh", tensors)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_only_some_inputs_need_gradients(backend, device, gated):
    # A frozen layer (only x learns) and a first layer (x is data): gradients that are not
    # needed are not returned, and the others are right.
    for frozen in ("weights", "x"):
        tensors = make_inputs((7, 12), 10, torch.float32, device, gated)
        for i, t in enumerate(tensors):
            if (frozen == "x") == (i == 0):
                t.requires_grad_(False)
        check_against_reference(backend, device, gated, "gelu", tensors)
        with fuseformer.use_backend(backend):
            out = call(gated, "gelu", tensors)
        out.sum().backward()
        for i, t in enumerate(tensors):
            assert (t.grad is None) == (not t.requires_grad)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_large_pre_activations(backend, device, activation):
    # |z| up to ~100: the activations' tails (exp overflow in sigmoid, erfc underflow in GELU)
    # give finite, accurate values and derivatives.
    tensors = make_inputs((16, 32), 24, torch.float32, device, gated=True, scale=30.0)
    check_against_reference(backend, device, True, activation, tensors)


@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_inference_saves_nothing_and_matches(backend, device):
    tensors = [t.detach() for t in make_inputs((6, 10), 8, torch.float32, device, gated=True)]
    with torch.no_grad(), fuseformer.use_backend(backend):
        out = call(True, "silu", tensors)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference(True, "silu", tensors))


@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_empty_problems_follow_f_linear(backend, device):
    # No tokens, or no input features (the GEMM is zero, the bias still applies).
    for x_shape in ((0, 8), (4, 0)):
        x = torch.randn(x_shape, device=device, requires_grad=True)
        w = torch.randn(5, x_shape[1], device=device, requires_grad=True)
        b = torch.randn(5, device=device, requires_grad=True)
        with fuseformer.use_backend(backend):
            out = fuseformer.ops.linear_act(x, w, b, "gelu")
        torch.testing.assert_close(out, F.gelu(F.linear(x, w, b)))
        out.sum().backward()
        torch.testing.assert_close(b.grad, torch.autograd.grad(F.gelu(F.linear(x, w, b)).sum(), b)[0])


def test_float64_runs_on_the_reference_and_a_forced_kernel_says_why():
    x, w, b = make_inputs((3, 4), 5, torch.float64, "cpu", gated=False)
    torch.testing.assert_close(fuseformer.ops.linear_act(x, w, b, "relu"), F.relu(F.linear(x, w, b)))
    with fuseformer.use_backend("cpu"), pytest.raises(TypeError, match="float64"):
        fuseformer.ops.linear_act(x, w, b, "relu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only")
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_float32_follows_torch_tf32_setting(gated, monkeypatch):
    # With TF32 allowed, the kernels may use it and are judged against PyTorch's TF32 error.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tensors = make_inputs((300, 512), 384, torch.float32, "cuda", gated)
    check_against_reference("triton", "cuda", gated, "gelu", tensors)


# ---- opcheck ------------------------------------------------------------------------------


def _op_names(backend):
    if backend == "triton":
        return torch.ops.fuseformer.triton_linear_fwd.default, torch.ops.fuseformer.triton_linear_bwd.default
    return torch.ops.fuseformer.linear_fwd.default, torch.ops.fuseformer.linear_bwd.default


@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_opcheck(backend, device):
    fwd, bwd = _op_names(backend)
    for gated, activation, has_bias in ((False, "gelu", True), (False, "none", False), (True, "silu", True)):
        tensors = make_inputs((9, 12), 10, torch.float32, device, gated, bias=has_bias)
        x, *rest = tensors
        weight, weight_up = rest[0], (rest[1] if gated else None)
        bias, bias_up = (rest[2], rest[3]) if gated else (rest[1], None)
        args = (x, weight, weight_up, bias, bias_up, activation, True)
        torch.library.opcheck(fwd, args)
        with torch.no_grad():
            _out, saved, saved2 = fwd(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
        grad = torch.randn(9, 10, device=device)
        plain = (x.detach(), weight.detach(), weight_up.detach() if gated else None)
        torch.library.opcheck(
            bwd, (grad, *plain, saved, saved2, activation, has_bias, gated and has_bias, True, True)
        )


CPP_PAIRS = [(b, d) for b, d in PAIRS if b in ("cpu", "cuda")]


@pytest.mark.parametrize("backend,device", CPP_PAIRS, ids=[f"{b}-{d}" for b, d in CPP_PAIRS])
@pytest.mark.parametrize("x_shape", [(2, 3, 12), (12,), (2, 0, 12)], ids=["3d", "1d", "empty-rows"])
def test_cpp_op_takes_leading_dims(backend, device, x_shape):
    # The C++ op takes x (..., K) itself (no reshape in Python): the same numbers as its
    # 2-D call on the flattened rows, outputs under x's leading dims, forward and backward.
    fwd, bwd = _op_names(backend)
    for gated, activation in ((False, "gelu"), (True, "silu")):
        x, *rest = (t.detach() for t in make_inputs(x_shape, 10, torch.float32, device, gated))
        weight, weight_up = rest[0], (rest[1] if gated else None)
        bias, bias_up = (rest[2], rest[3]) if gated else (rest[1], None)
        args = (x, weight, weight_up, bias, bias_up, activation, True)
        torch.library.opcheck(fwd, args)
        out, saved, saved2 = fwd(*args)
        rows = x.reshape(-1, 12)
        out2, saved_2d, saved2_2d = fwd(rows, *args[1:])
        assert out.shape == (*x_shape[:-1], 10) and saved.shape == out.shape
        torch.testing.assert_close(out.reshape(-1, 10), out2, rtol=0, atol=0)
        torch.testing.assert_close(saved.reshape(-1, 10), saved_2d, rtol=0, atol=0)
        grad = torch.randn(out.shape, device=device)
        bwd_args = (grad, x, weight, weight_up, saved, saved2, activation, True, gated, True, True)
        torch.library.opcheck(bwd, bwd_args)
        grads = bwd(*bwd_args)
        grads_2d = bwd(grad.reshape(-1, 10), rows, weight, weight_up, saved_2d, saved2_2d, *bwd_args[6:])
        assert grads[0].shape == x.shape
        torch.testing.assert_close(grads[0].reshape(-1, 12), grads_2d[0], rtol=0, atol=0)
        for got, want in zip(grads[1:], grads_2d[1:]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)



@pytest.mark.parametrize("backend,device", CPP_PAIRS, ids=[f"{b}-{d}" for b, d in CPP_PAIRS])
def test_cpp_autograd_skipped_only_when_untracked(backend, device):
    # The C++ autograd kernel calls the op straight through when nothing needs a gradient
    # (csrc/autograd/untracked.h); gradients and forward-mode tangents must still be seen.
    import torch.autograd.forward_ad as fwAD

    x, weight, bias = make_inputs((5, 8), 6, torch.float32, device, gated=False)
    with fuseformer.use_backend(backend):
        with torch.no_grad():
            assert fuseformer.ops.linear_act(x, weight, bias, "gelu").grad_fn is None
        frozen = fuseformer.ops.linear_act(x.detach(), weight.detach(), bias.detach(), "gelu")
        assert frozen.grad_fn is None and not frozen.requires_grad
        y = fuseformer.ops.linear_act(x.detach(), weight, None, "gelu")  # only the weight is tracked
        assert y.requires_grad
        y.sum().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
            fuseformer.ops.linear_act(fwAD.make_dual(x.detach(), torch.ones_like(x)), weight.detach(), None, "gelu")

# ---- modules ------------------------------------------------------------------------------


def _torch_mlp(kind, **kw):
    if kind == "LinearAct":
        return torch.nn.Linear(kw["in_features"], kw["out_features"])
    if kind == "MLP":
        return torch.nn.ModuleDict(
            {"fc1": torch.nn.Linear(kw["in_features"], kw["hidden_features"]),
             "fc2": torch.nn.Linear(kw["hidden_features"], kw["in_features"])}
        )
    return torch.nn.ModuleDict(
        {name: torch.nn.Linear(*dims, bias=False) for name, dims in (
            ("gate_proj", (kw["hidden_size"], kw["intermediate_size"])),
            ("up_proj", (kw["hidden_size"], kw["intermediate_size"])),
            ("down_proj", (kw["intermediate_size"], kw["hidden_size"])))}
    )


def _torch_forward(kind, module, x, activation):
    act = linear_ops.activation_fn(activation)
    if kind == "LinearAct":
        return act(module(x))
    if kind == "MLP":
        return module["fc2"](act(module["fc1"](x)))
    return module["down_proj"](act(module["gate_proj"](x)) * module["up_proj"](x))


MODULE_CASES = [
    ("LinearAct", dict(in_features=24, out_features=40), "gelu"),
    ("MLP", dict(in_features=24, hidden_features=56), "gelu_tanh"),
    ("GatedMLP", dict(hidden_size=24, intermediate_size=56), "silu"),
]


@pytest.mark.parametrize("kind,kwargs,activation", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_is_a_state_dict_drop_in(kind, kwargs, activation):
    theirs = _torch_mlp(kind, **kwargs)
    ours = getattr(fuseformer.nn, kind)(**kwargs, activation=activation)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = ours(x)
    y_ref = _torch_forward(kind, theirs, x, activation)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    ours_grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    theirs_grads = torch.autograd.grad(y_ref, [x, *theirs.parameters()], g)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind,kwargs,activation", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_compiles_fullgraph(kind, kwargs, activation):
    module = getattr(fuseformer.nn, kind)(**kwargs, activation=activation)
    x = torch.randn(4, 24, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, module(x))
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
def test_ops_compile_fullgraph_on_every_backend(backend, device):
    # The op under torch.compile (fake implementations, autograd) on each kernel backend.
    tensors = make_inputs((6, 16), 24, torch.float32, device, gated=True)

    def block(x, wg, wu, bg, bu):
        return fuseformer.ops.gated_linear(x, wg, wu, bg, bu, "gelu").sum(-1)

    with fuseformer.use_backend(backend):
        y = torch.compile(block, fullgraph=True)(*tensors)
        y_ref = block(*tensors)
    torch.testing.assert_close(y, y_ref)
    grads = torch.autograd.grad(y.sum(), tensors)
    ref_grads = torch.autograd.grad(y_ref.sum(), tensors)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_gated_mlp_under_autocast():
    # fp32 parameters, bf16 compute as F.linear's autocast rule: matches the autocast torch stack.
    ours = fuseformer.nn.GatedMLP(32, 64)
    theirs = _torch_mlp("GatedMLP", hidden_size=32, intermediate_size=64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        y_low = _torch_forward("GatedMLP", theirs, x, "silu")
    assert y.dtype == y_low.dtype == torch.bfloat16
    y64 = _torch_forward("GatedMLP", theirs.double(), x.double(), "silu")
    assert_matches_reference("autocast", y.detach(), y64, y_low.detach())


def test_module_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        fuseformer.nn.GatedMLP(8, 16, activation="swish")
    assert "activation='relu2'" in repr(fuseformer.nn.LinearAct(4, 4, activation="relu2"))


# ---- bad input ----------------------------------------------------------------------------

_x, _w, _b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)

BAD_INPUT = [
    (lambda: fuseformer.ops.linear_act(_x, torch.randn(5, 7), _b), ValueError, "in_features=7 but x has 8"),
    (lambda: fuseformer.ops.linear_act(_x, torch.randn(8), _b), ValueError, "weight must be 2-D"),
    (lambda: fuseformer.ops.linear_act(_x, _w, torch.randn(4)), ValueError, r"bias must have shape \[5\]"),
    (lambda: fuseformer.ops.linear_act(_x, _w.half(), _b), TypeError, "weight has dtype float16 but x has float32"),
    (lambda: fuseformer.ops.linear_act(_x.int(), _w, _b), TypeError, "x must have dtype"),
    (lambda: fuseformer.ops.linear_act(_x, _w, _b, "swish"), ValueError, "activation must be one of"),
    (lambda: fuseformer.ops.linear_act([1.0], _w, _b), TypeError, "x must be a torch.Tensor"),
    (lambda: fuseformer.ops.linear_act(torch.tensor(1.0), _w, _b), ValueError, "at least 1 dimension"),
    (lambda: fuseformer.ops.gated_linear(_x, _w, torch.randn(6, 8)), ValueError, "weight_up must have weight_gate's shape"),
    (lambda: fuseformer.ops.gated_linear(_x, _w, None), TypeError, "weight_up must be a tensor"),
    (lambda: fuseformer.ops.gated_linear(_x, _w, _w, bias_up=torch.randn(5, 1)), ValueError, "bias_up must have shape"),
    (lambda: fuseformer.ops.linear_act(_x, _w.to("meta"), _b), ValueError, "weight is on meta but x is on cpu"),
]


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), *PAIRS], ids=["torch-cpu", *[f"{b}-{d}" for b, d in PAIRS]])
@pytest.mark.parametrize("make_call,error,match", BAD_INPUT, ids=[str(i) for i in range(len(BAD_INPUT))])
def test_bad_input_is_a_clear_error(make_call, error, match, backend, device):
    if device != "cpu":
        pytest.skip("the bad inputs are CPU tensors")
    with fuseformer.use_backend(backend), pytest.raises(error, match=match):
        make_call()


@pytest.mark.skipif("cpu" not in fuseformer.available_backends("cpu"), reason="needs the C++ extension")
def test_cpu_packed_weight_cache_follows_every_weight_change():
    """The CPU kernels keep weights packed across calls: an optimizer step (version bump), a
    write through .data (no version bump), a new tensor and the transposed backward pack all
    give the result of the weight as it is now."""
    torch.manual_seed(0)
    layer = fuseformer.nn.LinearAct(64, 48, activation="relu")
    x = torch.randn(32, 64, requires_grad=True)

    def check():
        with fuseformer.use_backend("cpu"):
            out = layer(x)
        ref = F.relu(F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        (rx,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        layer.weight.add_(0.5)  # in place: the version counter moves
    check()
    layer.weight.data.mul_(-1.0)  # through .data: the version counter does not move
    check()
    layer.weight = torch.nn.Parameter(torch.randn(48, 64))
    check()
