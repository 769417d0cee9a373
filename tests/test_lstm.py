"""LSTM: every backend available here against torch.nn.LSTM in float64 (outputs, final states
and the gradients of the input, the initial states and every parameter), by the 2x-PyTorch
rule, over layers, directions, projections, batch_first, unbatched input, sizes of one and
tile remainders; variable lengths (padded with lengths, sorted or not, and PackedSequence);
the nn.LSTM drop-in (state_dict both ways, dropout), opcheck, torch.compile, autocast; bad input.

bf16 on the Triton backend runs only on CUDA: the interpreter computes bf16 dots wrongly."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fuseformer
from accuracy import assert_matches_reference, backend_device_pairs

PAIRS = backend_device_pairs("lstm")
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]


@dataclass(frozen=True)
class Config:
    input_size: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0
    batch: int = 3
    steps: int = 5
    batch_first: bool = False
    hx: bool = True
    bias: bool = True

    def module(self, cls=torch.nn.LSTM, dropout=0.0):
        return cls(self.input_size, self.hidden, num_layers=self.layers, bias=self.bias, batch_first=self.batch_first,
                   dropout=dropout, bidirectional=self.bidirectional, proj_size=self.proj)


CONFIGS = [
    Config(5, 6, steps=7, hx=False),
    Config(8, 20, layers=2, bidirectional=True, batch=4, batch_first=True),  # hidden past one tile
    Config(6, 12, layers=2, bidirectional=True, proj=5, batch=3, steps=6),  # projection
    Config(3, 1, batch=1, steps=1),  # every size one
    Config(17, 33, batch=18, steps=4),  # two row tiles, odd hidden
    Config(4, 8, layers=3, proj=3, batch=2, steps=9, batch_first=True, hx=False, bias=False),
    # The general walk (hidden not a multiple of 16) with GEMMs past 2^20 multiply-adds: on the
    # CPU the weight gradients through oneDNN (csrc/cpu/gemm.h weight_grad).
    Config(48, 40, batch=24, steps=16),
]


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" or backend != "triton" else [])


def make_case(cfg: Config, device: str):
    """A float64 torch.nn.LSTM with fresh weights and inputs, and upstream gradients."""
    ref = cfg.module().double().to(device)
    with torch.no_grad():  # weights a little larger than the default init: gates away from 1/2
        for p in ref.parameters():
            p.uniform_(-0.6, 0.6)
    shape = (cfg.batch, cfg.steps) if cfg.batch_first else (cfg.steps, cfg.batch)
    x = torch.randn(*shape, cfg.input_size, dtype=torch.float64, device=device)
    dirs = 2 if cfg.bidirectional else 1
    real = cfg.proj or cfg.hidden
    hx = None
    if cfg.hx:
        hx = (torch.randn(cfg.layers * dirs, cfg.batch, real, dtype=torch.float64, device=device),
              torch.randn(cfg.layers * dirs, cfg.batch, cfg.hidden, dtype=torch.float64, device=device))
    out_shape = (*shape, dirs * real)
    grads = (torch.randn(out_shape, dtype=torch.float64, device=device),
             torch.randn(cfg.layers * dirs, cfg.batch, real, dtype=torch.float64, device=device),
             torch.randn(cfg.layers * dirs, cfg.batch, cfg.hidden, dtype=torch.float64, device=device))
    return ref, x, hx, grads


def run(module, x, hx, grads, dtype, lengths=None, enforce_sorted=True, packed_input=False):
    """Outputs and gradients of ``module`` (torch.nn.LSTM or fuseformer.nn.LSTM) in ``dtype``."""
    module = module.to(dtype)
    x = x.detach().to(dtype).requires_grad_()
    hx = tuple(t.detach().to(dtype).requires_grad_() for t in hx) if hx is not None else None
    if packed_input or (lengths is not None and not isinstance(module, fuseformer.nn.LSTM)):
        seq = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=enforce_sorted)
        out, (h, c) = module(seq, hx)
        out, _ = pad_packed_sequence(out, batch_first=module.batch_first, total_length=x.shape[1 if module.batch_first else 0])
    elif lengths is not None:
        out, (h, c) = module(x, hx, lengths=lengths, enforce_sorted=enforce_sorted)
    else:
        out, (h, c) = module(x, hx)
    go, gh, gc = (g.to(dtype) for g in grads)
    ((out * go).sum() + (h * gh).sum() + (c * gc).sum()).backward()
    result = {"output": out, "h_n": h, "c_n": c, "grad input": x.grad}
    if hx is not None:
        result.update({"grad h0": hx[0].grad, "grad c0": hx[1].grad})
    result.update({f"grad {name}": p.grad for name, p in module.named_parameters()})
    return result


def check_against_reference(cfg, backend, device, dtype, **kwargs):
    ref, x, hx, grads = make_case(cfg, device)
    ref64 = run(ref, x, hx, grads, torch.float64, **kwargs)
    torch_lowp = cfg.module().to(device)
    torch_lowp.load_state_dict(ref.state_dict())
    lowp = run(torch_lowp, x, hx, grads, dtype, **kwargs)
    ours = cfg.module(fuseformer.nn.LSTM).to(device)
    ours.load_state_dict(ref.state_dict())
    with fuseformer.use_backend(backend):
        got = run(ours, x, hx, grads, dtype, **kwargs)
    assert got.keys() == ref64.keys()
    for name in ref64:
        assert_matches_reference(f"{backend} {name}", got[name], ref64[name], lowp[name])


def reference_cases():
    # Gradients of a handful of elements are a few roundings each in half precision, so their
    # ratio to PyTorch's error is chance: the all-sizes-one case runs in float32.
    out = []
    for b, d in PAIRS:
        for i, cfg in enumerate(CONFIGS):
            for dt in dtypes_for(b, d):
                if dt != torch.float32 and cfg.hidden * cfg.batch < 4:
                    continue
                out.append(pytest.param(b, d, dt, cfg, id=f"{b}-{d}-{str(dt)[6:]}-cfg{i}"))
    return out


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,device,dtype,cfg", reference_cases())
def test_matches_reference(backend, device, dtype, cfg):
    check_against_reference(cfg, backend, device, dtype)


LENGTH_CASES = [
    (Config(5, 6, batch=4, steps=7), [7, 5, 3, 1], True),  # sorted
    (Config(5, 6, bidirectional=True, batch=4, steps=7, batch_first=True), [3, 7, 1, 5], False),
    (Config(4, 10, layers=2, bidirectional=True, proj=4, batch=5, steps=6), [2, 6, 6, 1, 4], False),
    (Config(4, 6, batch=3, steps=8), [5, 5, 2], True),  # padded steps past every length
]


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", range(len(LENGTH_CASES)))
@pytest.mark.parametrize("form", ["lengths", "packed"])
def test_variable_lengths(backend, device, case, form):
    """Padded input with lengths (kernel masking) and PackedSequence input, against packing
    into torch.nn.LSTM: outputs zero past each length, states at each sequence's end."""
    cfg, lengths, enforce_sorted = LENGTH_CASES[case]
    check_against_reference(cfg, backend, device, torch.float32, lengths=torch.tensor(lengths),
                            enforce_sorted=enforce_sorted, packed_input=form == "packed")


