"""Attention: every backend available here against the float64 math reference, outputs and
dQ/dK/dV, on awkward shapes, GQA ratios, head dims, masks, windows, softcap, ALiBi, dropout;
the packed and KV-cache forms; MultiheadAttention as a drop-in; compile; bad input.

The error rule (accuracy.py): a backend's error against float64 is at most twice the error
of PyTorch's own math path run in the same low precision (``math_attention`` in q's dtype).
bf16 runs only on CUDA: the Triton interpreter computes bf16 dots wrongly (ENGINEERING.md).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuseformer
from accuracy import assert_matches_reference, backend_device_pairs, relative_error
from fuseformer.kernels import attention as attention_kernels
from fuseformer.ops.attention import _draw_seed, math_attention

PAIRS = backend_device_pairs("attention")
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
# Backends that draw dropout with the kernels' Philox stream (the C++ CPU backend runs
# dropout through PyTorch's math path instead).
TRITON_PAIRS = [(b, d) for b, d in PAIRS if b == "triton"]
TRITON_IDS = [f"{b}-{d}" for b, d in TRITON_PAIRS]
DECODE_PAIRS = backend_device_pairs("attention_decode")
DECODE_IDS = [f"{b}-{d}" for b, d in DECODE_PAIRS]


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def dtype_cases() -> list:
    return [
        pytest.param(b, d, dt, id=f"{b}-{d}-{str(dt).replace('torch.', '')}")
        for b, d in PAIRS
        for dt in dtypes_for(d)
    ]


# (B, H, H_kv, S, L, D): size 1, tile remainders, S != L both ways, GQA ratios 1/2/4/8,
# head dims across 16-256 including 80, 96 and 160.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 4, 2, 37, 45, 40),
    (1, 8, 1, 64, 64, 64),
    (2, 4, 1, 33, 17, 80),
    (1, 2, 2, 16, 70, 96),
    (1, 2, 2, 20, 24, 160),
    (1, 1, 1, 40, 40, 256),
    (1, 2, 2, 5, 3, 16),
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def variant_kwargs(variant: str, shape, device) -> dict:
    batch, heads, _, seqlen_q, seqlen_k, _ = shape
    if variant == "plain":
        return {}
    if variant == "causal":
        return {"is_causal": True}
    if variant == "causal_lower_right":
        return {"is_causal": True, "causal_variant": "lower_right"}
    if variant == "window":
        return {"window": (6, 3)}
    if variant == "causal_window":
        return {"is_causal": True, "window": (9, -1)}
    if variant == "softcap":
        return {"softcap": 1.5}
    if variant == "alibi":
        return {"alibi_slopes": torch.rand(batch, heads, device=device)}
    if variant == "bool_mask":
        mask = torch.rand(batch, 1, seqlen_q, seqlen_k, device=device) > 0.4
        mask[:, :, 0] = False  # a fully masked row: zeros, never NaN
        return {"attn_mask": mask}
    if variant == "float_mask":
        return {"attn_mask": torch.randn(seqlen_q, seqlen_k, device=device)}
    if variant == "everything":
        return {
            "is_causal": True,
            "causal_variant": "lower_right",
            "window": (12, -1),
            "softcap": 4.0,
            "alibi_slopes": torch.rand(heads, device=device),
            "attn_mask": torch.rand(seqlen_q, seqlen_k, device=device) > 0.2,
        }
    raise AssertionError(variant)


def make_qkv(shape, dtype, device):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    q = torch.randn(batch, heads, seqlen_q, head_dim, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=device).to(dtype)
    return q, k, v


def math_kwargs(kwargs: dict, dtype: torch.dtype, head_dim: int) -> dict:
    """ops.attention keyword arguments as math_attention's, with masks cast to ``dtype``."""
    window = kwargs.get("window") or (-1, -1)
    if kwargs.get("is_causal"):
        window = (window[0], 0)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return dict(
        attn_mask=mask,
        scale=kwargs.get("scale") or 1.0 / math.sqrt(head_dim),
        window=window,
        softcap=kwargs.get("softcap") or 0.0,
        alibi_slopes=kwargs.get("alibi_slopes"),
        lower_right=kwargs.get("causal_variant") == "lower_right",
    )


def grads_of(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def check_attention(backend, q, k, v, kwargs, check_grads=True):
    """ops.attention on ``backend`` against the float64 math path, outputs, lse and grads."""
    dtype, head_dim = q.dtype, q.shape[-1]
    leaves = [t.detach().requires_grad_(check_grads) for t in (q, k, v)]
    with fuseformer.use_backend(backend):
        out, lse = fuseformer.ops.attention(*leaves, enable_gqa=True, return_lse=True, **kwargs)
    leaves64 = [t.detach().double().requires_grad_(check_grads) for t in (q, k, v)]
    ref, ref_lse = math_attention(*leaves64, **math_kwargs(kwargs, torch.float64, head_dim))
    leaves_lp = [t.detach().requires_grad_(check_grads) for t in (q, k, v)]
    lowp, _ = math_attention(*leaves_lp, **math_kwargs(kwargs, dtype, head_dim))
    assert_matches_reference("out", out, ref, lowp)
    # lse: -inf exactly where no key is visible, float32-accurate elsewhere.
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=0)
    if not check_grads:
        return out
    grad_out = torch.randn_like(out)
    got = grads_of(out, leaves, grad_out)
    want = grads_of(ref, leaves64, grad_out.double())
    lowp_grads = grads_of(lowp, leaves_lp, grad_out)
    probs = attention_probs(leaves64, kwargs)
    scales = score_grad_scales(leaves64, probs, ref, grad_out.double(), want, kwargs)
    inherited = errors_inherited_from_the_output(leaves64, probs, out, ref, grad_out.double(), want, kwargs, scales)
    for name, g, w, lp in zip(("dq", "dk", "dv"), got, want, lowp_grads):
        assert_matches_reference(name, g, w, lp, scale=scales.get(name), inherited=inherited.get(name, 0.0))
    return out


