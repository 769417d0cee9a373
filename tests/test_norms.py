"""LayerNorm / RMSNorm: every backend available here against the float64 PyTorch reference,
forward and backward, on awkward shapes and dtypes; modules, compile, AMP; bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fuseformer
from fuseformer.ops import norms as norm_ops
from accuracy import assert_matches_reference, backend_device_pairs, relative_error

PAIRS = backend_device_pairs()
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (input shape, number of normalized dims). Powers of two and not, size 1, tile remainders,
# the single-tile / streamed boundary of the Triton kernels (16384 forward, 8192 backward).
SHAPES = [
    ((6, 1), 1),  # N = 1: for RMSNorm, a gradient that is a near-total cancellation
    ((3, 7), 1),
    ((2, 5, 33), 1),
    ((17, 1000), 1),
    ((4, 4096), 1),
    ((2, 3, 4, 8), 2),
    ((3, 8193), 1),
    ((2, 20000), 1),
]

# variant: (rms, has_weight, has_bias, has_residual)
VARIANTS = {
    "layer_norm": (False, True, True, False),
    "layer_norm_plain": (False, False, False, False),
    "layer_norm_bias_only": (False, False, True, False),
    "rms_norm": (True, True, False, False),
    "rms_norm_plain": (True, False, False, False),
    "add_layer_norm": (False, True, True, True),
    "add_rms_norm": (True, True, False, True),
}


def call(variant, x, residual, shape, weight, bias, eps):
    """The public fuseformer op for ``variant``; returns a tuple of outputs."""
    rms, _, _, has_residual = VARIANTS[variant]
    if has_residual:
        if rms:
            return fuseformer.ops.add_rms_norm(x, residual, shape, weight, eps)
        return fuseformer.ops.add_layer_norm(x, residual, shape, weight, bias, eps)
    if rms:
        return (fuseformer.ops.rms_norm(x, shape, weight, eps),)
    return (fuseformer.ops.layer_norm(x, shape, weight, bias, eps),)


def run_with_grads(variant, tensors, shape, eps, grads_out):
    """Forward ``variant`` on leaf tensors, backward with fixed upstream gradients."""
    x, residual, weight, bias = tensors
    outs = call(variant, x, residual, shape, weight, bias, eps)
    leaves = [t for t in tensors if t is not None]
    grads = torch.autograd.grad(outs, leaves, grads_out[: len(outs)])
    return outs, grads


def make_inputs(variant, shape, n_norm, dtype, device, param_dtype=None, scale=1.0, offset=0.0):
    rms, has_w, has_b, has_res = VARIANTS[variant]
    norm_shape = shape[len(shape) - n_norm :]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape, device=device) * scale + offset).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype) if has_res else None
    weight = (1 + 0.5 * torch.randn(norm_shape, device=device)).to(param_dtype) if has_w else None
    bias = (0.5 * torch.randn(norm_shape, device=device)).to(param_dtype) if has_b else None
    return [x, residual, weight, bias], norm_shape


def check_against_reference(variant, backend, tensors, norm_shape, eps=1e-5):
    x = tensors[0]
    n_out = 2 if VARIANTS[variant][3] else 1
    grads_out = [torch.randn(x.shape, device=x.device).to(x.dtype) for _ in range(n_out)]

    def leaves(dtype):
        return [t.detach().to(dtype if dtype else t.dtype).requires_grad_() if t is not None else None for t in tensors]

    with fuseformer.use_backend(backend):
        outs, grads = run_with_grads(variant, leaves(None), norm_shape, eps, grads_out)
    with fuseformer.use_backend("torch"):
        ref_outs, ref_grads = run_with_grads(
            variant, leaves(torch.float64), norm_shape, eps, [g.double() for g in grads_out]
        )
        lowp_outs, lowp_grads = run_with_grads(variant, leaves(None), norm_shape, eps, grads_out)
    names = ["out", "residual_out"]
    for name, out, ref, lowp in zip(names, outs, ref_outs, lowp_outs):
        assert_matches_reference(f"{variant}/{backend}/{name}", out, ref, lowp.to(out.dtype))
    grad_names = [n for n, t in zip(["grad_input", "grad_residual", "grad_weight", "grad_bias"], tensors) if t is not None]
    scale = None
    if VARIANTS[variant][0] and math.prod(norm_shape) == 1:
        # RMSNorm of one element: dx = rstd * w * dy * (1 - xhat^2), a cancellation whose
        # result is ~eps/x^2 of its terms. Measure errors against the terms' size.
        x64 = x.double()
        w64 = tensors[2].double() if tensors[2] is not None else 1.0
        summed = x64 + tensors[1].double() if tensors[1] is not None else x64
        scale = (grads_out[0].double() * w64 / (summed.square() + eps).sqrt()).norm().item()
    for name, g, ref, lowp in zip(grad_names, grads, ref_grads, lowp_grads):
        s = scale if name in ("grad_input", "grad_residual") else None
        assert_matches_reference(f"{variant}/{backend}/{name}", g, ref, lowp.to(g.dtype), s)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape,n_norm", SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else None)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(poison_outputs, variant, shape, n_norm, dtype, backend, device):
    tensors, norm_shape = make_inputs(variant, shape, n_norm, dtype, device)
    check_against_reference(variant, backend, tensors, norm_shape)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm"])
def test_float32_params_with_half_input(variant, dtype, backend, device):
    # Mixed precision: fp32 master weights read directly by the kernel.
    tensors, norm_shape = make_inputs(variant, (6, 300), 1, dtype, device, param_dtype=torch.float32)
    check_against_reference(variant, backend, tensors, norm_shape)


@pytest.mark.skipif(("triton", "cpu") not in PAIRS, reason="Triton interpreter not available")
@pytest.mark.parametrize("n", [300, 9000], ids=["one-tile", "streamed"])
@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm"])
def test_gpu_program_counts_under_the_interpreter(monkeypatch, variant, n):
    """The interpreter's backward runs 4 programs over many rows each; a GPU up to 8 per SM,
    so one row each (and as many partial dweight / dbias rows to sum) for these batches."""
    from fuseformer.kernels import norms as kernels

    monkeypatch.setattr(kernels, "_bwd_programs", lambda device, rows, block: max(1, rows))
    tensors, norm_shape = make_inputs(variant, (5, 7, n), 1, torch.float16, "cpu")
    check_against_reference(variant, "triton", tensors, norm_shape)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm", "add_layer_norm"])
def test_non_contiguous_input(variant, backend, device):
    tensors, _ = make_inputs(variant, (8, 6, 40), 1, torch.float32, device)
    # A transposed view: the normalized dim is not the fastest one in memory.
    tensors[0] = torch.randn(40, 6, 8, device=device).permute(2, 1, 0)
    assert not tensors[0].is_contiguous()
    check_against_reference(variant, backend, tensors, (40,))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm"])
def test_largest_supported_row(variant, backend, device):
    tensors, norm_shape = make_inputs(variant, (1, norm_ops.MAX_NORMALIZED_SIZE), 1, torch.float32, device)
    check_against_reference(variant, backend, tensors, norm_shape)


@pytest.mark.skipif(("cpu", "cpu") not in PAIRS or not sys.platform.startswith("linux"), reason="C++ CPU kernels on Linux")
def test_large_cpu_outputs_on_huge_pages():
    # Just past 32 MiB, where glibc would mmap (and fault in 4 KiB pages at every call): the
    # C++ kernels' outputs come from csrc/allocate.h's 2 MiB-aligned, MADV_HUGEPAGE blocks.
    tensors, norm_shape = make_inputs("add_layer_norm", (2049, 4096), 1, torch.float32, "cpu")
    check_against_reference("add_layer_norm", "cpu", tensors, norm_shape)
    leaves = [t.detach().requires_grad_() for t in tensors]
    with fuseformer.use_backend("cpu"):
        out, residual_out = call("add_layer_norm", leaves[0], leaves[1], norm_shape, leaves[2], leaves[3], 1e-5)
        (out.sum() + residual_out.sum()).backward()
    huge_page = 2 << 20
    for name, t in [("out", out), ("residual_out", residual_out), ("grad_input", leaves[0].grad)]:
        assert t.data_ptr() % huge_page == 0, f"{name} is not on a 2 MiB boundary"
    # Storage of their own, as ATen's: resizable, and copied values survive.
    kept = out.detach().clone()
    out = out.detach()
    out.resize_(out.shape[0] + 7, out.shape[1])
    assert torch.equal(out[: kept.shape[0]], kept)


@pytest.mark.skipif("cpu" not in fuseformer.available_backends("cpu"), reason="needs the C++ CPU kernels")
def test_cpu_output_blocks_are_reused_and_rewritten():
    # Outputs of 1 MiB or more come from csrc/allocate.h's cache: a freed block is the next
    # same-sized output's, and the kernel writes all of it (checked on fresh inputs against
    # float64; the block held the previous call's answer, so a skipped element would show).
    fuseformer.empty_cpu_cache()
    shape, weight, bias = (2048, 1024), torch.randn(1024), torch.randn(1024)  # 8 MiB outputs
    with fuseformer.use_backend("cpu"):
        first = fuseformer.ops.layer_norm(torch.randn(shape), shape[-1:], weight, bias)
        block = first.data_ptr()
        del first
        assert fuseformer.cpu_cache_bytes() >= 8 << 20
        x = torch.randn(shape) * 3 + 1
        out = fuseformer.ops.layer_norm(x, shape[-1:], weight, bias)
    assert out.data_ptr() == block
    assert fuseformer.cpu_cache_bytes() == 0
    ref64 = F.layer_norm(x.double(), shape[-1:], weight.double(), bias.double())
    assert_matches_reference("layer_norm", out, ref64, F.layer_norm(x, shape[-1:], weight, bias))
    del out
    assert fuseformer.empty_cpu_cache() >= 8 << 20
    assert fuseformer.cpu_cache_bytes() == 0


@pytest.mark.skipif("cpu" not in fuseformer.available_backends("cpu"), reason="needs the C++ CPU kernels")
def test_cpu_output_cache_keeps_to_its_budget():
    code = """