# No projection, up to 64 rows and hidden a multiple of 16: on the CPU the small-batch loop
# (gates in registers, row tiles of 4, blocks of 16 units).
INFERENCE_CASES = [
    (Config(9, 16, batch=1, steps=6), None, "plain"),
    (Config(7, 32, layers=2, bidirectional=True, batch=3, steps=5, batch_first=True), None, "plain"),
    (Config(5, 48, batch=7, steps=6), [6, 6, 5, 3, 3, 2, 1], "padded"),  # two row tiles, sorted
    (Config(6, 64, layers=2, batch=6, steps=5, hx=False), [2, 5, 1, 5, 3, 4], "padded"),  # unsorted
    (Config(4, 16, bidirectional=True, batch=5, steps=4), [4, 4, 3, 2, 1], "packed"),
    (Config(6, 32, batch=16, steps=4), None, "plain"),  # four row tiles
    (Config(5, 16, batch=14, steps=5), [5, 1, 4, 2, 5, 3, 1, 2, 4, 5, 3, 2, 1, 4], "padded"),
    (Config(3, 32, batch=37, steps=3), None, "plain"),  # ten row tiles, the last of one row
    (Config(4, 16, bidirectional=True, batch=21, steps=4), [4, 1, 3, 2, 4, 4, 1, 2, 3, 4, 1, 1, 2, 3, 4, 2, 3, 1, 4,
                                                           2, 3], "padded"),
    (Config(2, 16, batch=64, steps=2), [2] * 40 + [1] * 24, "packed"),  # the largest batch of the loop
    # Gradient GEMMs past 2^20 multiply-adds: on the CPU through oneDNN from dgatesᵀ
    # (csrc/cpu/gemm.h weight_grad_t / input_grad_t); padding rows of the in-place gates.
    (Config(40, 64, batch=16, steps=12), [12, 12, 11, 9, 9, 8, 8, 7, 6, 5, 5, 4, 3, 2, 2, 1], "padded"),
]


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", range(len(INFERENCE_CASES)))
def test_small_batch_training_matches_reference(backend, device, case):
    """The same shapes with gradients: on the CPU the small-batch loop also runs the training
    forward (writing the gates and cells the backward reads); outputs, states, all gradients."""
    cfg, lengths, form = INFERENCE_CASES[case]
    kwargs = {}
    if lengths is not None:
        kwargs = dict(lengths=torch.tensor(lengths), enforce_sorted=False, packed_input=form == "packed")
    check_against_reference(cfg, backend, device, torch.float32, **kwargs)