def attention_probs(qkv64, kwargs) -> torch.Tensor:
    """P itself, (B, H, S, L) float64: the math path's output for V = identity."""
    q, k, _ = (t.detach() for t in qkv64)
    eye = torch.eye(k.shape[2], dtype=torch.float64).expand(k.shape[0], k.shape[1], -1, -1)
    probs, _ = math_attention(q, k, eye, **math_kwargs(kwargs, torch.float64, q.shape[-1]))
    return probs


def score_grads(qkv64, probs, dscores, kwargs) -> dict:
    """dQ and dK of a gradient ``dscores`` on the (softcapped) scores, float64."""
    q, k, _ = (t.detach() for t in qkv64)
    groups = q.shape[1] // k.shape[1]
    k_rep = k.repeat_interleave(groups, 1)
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    softcap = kwargs.get("softcap") or 0.0
    if softcap:
        dscores = dscores * (1 - torch.tanh(scale * (q @ k_rep.transpose(-2, -1)) / softcap) ** 2)
    dk = (scale * dscores.transpose(-2, -1) @ q).unflatten(1, (k.shape[1], groups)).sum(2)  # over a group's heads
    return {"dq": scale * dscores @ k_rep, "dk": dk}


# Past this conditioning (the size of the terms that cancel into dQ or dK over the size of
# dQ or dK) an error is measured against the terms: the test shapes have 1.3-4.6.
WELL_CONDITIONED = 5.0


def score_grad_scales(qkv64, probs, out64, grad_out64, want, kwargs) -> dict:
    """dQ and dK go through dS = P (dP - delta), delta = rowsum(dO O), whose terms cancel:
    exactly where a query sees a single key (dQ = 0), nearly where it sees nearly tied keys.
    Rounding errors come in the size of the terms, ||scale · (P (|dP| + |delta|)) K|| for
    dQ (the same with Q for dK), so relative to dQ they grow with the conditioning
    kappa = terms / ||dQ||. The flash algorithm (P from the lse, delta from O; both kernels)
    grows more than PyTorch's softmax backward, whose rounding cancels along the tie:
    hypothesis draws kappa 18-57 problems where it has 5-20x PyTorch's relative error, the
    C++ and Triton kernels alike. Past WELL_CONDITIONED the error is measured against the
    terms' size: the scale returned here for relative_error."""
    k, v = (t.detach() for t in qkv64[1:])
    groups = qkv64[0].shape[1] // k.shape[1]
    v_rep = v.repeat_interleave(groups, 1)
    terms = probs * ((grad_out64 @ v_rep.transpose(-2, -1)).abs() + (grad_out64 * out64.detach()).sum(-1, keepdim=True).abs())
    no_softcap = {**kwargs, "softcap": 0.0}  # the size of the terms, not their derivative
    sizes = {name: grad.norm().item() for name, grad in score_grads(qkv64, probs, terms, no_softcap).items()}
    return {
        name: size
        for (name, size), grad in zip(sizes.items(), want)
        if grad.norm().item() * WELL_CONDITIONED < size
    }


def errors_inherited_from_the_output(qkv64, probs, out, out64, grad_out64, want, kwargs, scales) -> dict:
    """The flash backward takes delta = rowsum(dO O) from the output it returned (in its
    dtype, as FlashAttention does), whose error e the forward check has held to the rule:
    e shifts dS by -P (dO . e) row by row, which does not cancel where dQ does. The Triton
    forward rounds P to fp16 for the P·V product, an error along the values that dO · e
    sums coherently: in a kappa-48 problem hypothesis drew, it alone made Triton's dQ error
    6x PyTorch's (the C++ kernel's, whose O is exactly rounded: 0.2x). This is the relative
    error of the exact backward at the kernel's own output; the kernel's own error is
    bounded over it."""
    error = out.detach().double() - out64.detach()
    shift = -(grad_out64 * error).sum(-1, keepdim=True) * probs
    grads = score_grads(qkv64, probs, shift, kwargs)
    return {name: relative_error(w + grads[name], w, scales.get(name)) for name, w in zip(("dq", "dk"), want)}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("variant", ["plain", "causal"])
@pytest.mark.parametrize("backend,device,dtype", dtype_cases())
def test_shapes_and_head_dims(poison_outputs, backend, device, dtype, variant, shape):
    q, k, v = make_qkv(shape, dtype, device)
    check_attention(backend, q, k, v, variant_kwargs(variant, shape, device))


# The last: a GQA group x queries small enough that the C++ kernel packs the group into one tile.
FEATURE_SHAPES = [SHAPES[1], SHAPES[3], (1, 4, 4, 50, 29, 32), (2, 8, 2, 7, 30, 32)]


@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=["x".join(map(str, s)) for s in FEATURE_SHAPES])
@pytest.mark.parametrize(
    "variant",
    ["causal_lower_right", "window", "causal_window", "softcap", "alibi", "bool_mask", "float_mask", "everything"],
)
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_features(poison_outputs, backend, device, variant, shape):
    dtype = torch.float16
    q, k, v = make_qkv(shape, dtype, device)
    check_attention(backend, q, k, v, variant_kwargs(variant, shape, device))


@st.composite
def attention_problems(draw, compiled: bool = False):
    """A random shape (sizes 1 to 70, tile remainders, GQA) and a random mix of options.
    ``compiled``: for a GPU, where every new dtype / head-dim class / option mix is a new
    Triton compile (seconds each), fewer of them: fp16 and two head dims."""
    head_dims = [40, 64] if compiled else [16, 24, 40, 64, 72]
    dtypes = [torch.float16] if compiled else [torch.float16, torch.float32]
    shape = (
        draw(st.integers(1, 2)),  # batch
        0,  # heads: kv heads x group, below
        draw(st.integers(1, 3)),  # kv heads
        draw(st.integers(1, 70)),  # seqlen_q
        draw(st.integers(1, 70)),  # seqlen_k
        draw(st.sampled_from(head_dims)),  # head dim (the Triton range starts at 16)
    )
    shape = (shape[0], shape[2] * draw(st.sampled_from([1, 2, 3])), *shape[2:])
    kwargs = {}
    if draw(st.booleans()):
        kwargs["is_causal"] = True
    if draw(st.booleans()):
        kwargs["causal_variant"] = "lower_right"
    if draw(st.booleans()):
        kwargs["window"] = (draw(st.integers(-1, 20)), draw(st.integers(-1, 20)))
    if draw(st.booleans()):
        kwargs["softcap"] = draw(st.sampled_from([1.0, 5.0]))
    mask = draw(st.sampled_from(["none", "bool", "float"]))
    return shape, kwargs, mask, draw(st.sampled_from(dtypes)), draw(st.booleans())


