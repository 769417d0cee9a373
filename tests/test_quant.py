"""Weight-only quantization: every backend's quantized_linear against dequantize-then-matmul in
float64 (the codes are exact, so the bound is the float32/half rounding of the product, by the
2x-PyTorch rule against F.linear on the dequantized weight); quantization error as SQNR against
round-to-nearest's known values; QuantizedLinear and fuseformer.quantize (plain and transformers
models, skips, tied weights, state_dict / torch.save / safetensors round trips, footprint);
opcheck, compile, bad input.

bf16 on the Triton backend runs only on CUDA: the interpreter computes bf16 dots wrongly."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import fuseformer
from fuseformer.ops import (QuantizedWeight, dequantize_weight, quantize_activation, quantize_weight, quantized_linear,
                            sqnr_db)
from accuracy import assert_matches_reference, backend_device_pairs

PAIRS = backend_device_pairs("quant")
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
SCHEMES = [("int8_weight_only", 128, True), ("int4_weight_only", 32, False), ("int4_weight_only", 64, True),
           ("int4_weight_only", 128, True), ("int8_dynamic", 128, True)]
SCHEME_IDS = ["int8", "int4-g32-sym", "int4-g64-zp", "int4-g128-zp", "w8a8"]
# (M rows, K, N): decode rows, the CPU GEMV/GEMM switch (10/11), tile remainders.
SHAPES = [(1, 256, 96), (3, 128, 50), (10, 384, 130), (11, 256, 64), (40, 512, 33), (5, 100, 24)]  # K=100: int8 tail


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" or backend != "triton" else [])


def _weight(n, k, device):
    w = torch.randn(n, k, device=device) / k**0.5
    w[:, ::7] *= 8  # outlier input channels, as LLM weights have
    return w


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("scheme,group,zero_points", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_dequantized_reference(backend, device, scheme, group, zero_points, shape, with_bias):
    check_scheme(backend, device, scheme, group, zero_points, shape, with_bias, dtypes_for(backend, device))


def check_scheme(backend, device, scheme, group, zero_points, shape, with_bias, dtypes):
    m, k, n = shape
    if scheme == "int4_weight_only" and k % group:
        pytest.skip("K not a multiple of the group")
    qw = quantize_weight(_weight(n, k, device), scheme, group, zero_points)
    w64 = dequantize_weight(qw, torch.float64)
    for dtype in dtypes:
        x = torch.randn(m, k, device=device).to(dtype)
        x[0, 3] = 0.5 * x[0].abs().max()  # a code on a rounding tie (q = 63.5): half to even everywhere
        bias = torch.randn(n, device=device).to(dtype) if with_bias else None
        b64 = bias.double() if bias is not None else None
        if scheme == "int8_dynamic":
            # The same activation codes on every backend (a differing one would cost ~1e-3), the
            # int32 product exact: the reference is the scaled product in float64; PyTorch's
            # low-precision counterpart is the "torch" backend rounding it to dtype.
            qx, sx = quantize_activation(x)
            ref = (qx.double() @ qw.qweight.double().t()) * sx.double()[:, None] * qw.scales.double().view(-1)
            ref = ref + b64 if b64 is not None else ref
            with fuseformer.use_backend("torch"):
                lowp = quantized_linear(x, qw, bias)
        else:
            ref = F.linear(x.double(), w64, b64)
            lowp = F.linear(x, dequantize_weight(qw, dtype), bias)
        with fuseformer.use_backend(backend):
            out = quantized_linear(x, qw, bias)
        assert_matches_reference(f"{backend} {scheme} {dtype}", out, ref, lowp)


def gpu_tile_cases() -> list:
    """The weight-only GEMM's tiles a GPU launch takes, as the interpreter's replacement:
    (tile, rows that select it, activation dtype)."""
    from fuseformer.kernels import quant as kernels

    return [
        pytest.param(kernels._DECODE_TILE, 5, torch.float16, id="decode"),
        pytest.param(kernels._PREFILL_TILE, 150, torch.float16, id="prefill"),
        pytest.param(kernels._FP32_TILE, 20, torch.float32, id="fp32"),
    ]


@pytest.mark.skipif(("triton", "cpu") not in PAIRS, reason="Triton interpreter not available")
@pytest.mark.parametrize("tile,rows,dtype", gpu_tile_cases())
@pytest.mark.parametrize("scheme,group,zero_points", SCHEMES, ids=SCHEME_IDS)
def test_gpu_tile_configs_under_the_interpreter(monkeypatch, tile, rows, dtype, scheme, group, zero_points):
    # The interpreter otherwise runs 16x16 tiles; a GPU these (128-deep K steps inside an
    # int4 group, the 128x128 W8A8 tile, a whole row per quantizer step). K 384 and N 200
    # leave a remainder in each.
    from fuseformer.kernels import quant as kernels

    monkeypatch.setattr(kernels, "_INTERPRETER_TILE", tile)
    monkeypatch.setattr(kernels, "_W8A8_INTERPRETER_TILE", kernels._W8A8_GPU_TILE)
    monkeypatch.setattr(kernels, "_INTERPRETER_QUANTIZE_BLOCK", kernels._quantize_block(384))
    check_scheme("triton", "cpu", scheme, group, zero_points, (rows, 384, 200), True, [dtype])


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_leading_dims_and_input_gradient(backend, device):
    qw = quantize_weight(_weight(48, 128, device), "int4_weight_only", 32)
    x = torch.randn(2, 3, 128, device=device, requires_grad=True)
    with fuseformer.use_backend(backend):
        out = quantized_linear(x, qw)
    assert out.shape == (2, 3, 48)
    g = torch.randn_like(out)
    out.backward(g)
    w = dequantize_weight(qw)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)


# ---- quantization quality ------------------------------------------------------------------


@pytest.mark.parametrize("scheme,zero_points,expected_db", [
    ("int8_weight_only", True, 41.0), ("int4_weight_only", False, 18.6), ("int4_weight_only", True, 19.9)])
def test_sqnr_reaches_round_to_nearest(scheme, zero_points, expected_db):
    """Gaussian weights: RTN reaches ~41 dB (int8 per channel), 18.6 dB (int4 g128
    symmetric) and 20 dB (with zero points); ours must too (within 0.3 dB of chance)."""
    w = torch.randn(1024, 1024)
    assert sqnr_db(w, dequantize_weight(quantize_weight(w, scheme, 128, zero_points))) >= expected_db - 0.3


def test_w8a8_output_sqnr_and_activation_codes():
    """W8A8 on Gaussian weights and activations: ~40 dB on the output; the codes are the
    nearest integers (half to even) of x / s with s = max|x_row| / 127."""
    w, x = torch.randn(256, 512), torch.randn(32, 512)
    y = quantized_linear(x, quantize_weight(w, "int8_dynamic"))
    assert sqnr_db(x @ w.t(), y) > 36.0
    qx, sx = quantize_activation(x)
    torch.testing.assert_close(sx, x.abs().amax(1) / 127, rtol=0, atol=0)
    assert torch.equal(qx, torch.round(x / sx[:, None]).to(torch.int8))
    qz, sz = quantize_activation(torch.zeros(2, 8))
    assert torch.equal(qz, torch.zeros(2, 8, dtype=torch.int8)) and bool((sz > 0).all())


def _fp8_reference(x, qw, bias=None):
    qx, sx = quantize_activation(x, "fp8")
    ref = (qx.double() @ qw.qweight.double().t()) * sx.double()[:, None] * qw.scales.double().view(-1)
    return ref + bias.double() if bias is not None else ref


def test_fp8_codes_emulated_reference_and_clear_error_without_fp8_hardware():
    w, x = torch.randn(64, 256), torch.randn(5, 256)
    qw = quantize_weight(w, "fp8")
    assert qw.qweight.dtype == torch.float8_e4m3fn and qw.scales.shape == (64, 1)
    assert float(qw.qweight.float().abs().amax()) == 448.0
    assert sqnr_db(w, dequantize_weight(qw)) > 28.0  # e4m3: 3 mantissa bits
    with fuseformer.use_backend("torch"):  # the emulated reference, for accuracy studies anywhere
        out = quantized_linear(x, qw)
    torch.testing.assert_close(out.double(), _fp8_reference(x, qw), rtol=1e-6, atol=1e-6)
    assert sqnr_db(x @ w.t(), out) > 25.0
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ValueError, match=r"fp8 scheme needs a GPU with fp8 tensor cores \(sm_89\+"):
            quantized_linear(x, qw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 needs a GPU with fp8 tensor cores (sm_89+)")
@pytest.mark.parametrize("shape", [(1, 256, 96), (17, 512, 130), (300, 1024, 512)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_kernel_matches_reference(shape, dtype):
    m, k, n = shape
    qw = quantize_weight(_weight(n, k, "cuda"), "fp8")
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    with fuseformer.use_backend("torch"):
        lowp = quantized_linear(x, qw, bias)
    with fuseformer.use_backend("triton"):
        out = quantized_linear(x, qw, bias)
    assert_matches_reference(f"fp8 {dtype}", out, _fp8_reference(x, qw, bias), lowp)


def test_sqnr_on_outlier_channels_and_smaller_groups():
    """Outlier input channels hurt per-channel int8 less than int4; smaller groups help int4."""
    w = _weight(512, 1024, "cpu")
    db = {g: sqnr_db(w, dequantize_weight(quantize_weight(w, "int4_weight_only", g))) for g in (32, 64, 128)}
    assert db[32] > db[64] > db[128] > 12.0
    assert sqnr_db(w, dequantize_weight(quantize_weight(w, "int8_weight_only"))) > 35.0


def test_codes_are_exact_and_symmetric_range():
    w = torch.randn(8, 64)
    qw = quantize_weight(w, "int4_weight_only", 32, zero_points=False)
    codes = torch.stack([qw.qweight & 15, qw.qweight >> 4], -1).view(8, 64)
    assert int(codes.min()) >= 1 and int(codes.max()) <= 15  # symmetric: -7..7 around 8
    # Quantizing the dequantized weight again gives the same codes.
    again = quantize_weight(dequantize_weight(qw), "int4_weight_only", 32, zero_points=False)
    assert torch.equal(again.qweight, qw.qweight)
    q8 = quantize_weight(w, "int8_weight_only")
    assert q8.qweight.dtype == torch.int8 and int(q8.qweight.abs().max()) == 127


# ---- modules and quantize(model) ------------------------------------------------------------


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 64)
        self.up = torch.nn.Linear(64, 128)
        self.act = torch.nn.GELU()
        self.down = torch.nn.Linear(128, 64, bias=False)
        self.odd = torch.nn.Linear(64, 40)  # in_features 64: fine for g32/g64, not g128
        self.head = torch.nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.down(self.act(self.up(h)))
        return self.head(h), self.odd(h)


@pytest.mark.parametrize("scheme,group", [("int8_weight_only", 128), ("int4_weight_only", 64), ("int8_dynamic", 128)])
def test_quantize_model_converts_reports_and_round_trips(tmp_path, scheme, group):
    torch.manual_seed(0)
    model = Tiny().eval()
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        float_out = model(idx)
    out = fuseformer.quantize(model, scheme, group_size=group, skip=["odd"])
    assert out is model
    report = model.fuseformer_quantize_report
    assert report.converted == ["up", "down"]
    skipped = {path: why for path, _, why in report.skipped}
    assert skipped["odd"] == "matches skip" and "tied to embed.weight" in skipped["head"]
    assert isinstance(model.up, fuseformer.nn.QuantizedLinear) and type(model.odd) is torch.nn.Linear
    assert report.bytes_after < report.bytes_before / (3.5 if scheme.startswith("int8") else 6)
    assert "converted 2 layers" in str(report)
    with torch.no_grad():
        q_out = model(idx)
    assert sqnr_db(float_out[0], q_out[0]) > (30 if scheme.startswith("int8") else 15)

    # state_dict into a freshly quantized model, torch.save of the whole model, safetensors.
    state = model.state_dict()
    fresh = fuseformer.quantize(Tiny().eval(), scheme, group_size=group, skip=["odd"])
    fresh.load_state_dict(state)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_model(model, str(tmp_path / "q.safetensors"))
    from_st = fuseformer.quantize(Tiny().eval(), scheme, group_size=group, skip=["odd"])
    safetensors.load_model(from_st, str(tmp_path / "q.safetensors"))
    with torch.no_grad():
        for other in (fresh, loaded, from_st):
            for a, b in zip(other(idx), q_out):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_quantize_skips_what_does_not_fit_the_group():
    model = fuseformer.quantize(Tiny(), "int4_weight_only", group_size=128)
    skipped = {path: why for path, _, why in model.fuseformer_quantize_report.skipped}
    assert "not a multiple of group_size 128" in skipped["odd"] and "not a multiple" in skipped["up"]
    assert model.fuseformer_quantize_report.converted == ["down"]


def test_quantize_skips_linears_a_fused_parent_reads():
    model = torch.nn.Sequential(fuseformer.nn.GatedMLP(64, 128), torch.nn.Linear(64, 32))
    fuseformer.quantize(model, "int8_weight_only")
    report = model.fuseformer_quantize_report
    assert report.converted == ["1"]
    assert {path for path, _, _ in report.skipped} == {"0.gate_proj", "0.up_proj", "0.down_proj"}
    assert all("GatedMLP passes the weight to a fused kernel" in why for _, _, why in report.skipped)
    model(torch.randn(3, 64))


def test_quantize_transformers_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = model(idx).logits
    fuseformer.quantize(model, "int8_weight_only")
    report = model.fuseformer_quantize_report
    assert any(path.endswith("attn.c_attn") for path in report.converted)
    assert any(path.endswith("mlp.c_proj") for path in report.converted)
    assert any("tied" in why for _, _, why in report.skipped)  # lm_head tied to wte
    with torch.no_grad():
        out = model(idx).logits
    assert sqnr_db(ref, out) > 25


def test_quantized_linear_module_matches_ops_and_compiles():
    linear = torch.nn.Linear(128, 72)
    q = fuseformer.nn.QuantizedLinear.from_float(linear, "int4_weight_only", group_size=32)
    x = torch.randn(5, 128)
    expected = quantized_linear(x, quantize_weight(linear.weight, "int4_weight_only", 32), linear.bias)
    torch.testing.assert_close(q(x), expected)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(q, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-5)
    assert q.memory_footprint() == 72 * 64 + 72 * 4 * 4 + 72 * 4 + 72 * 4
    assert "int4_weight_only" in repr(q)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_opcheck_int8_dynamic(backend, device):
    if backend == "cuda":
        pytest.skip("int8_dynamic runs on triton, cpu and torch")
    qw = quantize_weight(_weight(40, 64, device), "int8_dynamic")
    op = (torch.ops.fuseformer.triton_w8a8_linear if backend == "triton"
          else torch.ops.fuseformer.int8_dynamic_linear)
    x = torch.randn(3, 64, device=device, requires_grad=True)
    torch.library.opcheck(op, (x, qw.qweight, qw.scales, torch.randn(40, device=device)))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_opcheck(backend, device, bits):
    scheme = "int8_weight_only" if bits == 8 else "int4_weight_only"
    qw = quantize_weight(_weight(40, 64, device), scheme, 32)
    op = torch.ops.fuseformer.triton_quantized_linear if backend == "triton" else torch.ops.fuseformer.quantized_linear
    x = torch.randn(3, 64, device=device, requires_grad=True)
    bias = torch.randn(40, device=device)
    torch.library.opcheck(op, (x, qw.qweight, qw.scales, qw.zeros, bias, bits, qw.group_size))


# ---- bad input -----------------------------------------------------------------------------


def test_bad_input_raises_clearly():
    w = torch.randn(16, 96)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_weight(w, "int3")
    with pytest.raises(ValueError, match="not a multiple of group_size 64"):
        quantize_weight(w, "int4_weight_only", 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_weight(w, "int4_weight_only", 48)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4), "int8_weight_only")
    qw = quantize_weight(w, "int8_weight_only")
    with pytest.raises(ValueError, match="in_features=96"):
        quantized_linear(torch.randn(2, 95), qw)
    with pytest.raises(ValueError, match=r"bias must have shape \[16\]"):
        quantized_linear(torch.randn(2, 96), qw, torch.randn(15))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        quantized_linear(torch.randn(2, 96), w)
    with pytest.raises(TypeError, match="x must have dtype"):
        quantized_linear(torch.randint(0, 3, (2, 96)), qw)
    with pytest.raises(TypeError, match="expected a torch.nn.Linear"):
        fuseformer.nn.QuantizedLinear.from_float(torch.nn.Conv2d(3, 3, 1), "int8_weight_only")
    with pytest.raises(ValueError, match="scheme must be one of"):
        fuseformer.quantize(Tiny(), "fp4")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fuseformer.quantize(lambda x: x, "int8_weight_only")
    with fuseformer.use_backend("cpu"), pytest.raises(TypeError, match="float64"):
        quantized_linear(torch.randn(2, 96, dtype=torch.float64), qw)
    assert isinstance(qw, QuantizedWeight)