@pytest.mark.parametrize("case", range(len(INFERENCE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_inference_matches_reference(poison_outputs, backend, device, dtype, case):
    cfg, lengths, form = INFERENCE_CASES[case]
    ref, x, hx, _ = make_case(cfg, device)
    kwargs = {}
    if lengths is not None:
        kwargs = dict(lengths=torch.tensor(lengths), enforce_sorted=False, packed_input=form == "packed")

    def infer(module, dt):
        module = module.to(dt)
        xs, hs = x.to(dt), tuple(t.to(dt) for t in hx) if hx is not None else None
        with torch.no_grad():
            if kwargs.get("packed_input") or (lengths is not None and not isinstance(module, fuseformer.nn.LSTM)):
                seq = pack_padded_sequence(xs, kwargs["lengths"], batch_first=cfg.batch_first, enforce_sorted=False)
                out, (h, c) = module(seq, hs)
                out, _ = pad_packed_sequence(out, batch_first=cfg.batch_first, total_length=cfg.steps)
            elif lengths is not None:
                out, (h, c) = module(xs, hs, lengths=kwargs["lengths"], enforce_sorted=False)
            else:
                out, (h, c) = module(xs, hs)
        return {"output": out, "h_n": h, "c_n": c}

    want = infer(ref, torch.float64)
    torch_lowp = cfg.module().to(device)
    torch_lowp.load_state_dict(ref.state_dict())
    low = infer(torch_lowp, dtype)
    ours = cfg.module(fuseformer.nn.LSTM).to(device)
    ours.load_state_dict(ref.state_dict())
    with fuseformer.use_backend(backend):
        got = infer(ours, dtype)
    for name in want:
        assert_matches_reference(f"{backend} {name}", got[name], want[name], low[name])


@pytest.mark.skipif(("triton", "cpu") not in PAIRS, reason="Triton interpreter not available")
@pytest.mark.parametrize("form", ["dense", "lengths"])
def test_triton_step_kernels_without_the_persistent_kernel(monkeypatch, form):
    """Hidden sizes past the persistent kernel's limit take one launch per step: the same
    results (the limit lowered so the small test shapes take that path)."""
    from fuseformer.kernels import lstm as triton_lstm

    monkeypatch.setattr(triton_lstm, "PERSISTENT_MAX_HIDDEN", 0)
    if form == "dense":
        check_against_reference(CONFIGS[1], "triton", "cpu", torch.float32)
    else:
        cfg, lengths, enforce_sorted = LENGTH_CASES[1]
        check_against_reference(cfg, "triton", "cpu", torch.float32, lengths=torch.tensor(lengths),
                                enforce_sorted=enforce_sorted)


def gpu_tile_cases() -> list:
    """The tiles a GPU launch takes (the step forward for batches up to 16 and past, the
    float32 tile; the backward's cell tile), as the interpreter's replacements."""
    from fuseformer.kernels import lstm as kernels

    cases = [pytest.param(tile, torch.float16, id=f"fwd-batch{'<=' if small else '>'}16")
             for small, tile in kernels._GPU_FWD_TILE.items()]
    return cases + [pytest.param(kernels._FP32_FWD_TILE, torch.float32, id="fwd-fp32")]


@pytest.mark.skipif(("triton", "cpu") not in PAIRS, reason="Triton interpreter not available")
@pytest.mark.parametrize("tile,dtype", gpu_tile_cases())
def test_gpu_tile_configs_under_the_interpreter(monkeypatch, tile, dtype):
    """The interpreter otherwise runs 16-wide tiles; a GPU these (64-wide hidden and K tiles,
    64-row batch tiles). Hidden 70 and batch 20 leave a remainder in each; the step kernels
    (the persistent kernel's limit lowered), with lengths."""
    from fuseformer.kernels import lstm as kernels

    monkeypatch.setattr(kernels, "PERSISTENT_MAX_HIDDEN", 0)
    monkeypatch.setattr(kernels, "_INTERPRETER_FWD_TILE", tile)
    monkeypatch.setattr(kernels, "_INTERPRETER_CELL_TILE", kernels._CELL_TILE)
    lengths = torch.tensor([6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 6, 6, 5, 5, 4, 4, 3, 3, 2, 1])
    check_against_reference(Config(30, 70, batch=20, steps=6), "triton", "cpu", dtype, lengths=lengths,
                            enforce_sorted=False)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_unbatched_and_saturated(backend, device):
    """Unbatched (L, F) input with (layers, P) states; inputs large enough to saturate gates."""
    m = torch.nn.LSTM(4, 7, num_layers=2).double().to(device)
    x = 30 * torch.randn(6, 4, dtype=torch.float64, device=device)
    hx = (torch.randn(2, 7, dtype=torch.float64, device=device), torch.randn(2, 7, dtype=torch.float64, device=device))
    ref, (rh, rc) = m(x, hx)
    ours = fuseformer.nn.LSTM(4, 7, num_layers=2).to(device)
    ours.load_state_dict(m.state_dict())
    torch_lowp = m.float()
    low, (lh, lc) = torch_lowp(x.float(), tuple(t.float() for t in hx))
    with fuseformer.use_backend(backend):
        out, (h, c) = ours(x.float(), tuple(t.float() for t in hx))
    assert out.shape == (6, 7) and h.shape == (2, 7) and c.shape == (2, 7)
    for name, a, r, lp in (("output", out, ref, low), ("h_n", h, rh, lh), ("c_n", c, rc, lc)):
        assert_matches_reference(name, a, r, lp)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_frozen_weights_and_no_grad(backend, device):
    """Gradients only for the input (weights frozen); a no-grad call saves nothing."""
    torch_m = torch.nn.LSTM(5, 8, bidirectional=True).to(device)
    ours = fuseformer.nn.LSTM(5, 8, bidirectional=True).to(device)
    ours.load_state_dict(torch_m.state_dict())
    ours.requires_grad_(False)
    torch_m.requires_grad_(False)
    x = torch.randn(4, 3, 5, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fuseformer.use_backend(backend):
        out, _ = ours(x1)
        with torch.no_grad():
            out_ng, _ = ours(x)
    ref, _ = torch_m(x2)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(out_ng, out.detach())
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in ours.parameters())


# ---- the module --------------------------------------------------------------------------


def test_module_is_a_drop_in():
    kwargs = dict(input_size=6, hidden_size=10, num_layers=2, bias=True, batch_first=True, dropout=0.0,
                  bidirectional=True, proj_size=4)
    ref = torch.nn.LSTM(**kwargs)
    ours = fuseformer.nn.LSTM(**kwargs)
    # An RNNBase in LSTM mode, as torch.nn.LSTM is (a torch.nn.LSTM subclass would not compile).
    assert isinstance(ours, torch.nn.RNNBase) and ours.mode == "LSTM"
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.LSTM(**kwargs)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 6)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), ours(x)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-6)
    seq = pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=True, enforce_sorted=False)
    p1, _ = ref(seq)
    p2, _ = ours(seq)
    assert type(p2) is type(p1)
    torch.testing.assert_close(p2.data, p1.data, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p2.unsorted_indices, p1.unsorted_indices)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_dropout_between_layers(backend, device):
    """dropout=1 zeroes every layer's input past the first (torch does the same): the outputs
    match torch exactly-in-kind; dropout=0.5 in training differs from eval and from run to run,
    and eval ignores it."""
    ref = torch.nn.LSTM(4, 6, num_layers=3, dropout=1.0).to(device).train()
    ours = fuseformer.nn.LSTM(4, 6, num_layers=3, dropout=1.0).to(device).train()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 4, device=device)
    with fuseformer.use_backend(backend):
        out, (h, c) = ours(x)
    r, (rh, rc) = ref(x)
    torch.testing.assert_close(out, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, rh, rtol=1e-5, atol=1e-6)
    ours.dropout = 0.5
    with fuseformer.use_backend(backend):
        a, _ = ours(x)
        b, _ = ours(x)
        ours.eval()
        e1, _ = ours(x)
    ref.eval()
    e2, _ = ref(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, e1)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cpu" not in fuseformer.available_backends("cpu"), reason="needs the C++ extension")