def _check_fuzzed(backend, device, problem, seed):
    shape, kwargs, mask_kind, dtype, alibi = problem
    torch.manual_seed(seed)
    batch, heads, _, seqlen_q, seqlen_k, _ = shape
    if alibi:
        kwargs = {**kwargs, "alibi_slopes": torch.rand(heads, device=device)}
    if mask_kind == "bool":
        kwargs = {**kwargs, "attn_mask": torch.rand(batch, 1, seqlen_q, seqlen_k, device=device) > 0.3}
    elif mask_kind == "float":
        kwargs = {**kwargs, "attn_mask": torch.randn(1, heads, seqlen_q, seqlen_k, device=device)}
    q, k, v = make_qkv(shape, dtype, device)
    check_attention(backend, q, k, v, kwargs)


CPU_PAIRS = [(b, d) for b, d in PAIRS if d == "cpu"]
CUDA_PAIRS = [(b, d) for b, d in PAIRS if d == "cuda"]


@pytest.mark.parametrize("backend,device", CPU_PAIRS, ids=[f"{b}-{d}" for b, d in CPU_PAIRS])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=attention_problems(), seed=st.integers(0, 2**31 - 1))
def test_fuzzed_shapes_and_options(backend, device, problem, seed):
    _check_fuzzed(backend, device, problem, seed)


@pytest.mark.parametrize("backend,device", CUDA_PAIRS, ids=[f"{b}-{d}" for b, d in CUDA_PAIRS])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=attention_problems(compiled=True), seed=st.integers(0, 2**31 - 1))
def test_fuzzed_shapes_and_options_on_gpu(backend, device, problem, seed):
    _check_fuzzed(backend, device, problem, seed)


def gpu_tile_cases() -> list:
    """Every tile config a GPU launch can take (the autotune candidates of each head-dim
    class, the i-th of each kernel's list together; the float32 tiles), as
    _INTERPRETER_TILES replacements."""
    cases = []
    for d_class, head_dim in ((64, 48), (128, 80), (256, 160)):
        lists = [attention_kernels._TILES[kind][d_class] for kind in ("fwd", "dkdv", "dq")]
        for i in range(max(map(len, lists))):
            tiles = {kind: (lst[i] if i < len(lst) else lst[0]) for kind, lst in zip(("fwd", "dkdv", "dq"), lists)}
            cases.append(pytest.param(tiles, head_dim, torch.float16, id=f"D{head_dim}-fp16-{i}"))
        fp32 = {kind: attention_kernels._FP32_TILES[kind][d_class] for kind in ("fwd", "dkdv", "dq")}
        cases.append(pytest.param(fp32, head_dim, torch.float32, id=f"D{head_dim}-fp32"))
    return cases


