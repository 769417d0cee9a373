"""linear_cross_entropy: every backend available here against the float64 PyTorch reference
(F.cross_entropy of F.linear), the loss and every gradient under a random upstream gradient,
on awkward shapes, chunkings, ignored targets, label smoothing, softcaps and both reductions; the module;
compile, autocast, opcheck; the logits never held whole; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fuseformer
from fuseformer.bench import harness
from accuracy import assert_matches_reference, backend_device_pairs

PAIRS = backend_device_pairs("linear_cross_entropy")
IDS = [f"{b}-{d}" for b, d in PAIRS]


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    # No dots in the Triton row kernel (its GEMMs are PyTorch's), so bf16 runs under the
    # interpreter too.
    return [torch.float32, torch.float16, torch.bfloat16]


# (x shape, vocab, chunk_rows): one row; chunks with a remainder; leading dimensions; a vocab
# far from a power of two; chunks of one row; more chunk rows than rows.
SHAPES = [
    ((1, 32), 10, None),
    ((7, 24), 100, 3),
    ((2, 9, 40), 257, 4),
    ((33, 16), 1000, 1),
    ((65, 48), 96, 200),
]
# (bias, ignored fraction, keyword arguments)
OPTIONS = [
    (True, 0.0, {}),
    (False, 0.3, {"label_smoothing": 0.1}),
    (True, 0.3, {"reduction": "sum"}),
    (False, 0.1, {"softcap": 2.0, "label_smoothing": 0.05}),  # a cap the O(1-3) logits feel
]


def make_inputs(x_shape, vocab, dtype, device, bias, ignored, ignore_index=-100):
    c = x_shape[-1]
    x = torch.randn(x_shape, device=device).to(dtype).requires_grad_()
    # Logits of O(1-3): a softmax neither uniform nor one-hot.
    w = (torch.randn(vocab, c, device=device) * 2 / c**0.5).to(dtype).requires_grad_()
    b = torch.randn(vocab, device=device).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, x_shape[:-1], device=device)
    target[torch.rand(target.shape, device=device) < ignored] = ignore_index
    return x, w, b, target


def reference(x, w, b, target, softcap=None, **kw):
    logits = F.linear(x, w, b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), target.reshape(-1), **kw)


def check_against_reference(backend, x, w, b, target, chunk_rows=None, **kw):
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    names = [n for n, t in (("x", x), ("weight", w), ("bias", b)) if t is not None and t.requires_grad]
    with fuseformer.use_backend(backend):
        loss = fuseformer.ops.linear_cross_entropy(x, w, target, b, chunk_rows=chunk_rows, **kw)
    g = torch.randn((), device=x.device).to(x.dtype)  # a scalar upstream gradient other than 1
    ours = torch.autograd.grad(loss, leaves, g) if leaves else ()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    as64 = dict(zip(names, leaves64))
    ref = reference(as64.get("x", x.detach().double()), as64.get("weight", w.detach().double()),
                    as64.get("bias", b.detach().double() if b is not None else None), target, **kw)
    ref_grads = torch.autograd.grad(ref, leaves64, g.double()) if leaves else ()
    low = reference(x, w, b, target, **kw)
    low_grads = torch.autograd.grad(low, leaves, g) if leaves else ()
    assert_matches_reference("loss", loss.detach(), ref.detach(), low.detach())
    for name, got, want, lowp in zip(names, ours, ref_grads, low_grads):
        assert_matches_reference(f"grad {name}", got, want, lowp)


def reference_cases():
    return [
        pytest.param(b, d, dt, s, o, id=f"{b}-{d}-{str(dt)[6:]}-{'x'.join(map(str, s[0]))}-v{s[1]}-c{s[2]}-{i}")
        for b, d in PAIRS
        for dt in dtypes_for(b, d)
        for s in SHAPES
        for i, o in enumerate(OPTIONS)
        # Half-precision errors of a one-row loss are a rounding or two: chance against PyTorch's.
        if dt == torch.float32 or s[0][0] > 1
    ]


@pytest.mark.parametrize("backend,device,dtype,shape,options", reference_cases())
def test_matches_reference(poison_outputs, backend, device, dtype, shape, options):
    x_shape, vocab, chunk_rows = shape
    bias, ignored, kwargs = options
    x, w, b, target = make_inputs(x_shape, vocab, dtype, device, bias, ignored)
    check_against_reference(backend, x, w, b, target, chunk_rows, **kwargs)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_custom_ignore_index_and_gpt_style_targets(backend, device):
    # nanoGPT marks padding with -1; a class index may be ignored too.
    for ignore_index in (-1, 3):
        x, w, b, target = make_inputs((4, 6, 20), 50, torch.float32, device, False, 0.25, ignore_index)
        check_against_reference(backend, x, w, b, target, 5, ignore_index=ignore_index)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_vocab_over_many_tiles(monkeypatch, backend, device):
    # The Triton row kernel walks the vocabulary in tiles of at most MAX_BLOCK: small tiles
    # here so the online log-sum-exp crosses many of them (and ends on a partial one).
    from fuseformer.kernels import loss as triton_loss

    monkeypatch.setattr(triton_loss, "MAX_BLOCK", 64)
    x, w, b, target = make_inputs((9, 16), 1000, torch.float32, device, True, 0.2)
    check_against_reference(backend, x, w, b, target, 4, label_smoothing=0.2)
    check_against_reference(backend, x, w, b, target, 4, softcap=1.5)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
@pytest.mark.parametrize("needs", ["x", "weight", "bias", "weight+bias"])
def test_only_some_inputs_need_gradients(backend, device, needs):
    x, w, b, target = make_inputs((6, 12), 30, torch.float32, device, True, 0.0)
    for name, t in (("x", x), ("weight", w), ("bias", b)):
        t.requires_grad_(name in needs.split("+"))
    check_against_reference(backend, x, w, b, target, 4)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_every_target_ignored_follows_pytorch(backend, device):
    # mean over no rows: NaN as PyTorch's; the gradients: zeros (PyTorch's too).
    x, w, b, target = make_inputs((5, 8), 12, torch.float32, device, True, 1.0)
    for reduction in ("mean", "sum"):
        with fuseformer.use_backend(backend):
            loss = fuseformer.ops.linear_cross_entropy(x, w, target, b, reduction=reduction)
        ref = reference(x, w, b, target, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)
        for got, want in zip(torch.autograd.grad(loss, (x, w, b)), torch.autograd.grad(ref, (x, w, b))):
            torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_inference_matches_and_takes_no_gradients(backend, device):
    x, w, b, target = make_inputs((3, 5, 16), 40, torch.float32, device, True, 0.1)
    with torch.no_grad(), fuseformer.use_backend(backend):
        loss = fuseformer.ops.linear_cross_entropy(x, w, target, b)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(x, w, b, target).detach())


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_empty_input_follows_pytorch(backend, device):
    x, w, b, target = make_inputs((0, 8), 12, torch.float32, device, True, 0.0)
    with fuseformer.use_backend(backend):
        loss = fuseformer.ops.linear_cross_entropy(x, w, target, b, reduction="sum")
    assert loss.item() == 0.0


def _op(backend):
    if backend == "triton":
        return torch.ops.fuseformer.triton_linear_cross_entropy_fwd.default
    return torch.ops.fuseformer.linear_cross_entropy_fwd.default


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_opcheck(backend, device):
    for bias, mean, needs in ((True, True, (True, True)), (False, False, (True, False)), (True, True, (False, False))):
        x, w, b, target = make_inputs((7, 12), 20, torch.float32, device, bias, 0.2)
        # What needs a gradient is what the flags say (the op's caller derives them so).
        x.requires_grad_(needs[0])
        for t in (w, b):
            if t is not None:
                t.requires_grad_(needs[1])
        torch.library.opcheck(_op(backend), (x, w, b, target, -100, 0.1, 3.0 if bias else 0.0, mean, 3, *needs))


@pytest.mark.parametrize("backend,device", PAIRS, ids=IDS)
def test_compiles_fullgraph_with_gradients(backend, device):
    x, w, b, target = make_inputs((2, 5, 16), 30, torch.float32, device, True, 0.2)

    def step(x, w, b, target):
        return fuseformer.ops.linear_cross_entropy(x, w, target, b, label_smoothing=0.1)

    with fuseformer.use_backend(backend):
        loss = torch.compile(step, fullgraph=True)(x, w, b, target)
    got = torch.autograd.grad(loss, (x, w, b))
    ref = reference(x, w, b, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(got, torch.autograd.grad(ref, (x, w, b))):
        torch.testing.assert_close(g, r)


def test_autocast_runs_in_the_autocast_dtype_like_eager():
    x, w, b, target = make_inputs((6, 16), 30, torch.float32, "cpu", True, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fuseformer.ops.linear_cross_entropy(x, w, target, b)
        low = reference(x, w, b, target)
    ref = reference(x.double(), w.double(), b.double(), target)
    assert loss.dtype == low.dtype == torch.float32  # autocast runs F.cross_entropy in float32
    assert_matches_reference("autocast loss", loss.detach(), ref.detach(), low.detach())
    assert torch.autograd.grad(loss, w)[0].dtype == torch.float32


@pytest.mark.skipif("cpu" not in fuseformer.available_backends("cpu"), reason="needs the C++ extension")
@pytest.mark.skipif(harness._cpu_peak_memory_mib(lambda: torch.empty(1 << 20)) is None,
                    reason="this torch's profiler reports no memory events")
def test_cpu_logits_never_exist_whole():
    # 2048 tokens x 8192 classes: 64 MiB of float32 logits, which eager keeps (with their
    # log-softmax and gradient). The kernel holds one 64-row chunk (2 MiB) at a time, and
    # what does not grow with the tokens: the weight's gradient and packed copies (2 MiB each).
    x, w, _, target = make_inputs((2048, 64), 8192, torch.float32, "cpu", False, 0.0)
    logits_mib = 2048 * 8192 * 4 / 2**20

    def train_step(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(), (x, w))

    with fuseformer.use_backend("cpu"):
        ours = harness._cpu_peak_memory_mib(
            train_step(lambda: fuseformer.ops.linear_cross_entropy(x, w, target, chunk_rows=64)))
    eager = harness._cpu_peak_memory_mib(train_step(lambda: reference(x, w, None, target)))
    assert ours < logits_mib / 4 and eager > 2 * logits_mib, (ours, eager)


# ---- the module ---------------------------------------------------------------------------


def test_module_matches_the_function_and_has_no_state():
    x, w, b, target = make_inputs((4, 16), 30, torch.float32, "cpu", True, 0.0)
    loss_fn = fuseformer.nn.LinearCrossEntropyLoss(ignore_index=-1, label_smoothing=0.05, reduction="sum",
                                                   softcap=30.0)
    assert loss_fn.state_dict() == {} and "label_smoothing=0.05" in repr(loss_fn)
    torch.testing.assert_close(
        loss_fn(x, w, target, b),
        reference(x, w, b, target, ignore_index=-1, label_smoothing=0.05, reduction="sum", softcap=30.0),
    )
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fuseformer.nn.LinearCrossEntropyLoss(reduction="none")


# ---- bad input ----------------------------------------------------------------------------

_x, _w, _t = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 4, 2])
_lce = fuseformer.ops.linear_cross_entropy

BAD_INPUT = [
    (lambda: _lce(_x, torch.randn(5, 7), _t), ValueError, r"weight must be 2-D \(vocab, in_features=8\)"),
    (lambda: _lce(_x, torch.randn(0, 8), _t), ValueError, "at least one row"),
    (lambda: _lce(_x, _w, _t, torch.randn(4)), ValueError, r"bias must have shape \[5\]"),
    (lambda: _lce(_x, _w.half(), _t), TypeError, "weight has dtype float16 but x has float32"),
    (lambda: _lce(_x.int(), _w, _t), TypeError, "x must have dtype"),
    (lambda: _lce(_x, _w, _t.float()), TypeError, "target must hold integer class indices"),
    (lambda: _lce(_x, _w, _t[:2]), ValueError, r"target must have x's leading shape \[3\]"),
    (lambda: _lce(_x, _w, torch.tensor([0, 5, 1])), ValueError, r"class indices in \[0, 5\)"),
    (lambda: _lce(_x, _w, torch.tensor([0, -2, 1])), ValueError, r"got values in \[-2, 1\]"),
    (lambda: _lce(_x, _w, _t, reduction="none"), ValueError, "per-token loss cannot be back-propagated"),
    (lambda: _lce(_x, _w, _t, label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    (lambda: _lce(_x, _w, _t, chunk_rows=0), ValueError, "chunk_rows must be a positive int"),
    (lambda: _lce(_x, _w, _t, softcap=0.0), ValueError, "softcap must be a positive float or None"),
    (lambda: _lce(_x, _w, _t, softcap="30"), ValueError, "softcap must be a positive float or None"),
    (lambda: _lce(_x, _w, _t, ignore_index=0.5), TypeError, "ignore_index must be an int"),
    (lambda: _lce(_x, _w.to("meta"), _t), ValueError, "weight is on meta but x is on cpu"),
    (lambda: _lce([1.0], _w, _t), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["torch", *[b for b, d in PAIRS if d == "cpu"]])
@pytest.mark.parametrize("make_call,error,match", BAD_INPUT, ids=[str(i) for i in range(len(BAD_INPUT))])
def test_bad_input_is_a_clear_error(make_call, error, match, backend):
    with fuseformer.use_backend(backend), pytest.raises(error, match=match):
        make_call()


@pytest.mark.skipif("cpu" not in fuseformer.available_backends("cpu"), reason="needs the C++ extension")
def test_cpp_kernel_checks_targets_itself():
    # Called directly (no Python checks in front), the kernel still refuses to index out of range.
    with pytest.raises(IndexError, match=r"target\[1\] = 7 is not a class index in \[0, 5\)"):
        torch.ops.fuseformer.linear_cross_entropy_fwd(_x, _w, None, torch.tensor([0, 7, 1]), -100, 0.0, 0.0, True, 0,
                                                      False, False)