@pytest.mark.parametrize("case,expected", [
    (dict(batch=8, lengths=True), "cpu"), (dict(batch=8, proj=4), "cpu"), (dict(batch=8), "torch"),
    (dict(batch=4, lengths=True), "torch"), (dict(batch=8, lengths=True, dtype=torch.bfloat16), "torch"),
    (dict(batch=2, hidden=384), "cpu"), (dict(batch=8, hidden=384), "torch"),
    (dict(batch=2, hidden=32, no_grad=True), "cpu"), (dict(batch=2, hidden=32), "torch"),
    (dict(batch=2, hidden=30, no_grad=True), "torch"), (dict(batch=16, hidden=32, no_grad=True), "cpu"),
    (dict(batch=17, hidden=32, no_grad=True), "torch"),
])
def test_cpu_default_routes_by_measurement(monkeypatch, case, expected):
    """Unforced CPU calls take the C++ kernels where they measured faster than torch.nn.LSTM
    (variable lengths, projections from batch 8; batches under 8 from hidden 384; batches up
    to 16 in inference with hidden a multiple of 16; float32) and torch's LSTM elsewhere; both
    give torch.nn.LSTM's result."""
    lstm_ops = importlib.import_module("fuseformer.ops.lstm")  # the module (fuseformer.ops.lstm is the function)
    used = []
    original = lstm_ops._layer_fwd_op
    monkeypatch.setattr(lstm_ops, "_layer_fwd_op", lambda backend: used.append(backend) or original(backend))
    batch, dtype = case["batch"], case.get("dtype", torch.float32)
    hidden = case.get("hidden", 6)
    ref = torch.nn.LSTM(5, hidden, proj_size=case.get("proj", 0)).to(dtype)
    ours = fuseformer.nn.LSTM(5, hidden, proj_size=case.get("proj", 0)).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, batch, 5, dtype=dtype)
    lengths = torch.randint(1, 8, (batch,)) if case.get("lengths") else None
    with torch.set_grad_enabled(not case.get("no_grad", False)):
        out, (h, _) = ours(x, lengths=lengths, enforce_sorted=False)
    if lengths is None:
        r, (rh, _) = ref(x)
    else:
        r, (rh, _) = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
        r, _ = pad_packed_sequence(r, total_length=7)
    assert used == ([] if expected == "torch" else [expected])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, r, **tol)
    torch.testing.assert_close(h, rh, **tol)