@pytest.mark.parametrize("variant", ["causal", "everything"])
@pytest.mark.parametrize("tiles,head_dim,dtype", gpu_tile_cases())
@pytest.mark.parametrize("backend,device", [p for p in TRITON_PAIRS if p[1] == "cpu"], ids=str)
def test_gpu_tile_configs_under_the_interpreter(monkeypatch, backend, device, tiles, head_dim, dtype, variant):
    # The interpreter otherwise runs one small tile per kernel; a GPU runs these (128-row
    # tiles, BLOCK_M < BLOCK_N for dK/dV, ...), whose block ranges (the causal and window
    # skips, the full / masked split) are computed differently. 150 x 133 leaves a remainder
    # in every tile size.
    monkeypatch.setattr(attention_kernels, "_INTERPRETER_TILES", tiles)
    shape = (1, 4, 2, 150, 133, head_dim)
    q, k, v = make_qkv(shape, dtype, device)
    check_attention(backend, q, k, v, variant_kwargs(variant, shape, device))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_fully_masked_rows_are_zero_with_finite_grads(backend, device):
    shape = (2, 2, 2, 9, 12, 32)
    q, k, v = make_qkv(shape, torch.float16, device)
    mask = torch.ones(2, 2, 9, 12, dtype=torch.bool, device=device)
    mask[0, :, 3] = False
    mask[1, 1, :] = False  # a whole head sees nothing
    float_mask = torch.zeros(9, 12, device=device).masked_fill(torch.arange(9, device=device)[:, None] == 4, float("-inf"))
    for attn_mask, empty_rows in ((mask, ~mask.any(-1)), (float_mask, torch.isneginf(float_mask).all(-1).expand(2, 2, 9))):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with fuseformer.use_backend(backend):
            out, lse = fuseformer.ops.attention(*leaves, attn_mask=attn_mask, return_lse=True)
        assert torch.equal(out[empty_rows], torch.zeros_like(out[empty_rows]))
        assert torch.isneginf(lse[empty_rows]).all() and torch.isfinite(lse[~empty_rows]).all()
        grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(grads[0][empty_rows], torch.zeros_like(grads[0][empty_rows]))
    # A window that leaves some rows nothing (left = right = 0, more queries than keys).
    check_attention(backend, q, k[:, :, :5], v[:, :, :5], {"window": (0, 0)})


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_gradient_through_the_log_sum_exp(backend, device):
    q, k, v = make_qkv((1, 2, 1, 21, 30, 32), torch.float32, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with fuseformer.use_backend(backend):
        out, lse = fuseformer.ops.attention(*leaves, is_causal=True, enable_gqa=True, return_lse=True)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = math_attention(*leaves64, scale=32**-0.5, window=(-1, 0))
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), leaves, (g_out, g_lse))
    want = torch.autograd.grad((ref, ref_lse), leaves64, (g_out.double(), g_lse.double()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["plain", "causal_lower_right", "window", "float_mask"])
def test_cpu_kernel_across_query_and_key_tiles(variant):
    # The C++ CPU kernel tiles 256 (128 when masked) queries by 512 keys: 300 x 1100 spans
    # several of each with remainders, so the online softmax rescales across key tiles and
    # the backward accumulates dK, dV over query tiles and GQA heads.
    if ("cpu", "cpu") not in PAIRS:
        pytest.skip("the C++ CPU kernels are not built here")
    shape = (1, 2, 1, 300, 1100, 64)
    q, k, v = make_qkv(shape, torch.float32, "cpu")
    kwargs = {"window": (200, 700)} if variant == "window" else variant_kwargs(variant, shape, "cpu")
    check_attention("cpu", q, k, v, kwargs)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_non_contiguous_inputs(backend, device):
    # (B, S, H, D) storage viewed as (B, H, S, D), as after a QKV projection.
    q = torch.randn(2, 19, 4, 32, device=device).half().transpose(1, 2)
    k = torch.randn(2, 23, 4, 32, device=device).half().transpose(1, 2)
    v = torch.randn(2, 23, 4, 64, device=device).half()[..., ::2].transpose(1, 2)  # last-dim stride 2
    check_attention(backend, q, k, v, {"is_causal": True})


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_gradient_through_lse_alone(backend, device):
    # The output unused, the lse alone carries the gradient (autograd passes no zero-filled
    # gradient for the output: the backward makes its own).
    q, k, v = make_qkv((1, 2, 2, 9, 13, 16), torch.float32, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with fuseformer.use_backend(backend):
        _out, lse = fuseformer.ops.attention(*leaves, is_causal=True, return_lse=True)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _ref, ref_lse = math_attention(*leaves64, **math_kwargs({"is_causal": True}, torch.float64, 16))
    grad = torch.randn_like(lse)
    got = torch.autograd.grad(lse, leaves, grad)
    want = torch.autograd.grad(ref_lse, leaves64, grad.double(), allow_unused=True)  # lse does not read v
    for name, g, w, t in zip("qkv", got, want, leaves64):
        w = torch.zeros_like(t) if w is None else w
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_empty_sequences(backend, device):
    q, k, v = make_qkv((2, 2, 2, 0, 5, 16), torch.float16, device)
    with fuseformer.use_backend(backend):
        assert fuseformer.ops.attention(q, k, v).shape == (2, 2, 0, 16)
    q, k, v = make_qkv((2, 2, 2, 4, 0, 16), torch.float16, device)
    with fuseformer.use_backend(backend):
        out, lse = fuseformer.ops.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ---- dropout -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", TRITON_PAIRS, ids=TRITON_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_with_the_kernels_mask(backend, device, causal):
    """Forward and backward use one mask: the kernel's, regenerated from the call's seed."""
    shape, p = (2, 2, 1, 40, 50, 32), 0.3
    q, k, v = make_qkv(shape, torch.float16, device)
    torch.manual_seed(1234)
    seed = _draw_seed(q.device)
    keep = attention_kernels.dropout_keep_mask(seed, 2, 2, 40, 50, p)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1234)
    with fuseformer.use_backend(backend):
        out = fuseformer.ops.attention(*leaves, dropout_p=p, is_causal=causal, enable_gqa=True)
    kwargs = dict(scale=32**-0.5, window=(-1, 0) if causal else (-1, -1), dropout_p=p)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = math_attention(*leaves64, dropout_keep=keep, **kwargs)
    leaves_lp = [t.detach().requires_grad_() for t in (q, k, v)]
    lowp, _ = math_attention(*leaves_lp, dropout_keep=keep, **kwargs)
    assert_matches_reference("out", out, ref, lowp)
    grad_out = torch.randn_like(out)
    for name, g, w, lp in zip(
        ("dq", "dk", "dv"),
        grads_of(out, leaves, grad_out),
        grads_of(ref, leaves64, grad_out.double()),
        grads_of(lowp, leaves_lp, grad_out),
    ):
        assert_matches_reference(name, g, w, lp)


@pytest.mark.parametrize("backend,device", TRITON_PAIRS, ids=TRITON_IDS)
def test_dropout_statistics_and_reproducibility(backend, device):
    p, shape = 0.25, (2, 3, 64, 96)
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    keep = attention_kernels.dropout_keep_mask(seed, *shape, p)
    n = keep.numel()
    # The kept fraction within 5 binomial standard deviations of 1 - p.
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # Neighbouring rows, columns and heads are not copies of each other.
    assert not torch.equal(keep[:, :, 0], keep[:, :, 1])
    assert not torch.equal(keep[:, 0], keep[:, 1])
    assert not torch.equal(keep[..., 0], keep[..., 1])
    q, k, v = make_qkv((1, 2, 2, 30, 30, 16), torch.float16, device)
    with fuseformer.use_backend(backend):
        torch.manual_seed(7)
        a = fuseformer.ops.attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(7)
        b = fuseformer.ops.attention(q, k, v, dropout_p=0.5)
        c = fuseformer.ops.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---- packed variable-length sequences -----------------------------------------------------


def pack(lengths, heads, head_dim, dtype, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return torch.randn(sum(lengths), heads, head_dim, device=device).to(dtype), cu


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"is_causal": True, "causal_variant": "lower_right", "softcap": 3.0}])
def test_varlen_matches_each_sequence_alone(poison_outputs, backend, device, kwargs):
    lengths_q, lengths_k, heads, kv_heads, head_dim = [5, 33, 1, 0, 20], [7, 30, 4, 3, 20], 4, 2, 48
    q, cu_q = pack(lengths_q, heads, head_dim, torch.float16, device)
    k, cu_k = pack(lengths_k, kv_heads, head_dim, torch.float16, device)
    v, _ = pack(lengths_k, kv_heads, head_dim, torch.float16, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with fuseformer.use_backend(backend):
        out, lse = fuseformer.ops.attention_varlen(
            *leaves, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True, **kwargs
        )
    assert lse.shape == (heads, q.shape[0])
    grad_out = torch.randn_like(out)
    grads = grads_of(out, leaves, grad_out)
    # Each sequence through the dense op's reference, its rows of the packed results.
    for b in range(len(lengths_q)):
        rq, rk = slice(cu_q[b].item(), cu_q[b + 1].item()), slice(cu_k[b].item(), cu_k[b + 1].item())
        if rq.stop == rq.start:
            continue
        dense = [t.transpose(0, 1)[None] for t in (q[rq], k[rk], v[rk])]
        leaves64 = [t.detach().double().requires_grad_() for t in dense]
        ref, ref_lse = math_attention(*leaves64, **math_kwargs(kwargs, torch.float64, head_dim))
        leaves_lp = [t.detach().requires_grad_() for t in dense]
        lowp, _ = math_attention(*leaves_lp, **math_kwargs(kwargs, torch.float16, head_dim))
        g = grad_out[rq].transpose(0, 1)[None]
        assert_matches_reference(f"out[{b}]", out[rq].transpose(0, 1)[None], ref, lowp)
        fin = torch.isfinite(ref_lse[0])
        torch.testing.assert_close(lse[:, rq][fin].double(), ref_lse[0][fin], atol=1e-3, rtol=0)
        want = grads_of(ref, leaves64, g.double())
        lp = grads_of(lowp, leaves_lp, g)
        assert_matches_reference(f"dq[{b}]", grads[0][rq].transpose(0, 1)[None], want[0], lp[0])
        # dk/dv of this sequence's keys (GQA: summed over the group, as in the dense op).
        assert_matches_reference(f"dk[{b}]", grads[1][rk].transpose(0, 1)[None], want[1], lp[1])
        assert_matches_reference(f"dv[{b}]", grads[2][rk].transpose(0, 1)[None], want[2], lp[2])


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_varlen_rows_past_the_last_offset_are_zero(poison_outputs, backend, device):
    """Packed tensors may hold rows after cu_seqlens[-1] (padding of a fixed buffer): they
    belong to no sequence, so their outputs and gradients are zero, never unwritten memory."""
    q, _ = pack([6, 9], 2, 32, torch.float16, device)
    k, _ = pack([7, 8], 2, 32, torch.float16, device)
    v, _ = pack([7, 8], 2, 32, torch.float16, device)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)  # 5 trailing query rows
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)  # 3 trailing key rows
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with fuseformer.use_backend(backend):
        out, lse = fuseformer.ops.attention_varlen(*leaves, cu_q, cu_k, 6, 7, is_causal=True, return_lse=True)
    dq, dk, dv = grads_of(out, leaves, torch.randn_like(out))
    assert torch.equal(out[10:], torch.zeros_like(out[10:])) and torch.isneginf(lse[:, 10:]).all()
    assert torch.equal(dq[10:], torch.zeros_like(dq[10:]))
    assert torch.equal(dk[12:], torch.zeros_like(dk[12:])) and torch.equal(dv[12:], torch.zeros_like(dv[12:]))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("backend,device", TRITON_PAIRS, ids=TRITON_IDS)