import torch, fuseformer
def output(rows):  # rows x 1024 float32: rows * 4 KiB
    with fuseformer.use_backend("cpu"):
        return fuseformer.ops.rms_norm(torch.randn(rows, 1024), (1024,))
del_big = output(2048); del del_big          # 8 MiB: past the 4 MiB budget, freed at once
assert fuseformer.cpu_cache_bytes() == 0, fuseformer.cpu_cache_bytes()
a, b = output(768), output(640)               # 3 MiB and 2.5 MiB
del a, b                                      # the older leaves to keep 4 MiB
assert fuseformer.cpu_cache_bytes() == 640 * 4096, fuseformer.cpu_cache_bytes()
assert fuseformer.info(print_out=False)["cpu_output_cache"] == "2.5 MiB held of 4 MiB"
print("ok")
"""
    env = dict(os.environ, FUSEFORMER_CPU_CACHE_MIB="4")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
    bad = subprocess.run([sys.executable, "-c", "import fuseformer; fuseformer.cpu_cache_bytes()"],
                         env=dict(os.environ, FUSEFORMER_CPU_CACHE_MIB="lots"), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0
    assert "ValueError: FUSEFORMER_CPU_CACHE_MIB must be a whole number of MiB (0: no cache), got 'lots'" in bad.stderr
    shown = subprocess.run([sys.executable, "-c", "import fuseformer; print(fuseformer.info(print_out=False)"
                            "['cpu_output_cache'])"], env=dict(os.environ, FUSEFORMER_CPU_CACHE_MIB="lots"),
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.startswith("error: FUSEFORMER_CPU_CACHE_MIB must be a whole number of MiB"), shown.stdout


@pytest.mark.skipif("cpu" not in fuseformer.available_backends("cpu"), reason="needs the C++ CPU kernels")
def test_profiler_sees_cpu_output_blocks():
    # torch.profiler(profile_memory=True) charges a cached-allocator block to the op that took
    # it and shows its free, whether the block was freshly mapped or taken back from the cache.
    from torch.profiler import profile

    x = torch.randn(1536, 1024)  # a 6 MiB output
    nbytes = x.numel() * 4
    for attempt in ("fresh", "cached"):
        with fuseformer.use_backend("cpu"), profile(profile_memory=True) as prof:
            out = fuseformer.ops.rms_norm(x, (1024,))
            del out
        events = {e.key: e for e in prof.key_averages()}
        op = events["fuseformer::norm_fwd"]
        assert op.self_cpu_memory_usage >= nbytes, (attempt, op.self_cpu_memory_usage)
        freed = sum(e.self_cpu_memory_usage for e in prof.key_averages())
        assert abs(freed) < nbytes, (attempt, freed)  # what was charged was also given back

@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm"])
def test_empty_normalized_dimension_as_pytorch(variant):
    # F.layer_norm / F.rms_norm take a normalized size of 0 (an empty output); so does the
    # default dispatch. A forced kernel backend says it needs rows of at least one element.
    x = torch.randn(3, 0)
    expected = getattr(F, variant)(x, (0,))
    assert getattr(fuseformer.ops, variant)(x, (0,)).shape == expected.shape == (3, 0)
    for backend, device in PAIRS:
        if backend == "torch" or device != "cpu":
            continue
        with fuseformer.use_backend(backend), pytest.raises(ValueError, match="normalized size of at least 1"):
            getattr(fuseformer.ops, variant)(x, (0,))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_past_the_size_limit_is_a_clear_error(backend, device):
    x = torch.randn(1, norm_ops.MAX_NORMALIZED_SIZE + 1, device=device)
    with fuseformer.use_backend(backend), pytest.raises(ValueError, match="normalized size of at most"):
        fuseformer.ops.layer_norm(x, x.shape[-1:])


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm"])
def test_large_magnitudes_and_offsets(variant, dtype, backend, device):
    # A mean far from zero: a one-pass E[x^2] - E[x]^2 variance would lose all precision.
    tensors, norm_shape = make_inputs(variant, (5, 513), 1, dtype, device, scale=30.0, offset=3000.0)
    check_against_reference(variant, backend, tensors, norm_shape)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm"])
def test_large_eps_is_applied(variant, backend, device):
    tensors, norm_shape = make_inputs(variant, (4, 64), 1, torch.float32, device)
    check_against_reference(variant, backend, tensors, norm_shape, eps=0.5)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_constant_rows_give_bias_not_nan(backend, device):
    x = torch.full((3, 100), 7.0, device=device, requires_grad=True)
    bias = torch.randn(100, device=device)
    with fuseformer.use_backend(backend):
        y = fuseformer.ops.layer_norm(x, (100,), torch.ones(100, device=device), bias)
        (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, bias.expand(3, 100))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_empty_batch(backend, device):
    x = torch.randn(0, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    with fuseformer.use_backend(backend):
        y = fuseformer.ops.rms_norm(x, (32,), w)
        y.sum().backward()
    assert y.shape == (0, 32)
    assert torch.equal(w.grad, torch.zeros(32, device=device))


# ---- custom-op registration ---------------------------------------------------------------


def _opcheck_samples(device):
    x = torch.randn(3, 40, device=device)
    r = torch.randn(3, 40, device=device)
    w = torch.randn(40, device=device)
    b = torch.randn(40, device=device)
    return [
        (x, None, w, b, 1e-5, False),
        (x, r, w, None, 1e-6, True),
        (x, None, None, None, 1e-5, False),
    ]


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_opcheck(backend, device):
    fwd = norm_ops._fwd_op(backend)
    bwd = torch.ops.fuseformer.triton_norm_bwd.default if backend == "triton" else torch.ops.fuseformer.norm_bwd.default
    for args in _opcheck_samples(device):
        leaf_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(fwd, leaf_args)
        out, residual_out, mean, rstd = fwd(*args)
        x, residual, weight, bias, _, rms = args
        saved = residual_out if residual is not None else x
        grad_res = torch.randn_like(out) if residual is not None else None
        torch.library.opcheck(bwd, (torch.randn_like(out), grad_res, saved, weight, mean, rstd, rms, bias is not None))


# ---- modules -------------------------------------------------------------------------------


MODULE_PAIRS = [
    (fuseformer.nn.LayerNorm, torch.nn.LayerNorm, {}),
    (fuseformer.nn.LayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False}),
    (fuseformer.nn.LayerNorm, torch.nn.LayerNorm, {"bias": False, "eps": 1e-3}),
    (fuseformer.nn.RMSNorm, torch.nn.RMSNorm, {}),
    (fuseformer.nn.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
]


@pytest.mark.parametrize("ours,theirs,kwargs", MODULE_PAIRS)
def test_module_is_a_drop_in(ours, theirs, kwargs):
    reference = theirs(48, **kwargs)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p))
    module = ours(48, **kwargs)
    module.load_state_dict(reference.state_dict())
    assert list(module.state_dict()) == list(reference.state_dict())
    assert isinstance(module, theirs)
    x = torch.randn(4, 7, 48)
    torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)
    # And the other way round: our state_dict loads into torch's module.
    back = theirs(48, **kwargs)
    back.load_state_dict(module.state_dict())
    torch.testing.assert_close(back(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module_cls", [fuseformer.nn.LayerNorm, fuseformer.nn.RMSNorm])
def test_module_compiles_fullgraph(module_cls):
    torch._dynamo.reset()
    module = module_cls(64)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(5, 64, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = module(x_ref)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("backend,device", PAIRS, ids=[f"{b}-{d}" for b, d in PAIRS])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gradient_through_the_sum_alone(backend, device, rms):
    # Only the residual sum used downstream: the normalized output gets no gradient and the
    # backward must not expect one.
    x = torch.randn(6, 32, device=device, requires_grad=True)
    r = torch.randn(6, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    with fuseformer.use_backend(backend):
        if rms:
            _y, h = fuseformer.ops.add_rms_norm(x, r, (32,), w)
        else:
            _y, h = fuseformer.ops.add_layer_norm(x, r, (32,), w, None)
    grad = torch.randn_like(h)
    gx, gr, gw = torch.autograd.grad(h, [x, r, w], grad, allow_unused=True)
    torch.testing.assert_close(gx, grad)
    torch.testing.assert_close(gr, grad)
    assert gw is None or torch.count_nonzero(gw) == 0


def test_fused_residual_compiles_fullgraph():
    torch._dynamo.reset()
    norm = fuseformer.nn.RMSNorm(32)

    def block(x, residual):
        normed, summed = norm.forward_with_residual(x, residual)
        return normed * 2 + summed

    x, r = torch.randn(3, 32), torch.randn(3, 32)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, r), block(x, r))


@pytest.mark.parametrize("module_cls", [fuseformer.nn.LayerNorm, fuseformer.nn.RMSNorm])
def test_module_under_autocast(module_cls):
    # fp32 parameters, bf16 activations from an autocast matmul.
    linear = torch.nn.Linear(64, 64)
    norm = module_cls(64)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear(x)
        y = norm(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32
    ref_norm = (torch.nn.LayerNorm if module_cls is fuseformer.nn.LayerNorm else torch.nn.RMSNorm)(64).double()
    ref_norm.load_state_dict(norm.state_dict())
    ref = ref_norm(h.detach().double())
    low = ref_norm.to(torch.bfloat16)(h.detach())
    assert_matches_reference("autocast", y.detach(), ref, low)


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call_bad,error,match",
    [
        (lambda: fuseformer.ops.layer_norm(torch.arange(8).reshape(2, 4), (4,)), TypeError, "input must have dtype"),
        (lambda: fuseformer.ops.layer_norm([1.0, 2.0], (2,)), TypeError, "input must be a torch.Tensor"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(2, 4), (5,)), ValueError, "normalized_shape"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(4), (2, 4)), ValueError, "normalized_shape"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(2, 4), (0,)), ValueError, "normalized_shape"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(2, 4), (4,), torch.randn(5)), ValueError, "weight must have shape"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(2, 4), (4,), None, torch.randn(3)), ValueError, "bias must have shape"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(2, 4).half(), (4,), torch.randn(4).double()), TypeError, "weight must have dtype"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(2, 4), (4,), torch.randn(4, device="meta")), ValueError, "weight is on meta"),
        (lambda: fuseformer.ops.layer_norm(torch.randn(2, 4), (4,), eps=-1.0), ValueError, "eps"),
        (lambda: fuseformer.ops.rms_norm(torch.randn(2, 4), (4,), eps=float("nan")), ValueError, "eps"),
        (lambda: fuseformer.ops.add_rms_norm(torch.randn(2, 4), torch.randn(2, 5), (4,)), ValueError, "residual must have"),
        (lambda: fuseformer.ops.add_layer_norm(torch.randn(2, 4), torch.randn(2, 4).half(), (4,)), ValueError, "residual must have"),
        (lambda: fuseformer.ops.add_layer_norm(torch.randn(2, 4), None, (4,)), TypeError, "residual must be a tensor"),
    ],
)
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_bad_input_is_a_clear_error(call_bad, error, match, backend, device):
    with fuseformer.use_backend(backend), pytest.raises(error, match=match):
        call_bad()


def test_reference_backend_matches_float64_math():
    # The "torch" backend is the reference; check it against the textbook formula once.
    x = torch.randn(6, 50, dtype=torch.float64)
    w, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    with fuseformer.use_backend("torch"):
        ln = fuseformer.ops.layer_norm(x, (50,), w, b, 1e-5)
        rms = fuseformer.ops.rms_norm(x, (50,), w, 1e-5)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    assert relative_error(ln, (x - mean) / torch.sqrt(var + 1e-5) * w + b) < 1e-12
    assert relative_error(rms, x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5) * w) < 1e-12
    assert math.isclose(F.rms_norm(x, (50,), eps=None).square().mean().item(), 1.0, rel_tol=1e-6)