def test_float64_runs_on_torch_and_forced_kernels_refuse_it():
    m = fuseformer.nn.LSTM(3, 4).double()
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    out, _ = m(x)
    assert out.dtype == torch.float64
    with fuseformer.use_backend("cpu"), pytest.raises(ValueError, match="float64"):
        m(x)


def test_autocast_runs_in_the_autocast_dtype():
    m = fuseformer.nn.LSTM(4, 6)
    x = torch.randn(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    ref, _ = m(x)
    assert (out.float() - ref).abs().max() < 0.05


# ---- registration --------------------------------------------------------------------------


def _layer_args(device, save, proj=0, padded=True, sizes=(3, 3, 2), features=4):
    batch, hidden = sizes[0], 5
    real = proj or hidden
    rows = len(sizes) * batch if padded else sum(sizes)
    x = torch.randn(rows, features, device=device, requires_grad=save)
    w_ih = torch.randn(4 * hidden, features, device=device, requires_grad=save)
    bias = torch.randn(4 * hidden, device=device, requires_grad=save)
    h0 = torch.randn(batch, real, device=device, requires_grad=save)
    c0 = torch.randn(batch, hidden, device=device, requires_grad=save)
    w_hh = torch.randn(4 * hidden, real, device=device, requires_grad=save)
    w_hr = torch.randn(real, hidden, device=device, requires_grad=save) if proj else None
    return (x, w_ih, bias, torch.tensor(sizes), padded, h0, c0, w_hh, w_hr)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("padded", [True, False])
def test_opcheck(backend, device, proj, reverse, padded):
    op = (torch.ops.fuseformer.triton_lstm_layer_fwd if backend == "triton" else torch.ops.fuseformer.lstm_layer_fwd)
    for save in (False, True):
        args = (*_layer_args(device, save, proj, padded), reverse, save)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_compile_fullgraph(backend, device, with_lengths):
    torch._dynamo.reset()
    m = fuseformer.nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True).to(device)
    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None

    def step(x):
        out, (h, c) = m(x, lengths=lengths, enforce_sorted=False)
        return out.sum() + h.sum() + c.sum()

    with fuseformer.use_backend(backend):
        eager = step(x)
        (g_eager,) = torch.autograd.grad(eager, x)
        compiled = torch.compile(step, fullgraph=True)(x)
        (g_comp,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------


BAD = [
    (lambda m: m(torch.randn(3, 2, 5)), ValueError, "input has 5 features but weight_ih_l0 expects input_size=4"),
    (lambda m: m(torch.randn(4)), ValueError, "input must be 2-D"),
    (lambda m: m(torch.randn(3, 2, 4), (torch.zeros(1, 3, 6), torch.zeros(1, 2, 6))), ValueError,
     r"h0 must have shape \[1, 2, 6\]"),
    (lambda m: m(torch.randn(3, 2, 4), (torch.zeros(1, 2, 6),)), TypeError, "hx must be None or a pair"),
    (lambda m: m(torch.randn(3, 2, 4), (torch.zeros(2, 6), torch.zeros(2, 6))), ValueError, "must be 3-D"),
    (lambda m: m(torch.randn(3, 2, 4), lengths=torch.tensor([1, 3])), ValueError, "sorted in decreasing order"),
    (lambda m: m(torch.randn(3, 2, 4), lengths=torch.tensor([4, 3]), enforce_sorted=False), ValueError,
     r"lengths must lie in \[1, 3\]"),
    (lambda m: m(torch.randn(3, 2, 4), lengths=torch.tensor([3, 0]), enforce_sorted=False), ValueError,
     r"lengths must lie in \[1, 3\]"),
    (lambda m: m(torch.randn(3, 2, 4), lengths=torch.tensor([3, 2, 1])), ValueError, "batch size 2"),
    (lambda m: m(torch.randn(3, 2, 4), lengths=torch.tensor([3.0, 2.0])), ValueError, "integer tensor"),
    (lambda m: m(pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2])), lengths=torch.tensor([3, 2])),
     ValueError, "PackedSequence carries its own"),
    (lambda m: m(torch.randn(3, 2, 4, dtype=torch.float16)), TypeError, "params\\[0\\] has dtype float32"),
    (lambda m: m(torch.randint(0, 3, (3, 2, 4))), TypeError, "input must have dtype"),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_input_raises_clearly(index):
    call, exc, match = BAD[index]
    m = fuseformer.nn.LSTM(4, 6)
    with pytest.raises(exc, match=match):
        call(m)


def test_bad_params_raise_clearly():
    m = torch.nn.LSTM(4, 6, num_layers=2)
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="expected 8 or 10, got 7"):
        fuseformer.ops.lstm(x, None, m._flat_weights[:7], True, 2)
    bad = list(m._flat_weights)
    bad[1] = torch.randn(24, 5)
    with pytest.raises(ValueError, match=r"weight_hh_l0 must have shape \[24, 6\]"):
        fuseformer.ops.lstm(x, None, bad, True, 2)
    with pytest.raises(ValueError, match="dropout must be a number"):
        fuseformer.ops.lstm(x, None, m._flat_weights, True, 2, dropout=1.5)
    with pytest.raises(TypeError, match="num_layers must be int"):
        fuseformer.ops.lstm(x, None, m._flat_weights, True, 2.0)