def test_varlen_dropout_matches_reference_with_the_kernels_mask(backend, device):
    """Packed sequences draw the mask of the padded (B, H, max_q, max_k) layout: sequence b
    uses its top-left corner. Forward and backward against the reference with that mask."""
    # (No short sequence: the first query sees a single key, whose dQ cancels to exactly 0
    # and leaves float rounding that a short sequence's small dQ cannot absorb.)
    lengths_q, lengths_k, heads, head_dim, p = [7, 30, 12], [9, 25, 14], 2, 32, 0.25
    q, cu_q = pack(lengths_q, heads, head_dim, torch.float16, device)
    k, cu_k = pack(lengths_k, heads, head_dim, torch.float16, device)
    v, _ = pack(lengths_k, heads, head_dim, torch.float16, device)
    torch.manual_seed(99)
    seed = _draw_seed(q.device)
    keep = attention_kernels.dropout_keep_mask(seed, len(lengths_q), heads, max(lengths_q), max(lengths_k), p)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(99)
    with fuseformer.use_backend(backend):
        out = fuseformer.ops.attention_varlen(*leaves, cu_q, cu_k, max(lengths_q), max(lengths_k), dropout_p=p, is_causal=True)
    grad_out = torch.randn_like(out)
    grads = grads_of(out, leaves, grad_out)
    for b, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        rq, rk = slice(cu_q[b].item(), cu_q[b + 1].item()), slice(cu_k[b].item(), cu_k[b + 1].item())
        dense = [t.transpose(0, 1)[None] for t in (q[rq], k[rk], v[rk])]
        kw = dict(scale=head_dim**-0.5, window=(-1, 0), dropout_p=p, dropout_keep=keep[b : b + 1, :, :lq, :lk])
        leaves64 = [t.detach().double().requires_grad_() for t in dense]
        ref, _ = math_attention(*leaves64, **kw)
        leaves_lp = [t.detach().requires_grad_() for t in dense]
        lowp, _ = math_attention(*leaves_lp, **kw)
        g = grad_out[rq].transpose(0, 1)[None]
        assert_matches_reference(f"out[{b}]", out[rq].transpose(0, 1)[None], ref, lowp)
        want, lp = grads_of(ref, leaves64, g.double()), grads_of(lowp, leaves_lp, g)
        for name, got, rows in (("dq", grads[0], rq), ("dk", grads[1], rk), ("dv", grads[2], rk)):
            i = "dq dk dv".split().index(name)
            assert_matches_reference(f"{name}[{b}]", got[rows].transpose(0, 1)[None], want[i], lp[i])


# ---- KV-cache decode ----------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", DECODE_PAIRS, ids=DECODE_IDS)
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["fp16", "fp32", "bf16"])
def test_decode_matches_full_attention_over_the_cache(poison_outputs, backend, device, groups, n_new, dtype):
    if dtype != torch.float16 and (backend != "cpu" or groups in (2, 8)):
        pytest.skip("other dtypes: on the C++ CPU kernel (float32 and bfloat16 inputs converted per key block)")
    # The C++ CPU kernel takes keys in blocks of 256: a longer cache crosses blocks and chunks.
    check_decode(backend, device, groups, n_new, dtype, 700 if backend == "cpu" else 150, 64)


@pytest.mark.parametrize("head_dim", [64, 160])
@pytest.mark.parametrize("backend,device", [p for p in DECODE_PAIRS if p == ("triton", "cpu")], ids=str)
def test_decode_gpu_tiles_under_the_interpreter(monkeypatch, backend, device, head_dim):
    # A GPU takes 64-key tiles up to D 128 and splits the cache for two waves of 132 SMs
    # (H100, H200): many chunks per (batch, kv head), most of them empty for short caches.
    block_n = attention_kernels._DECODE_GPU_BLOCK_N[head_dim > 128]
    monkeypatch.setattr(attention_kernels, "_INTERPRETER_DECODE_BLOCK_N", block_n)
    monkeypatch.setattr(attention_kernels, "_INTERPRETER_DECODE_PROGRAMS", 264)
    check_decode(backend, device, 4, 3, torch.float16, 1000, head_dim)


def check_decode(backend, device, groups, n_new, dtype, max_k, head_dim):
    """attention_with_kv_cache against full attention over each batch's valid prefix, with the
    chunks chosen for the device (0) and forced (1, 3); the new keys appended in place."""
    batch, kv_heads = 3, 2
    heads = kv_heads * groups
    k_cache = torch.randn(batch, kv_heads, max_k, head_dim, device=device).to(dtype)
    v_cache = torch.randn(batch, kv_heads, max_k, head_dim, device=device).to(dtype)
    q = torch.randn(batch, heads, n_new, head_dim, device=device).to(dtype)
    k_new = torch.randn(batch, kv_heads, n_new, head_dim, device=device).to(dtype)
    v_new = torch.randn(batch, kv_heads, n_new, head_dim, device=device).to(dtype)
    cache_seqlens = torch.tensor([17, 0, max_k - n_new], dtype=torch.int32, device=device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    for num_splits in (0, 1, 3):
        k_cache.copy_(k_before)
        v_cache.copy_(v_before)
        with fuseformer.use_backend(backend):
            out, lse = fuseformer.ops.attention_with_kv_cache(
                q, k_cache, v_cache, cache_seqlens, k_new, v_new, is_causal=True, num_splits=num_splits, return_lse=True
            )
        for b in range(batch):
            start = cache_seqlens[b].item()
            stop = start + n_new
            # The new keys landed in place; the rest of the cache is untouched.
            assert torch.equal(k_cache[b, :, start:stop], k_new[b]) and torch.equal(v_cache[b, :, start:stop], v_new[b])
            assert torch.equal(k_cache[b, :, stop:], k_before[b, :, stop:])
            assert torch.equal(k_cache[b, :, :start], k_before[b, :, :start])
            # Full attention of the new queries over the valid prefix, lower-right causal.
            dense = (q[b : b + 1], k_cache[b : b + 1, :, :stop], v_cache[b : b + 1, :, :stop])
            kw = dict(scale=head_dim**-0.5, window=(-1, 0), lower_right=True)
            ref, ref_lse = math_attention(*(t.double() for t in dense), **kw)
            lowp, _ = math_attention(*dense, **kw)
            assert_matches_reference(f"out[{b}] splits={num_splits}", out[b : b + 1], ref, lowp)
            torch.testing.assert_close(lse[b : b + 1].double(), ref_lse, atol=1e-3, rtol=0)


@pytest.mark.parametrize("seqlen", [32, 256, 384])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("gemm_library", ["onednn", "aten"])
def test_cpu_default_takes_the_kernels_from_the_crossover(monkeypatch, seqlen, causal, gemm_library):
    # From 128x128 scores the kernels; where SDPA's tiles run on MKL's fast kernels too (Intel
    # CPUs: backends.cpu_gemm_library() == "aten") from 384x384 and only causal.
    if ("cpu", "cpu") not in PAIRS or fuseformer.backends.resolve("attention", torch.device("cpu")) != "cpu":
        pytest.skip("the C++ CPU kernels are not the CPU default here")
    monkeypatch.setattr(fuseformer.backends, "cpu_gemm_library", lambda: gemm_library)
    want_kernel = seqlen >= 384 and causal if gemm_library == "aten" else seqlen >= 128
    attention_ops = sys.modules["fuseformer.ops.attention"]  # the package exports the function under that name
    calls = []
    real = attention_ops._cpp_attention
    monkeypatch.setattr(attention_ops, "_cpp_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv((1, 2, 2, seqlen, seqlen, 32), torch.float32, "cpu")
    out = fuseformer.ops.attention(q, k, v, is_causal=causal)
    assert bool(calls) == want_kernel
    with fuseformer.use_backend("torch"):
        torch.testing.assert_close(out, fuseformer.ops.attention(q, k, v, is_causal=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [[40, 40], [17, 61], [0, 9]], ids=["equal", "ragged", "empty"])
@pytest.mark.parametrize("n_new", [1, 3])
def test_cpu_default_decode_without_gqa(causal, seqlens, n_new):
    # Unforced CPU decode without GQA (one query row per head): the same result as the
    # reference, empty sequences included.
    batch, heads, max_k, head_dim = 2, 4, 80, 32
    k_cache, v_cache = torch.randn(batch, heads, max_k, head_dim), torch.randn(batch, heads, max_k, head_dim)
    q = torch.randn(batch, heads, n_new, head_dim)
    k_new, v_new = torch.randn(batch, heads, n_new, head_dim), torch.randn(batch, heads, n_new, head_dim)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    caches = (k_cache.clone(), v_cache.clone())
    out = fuseformer.ops.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, is_causal=causal)
    with fuseformer.use_backend("torch"):
        ref = fuseformer.ops.attention_with_kv_cache(q, *caches, cache_seqlens, k_new, v_new, is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, caches[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", DECODE_PAIRS, ids=DECODE_IDS)
def test_decode_features_and_empty_cache(backend, device):
    batch, heads, kv_heads, max_k, head_dim = 2, 4, 1, 90, 80
    q = torch.randn(batch, heads, 2, head_dim, device=device).half()
    k_cache = torch.randn(batch, kv_heads, max_k, head_dim, device=device).half()
    v_cache = torch.randn(batch, kv_heads, max_k, head_dim, device=device).half()
    slopes = torch.rand(heads, device=device)
    seqlens = torch.tensor([60, 2], dtype=torch.int32, device=device)
    kwargs = dict(is_causal=True, window=(20, -1), softcap=5.0, alibi_slopes=slopes)
    with fuseformer.use_backend(backend):
        out = fuseformer.ops.attention_with_kv_cache(q, k_cache, v_cache, seqlens, **kwargs)
    for b in range(batch):
        n = seqlens[b].item()
        dense = (q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n])
        kw = dict(scale=head_dim**-0.5, window=(20, 0), softcap=5.0, alibi_slopes=slopes, lower_right=True)
        ref, _ = math_attention(*(t.double() for t in dense), **kw)
        lowp, _ = math_attention(*dense, **kw)
        assert_matches_reference(f"out[{b}]", out[b : b + 1], ref, lowp)
    with fuseformer.use_backend(backend):
        out, lse = fuseformer.ops.attention_with_kv_cache(q, k_cache, v_cache, 0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ---- registration, compile, modules --------------------------------------------------------


def _grad_leaves(args):
    return tuple(
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 4 else a
        for a in args
    )


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_opcheck(backend, device):
    q, k, v = make_qkv((1, 4, 2, 17, 19, 32), torch.float32, device)
    mask = torch.rand(1, 4, 17, 19, device=device) > 0.3
    slopes = torch.rand(4, device=device)
    if backend == "triton":
        fwd = torch.ops.fuseformer.triton_attention_fwd.default
        seed = torch.tensor([5], device=device)
        samples = [
            (q, k, v, None, None, None, None, None, 17, 19, 0.2, 0.0, -1, -1, False, 0.0),
            (q, k, v, mask, slopes, seed, None, None, 17, 19, 0.2, 3.0, 4, 0, True, 0.1),
        ]
    else:  # the C++ kernels: float32, additive masks, per-batch key counts
        fwd = torch.ops.fuseformer.attention_fwd.default
        additive = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
        samples = [
            (q, k, v, None, None, None, 0.2, 0.0, -1, -1, False),
            (q, k, v, additive, slopes, torch.tensor([11], dtype=torch.int32, device=device), 0.2, 3.0, 4, 0, True),
        ]
    for args in samples:
        torch.library.opcheck(fwd, _grad_leaves(args))


@pytest.mark.parametrize("backend,device", DECODE_PAIRS, ids=DECODE_IDS)
def test_opcheck_decode(backend, device):
    k_cache, v_cache = make_qkv((2, 2, 2, 40, 40, 32), torch.float16, device)[1:]
    q = torch.randn(2, 4, 1, 32, device=device).half()
    seqlens = torch.tensor([5, 40], dtype=torch.int32, device=device)
    decode = (torch.ops.fuseformer.triton_attention_decode if backend == "triton"
              else torch.ops.fuseformer.attention_decode).default
    torch.library.opcheck(decode, (q, k_cache, v_cache, seqlens, None, 0.2, 0.0, -1, -1, 2))
    if backend == "cpu":  # also float32 with ALiBi, a window and a softcap
        torch.library.opcheck(decode, (q.float(), k_cache.float(), v_cache.float(), seqlens, torch.rand(4, device=device),
                                       0.2, 3.0, 8, 0, 0))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_compiles_fullgraph(backend, device):
    q, k, v = make_qkv((1, 2, 2, 24, 24, 32), torch.float16, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return fuseformer.ops.attention(q, k, v, is_causal=True, dropout_p=0.0, window=(8, -1))

    with fuseformer.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(*leaves)
        eager = f(*leaves)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("backend,device", TRITON_PAIRS, ids=TRITON_IDS)
def test_dropout_compiles_fullgraph_and_reproduces(backend, device):
    """The dropout seed is drawn inside the traced function: compiled calls are reproducible
    from torch.manual_seed like eager ones, and differ between calls."""
    q, k, v = make_qkv((1, 2, 2, 20, 24, 32), torch.float16, device)

    def f(q, k, v):
        return fuseformer.ops.attention(q, k, v, dropout_p=0.3, is_causal=True)

    with fuseformer.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.manual_seed(11)
        a = compiled(q, k, v)
        b = compiled(q, k, v)
        torch.manual_seed(11)
        eager = f(q, k, v)
    assert torch.equal(a, eager)
    assert not torch.equal(a, b)


MHA_CASES = [
    dict(),
    dict(batch_first=True),
    dict(kdim=24, vdim=40),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(bias=False, batch_first=True),
]


@pytest.mark.parametrize("kwargs", MHA_CASES, ids=lambda kw: "-".join(kw) or "default")
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_multihead_attention_is_a_drop_in(backend, device, kwargs, need_weights):
    embed, heads, batch, seqlen_q, seqlen_k = 64, 4, 3, 11, 13
    theirs = torch.nn.MultiheadAttention(embed, heads, **kwargs).to(device)
    ours = fuseformer.nn.MultiheadAttention(embed, heads, **kwargs).to(device)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    bf = kwargs.get("batch_first", False)

    def make(seq, dim):
        return torch.randn((batch, seq, dim) if bf else (seq, batch, dim), device=device, requires_grad=True)

    query, key, value = make(seqlen_q, embed), make(seqlen_k, kwargs.get("kdim", embed)), make(seqlen_k, kwargs.get("vdim", embed))
    padding = torch.rand(batch, seqlen_k, device=device) < 0.3
    padding[:, 0] = False
    attn_mask = torch.randn(seqlen_q, seqlen_k, device=device)
    with fuseformer.use_backend(backend):
        out, weights = ours(query, key, value, key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
    ref, ref_weights = theirs(query, key, value, key_padding_mask=padding.float().masked_fill(padding, float("-inf")),
                              attn_mask=attn_mask, need_weights=need_weights)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [query, key, value, *ours.parameters()], grad)
    want = torch.autograd.grad(ref, [query, key, value, *theirs.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_multihead_attention_causal_and_unbatched(backend, device):
    embed, heads = 64, 2
    theirs = torch.nn.MultiheadAttention(embed, heads).to(device).eval()
    ours = fuseformer.nn.MultiheadAttention(embed, heads).to(device).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, embed, device=device)  # unbatched (L, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9, device=device)
    with fuseformer.use_backend(backend):
        out, _ = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        out_flag, _ = ours(x, x, x, is_causal=True, need_weights=False)
    ref, _ = theirs(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_flag, ref, atol=2e-5, rtol=1e-4)


# ---- bad input -----------------------------------------------------------------------------


def _bad_calls(device):
    q, k, v = make_qkv((2, 4, 2, 8, 8, 32), torch.float16, device)
    attn = fuseformer.ops.attention
    return [
        (lambda: attn(q, k, v), ValueError, "enable_gqa=True"),
        (lambda: attn(q, k[:, :1].expand(2, 3, 8, 32), v[:, :1].expand(2, 3, 8, 32), enable_gqa=True), ValueError, "multiple"),
        (lambda: attn(q, k, v.float(), enable_gqa=True), TypeError, "share a dtype"),
        (lambda: attn(q[0], k, v), ValueError, "4-D"),
        (lambda: attn(q, k, v, attn_mask=torch.ones(3, 8, 8, dtype=torch.bool, device=device), enable_gqa=True), ValueError, "broadcast"),
        (lambda: attn(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int32, device=device), enable_gqa=True), TypeError, "attn_mask"),
        (lambda: attn(q, k, v, dropout_p=1.0, enable_gqa=True), ValueError, "dropout_p"),
        (lambda: attn(q, k, v, window=(2,), enable_gqa=True), ValueError, "window"),
        (lambda: attn(q, k, v, softcap=-1.0, enable_gqa=True), ValueError, "softcap"),
        (lambda: attn(q, k, v, alibi_slopes=torch.rand(3, device=device), enable_gqa=True), ValueError, "alibi_slopes"),
        (lambda: attn(q, k, v, causal_variant="diagonal", enable_gqa=True), ValueError, "causal_variant"),
        (lambda: attn(q, k, v.to("meta"), enable_gqa=True), ValueError, "device"),
        (lambda: attn(q, k, v[..., :16], enable_gqa=True), ValueError, "v's head dim"),
        (lambda: fuseformer.ops.attention_with_kv_cache(q, k, v, 7, k[:, :, :2], v[:, :, :2]), ValueError, "cache_seqlens"),
        (lambda: fuseformer.ops.attention_with_kv_cache(q, k, v, 3, k[:, :, :2]), ValueError, "k_new and v_new"),
        (lambda: fuseformer.ops.attention_varlen(q[0], k[0], v[0], torch.tensor([0, 4], device=device),
                                                 torch.tensor([0, 8], dtype=torch.int32, device=device), 4, 8),
         ValueError, "cu_seqlens_q"),
        (lambda: fuseformer.ops.attention_varlen(q[0, :, :4].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                                 torch.tensor([0, 9], dtype=torch.int32, device=device),
                                                 torch.tensor([0, 8], dtype=torch.int32, device=device), 9, 8),
         ValueError, "end at most"),
    ]


@pytest.mark.parametrize("case", range(17))
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_bad_input_is_a_clear_error(backend, device, case):
    call, error, match = _bad_calls(device)[case]
    with fuseformer.use_backend(backend), pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend,device", TRITON_PAIRS, ids=TRITON_IDS)
def test_head_dims_outside_the_triton_range_are_a_clear_error(backend, device):
    q, k, v = make_qkv((1, 2, 2, 8, 8, 8), torch.float16, device)
    with fuseformer.use_backend(backend), pytest.raises(ValueError, match="head dims 16 to 256"):
        fuseformer.ops.attention(q, k, v)
    # Not forced, the call runs on the reference path.
    ref, _ = math_attention(q.double(), k.double(), v.double(), scale=8**-0.5)
    torch.testing.assert_close(fuseformer.ops.attention(q, k, v).double(), ref, atol=2e-3, rtol=0)


def test_forcing_a_backend_without_the_ops_kernels_is_a_clear_error(monkeypatch):
    q, k, v = make_qkv((1, 1, 1, 4, 4, 16), torch.float32, "cpu")
    monkeypatch.setitem(fuseformer.backends.IMPLEMENTED, "attention", ("torch",))
    with fuseformer.use_backend("torch"):
        fuseformer.ops.attention(q, k, v)
    if "cpu" in fuseformer.available_backends("cpu"):
        with fuseformer.use_backend("cpu"), pytest.raises(fuseformer.BackendUnavailableError, match="no attention kernels"):
            fuseformer.ops.attention(q, k, v)


def test_reference_backend_matches_sdpa_math():
    q, k, v = make_qkv((2, 4, 2, 10, 13, 16), torch.float64, "cpu")
    mask = torch.rand(10, 13) > 0.3
    mask[:, 0] = True
    with fuseformer.use_backend("torch"):
        out = fuseformer.ops.attention(q, k, v, attn_mask=mask, enable_gqa=True)
        causal = fuseformer.ops.attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(causal, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_multihead_attention_compiles_fullgraph():
    mha = fuseformer.nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 9, 64, requires_grad=True)
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    out, _ = compiled(x, x, x, need_weights=False, is_causal=True)
    ref, _ = mha(x, x, x, need_weights=False, is_causal=True)
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(grad, ref_grad)


def test_multihead_attention_under_autocast():
    theirs = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    ours = fuseformer.nn.MultiheadAttention(64, 4, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
        ref_bf16, _ = theirs(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)
    x64 = x.double()
    ref, _ = theirs.double()(x64, x64, x64, need_weights=False, attn_mask=causal.double(), is_causal=True)
    assert out.dtype == ref_bf16.dtype == torch.bfloat16
    assert_matches_reference("autocast out", out, ref, ref_bf16)
