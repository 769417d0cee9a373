"""Regression benchmarks of the C++ CPU kernels (pytest-benchmark; see conftest.py). The
shapes are the small end of `fuseformer bench`: a run takes about a minute on 2 cores."""

import pytest
import torch

import fuseformer

pytest.importorskip("pytest_benchmark")
if "cpu" not in fuseformer.available_backends("cpu"):
    pytest.skip("the C++ extension is not built here", allow_module_level=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _forced(fn):
    def run(*args):
        with fuseformer.use_backend("cpu"):
            return fn(*args)

    return run


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_forward(benchmark, op):
    x, w, b = torch.randn(4096, 1024), torch.randn(1024), torch.randn(1024)
    if op == "layer_norm":
        fn = _forced(lambda: fuseformer.ops.layer_norm(x, (1024,), w, b))
    else:
        fn = _forced(lambda: fuseformer.ops.rms_norm(x, (1024,), w))
    with torch.no_grad():
        benchmark(fn)


def test_add_rms_norm_forward_backward(benchmark):
    x = torch.randn(2048, 1024, requires_grad=True)
    r = torch.randn(2048, 1024, requires_grad=True)
    w = torch.randn(1024, requires_grad=True)
    grads = (torch.randn(2048, 1024), torch.randn(2048, 1024))

    def step():
        out = fuseformer.ops.add_rms_norm(x, r, (1024,), w)
        return torch.autograd.grad(out, (x, r, w), grads)

    benchmark(_forced(step))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_forward(benchmark, causal):
    q, k, v = (torch.randn(2, 8, 512, 64) for _ in range(3))
    with torch.no_grad():
        benchmark(_forced(lambda: fuseformer.ops.attention(q, k, v, is_causal=causal)))


def test_attention_forward_backward(benchmark):
    q, k, v = (torch.randn(2, 8, 512, 64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 8, 512, 64)

    def step():
        return torch.autograd.grad(fuseformer.ops.attention(q, k, v, is_causal=True), (q, k, v), grad)

    benchmark(_forced(step))


def test_attention_decode_gqa(benchmark):
    q = torch.randn(4, 16, 1, 64)
    k_cache, v_cache = torch.randn(4, 4, 4096, 64), torch.randn(4, 4, 4096, 64)
    seqlens = torch.full((4,), 4096, dtype=torch.int32)
    with torch.no_grad():
        benchmark(_forced(lambda: fuseformer.ops.attention_with_kv_cache(q, k_cache, v_cache, seqlens)))


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_linear_act_forward(benchmark, activation):
    x, w, b = torch.randn(256, 1024), torch.randn(2048, 1024) / 32, torch.randn(2048)
    with torch.no_grad():
        benchmark(_forced(lambda: fuseformer.ops.linear_act(x, w, b, activation)))


def test_gated_mlp_forward_backward(benchmark):
    mlp = fuseformer.nn.GatedMLP(512, 1408)
    x = torch.randn(256, 512, requires_grad=True)
    grad = torch.randn(256, 512)

    def step():
        return torch.autograd.grad(mlp(x), (x, *mlp.parameters()), grad)

    benchmark(_forced(step))


def test_lstm_variable_lengths_forward_backward(benchmark):
    lstm = fuseformer.nn.LSTM(256, 256, batch_first=True)
    x = torch.randn(16, 64, 256, requires_grad=True)
    lengths = torch.randint(32, 65, (16,))

    def step():
        out, (h, c) = lstm(x, lengths=lengths, enforce_sorted=False)
        return torch.autograd.grad(out.sum() + h.sum(), (x, *lstm.parameters()))

    benchmark(_forced(step))


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int4_weight_only"])
def test_quantized_linear_decode(benchmark, scheme):
    qw = fuseformer.ops.quantize_weight(torch.randn(4096, 4096) / 64, scheme, 128)
    x = torch.randn(1, 4096)
    with torch.no_grad():
        benchmark(_forced(lambda: fuseformer.ops.quantized_linear(x, qw)))


def test_linear_decode_row(benchmark):
    """One row against a 2048x2048 weight: the AVX-512 small-row GEMM."""
    x, w, b = torch.randn(1, 2048), torch.randn(2048, 2048) / 45, torch.randn(2048)
    with torch.no_grad():
        benchmark(_forced(lambda: fuseformer.ops.linear_act(x, w, b, "none")))


def test_conv_bn_act_inference(benchmark):
    """A ResNet-18 unit at batch 1, channels-last, eval mode: one oneDNN convolution with the
    folded, packed weight."""
    unit = fuseformer.nn.ConvBNAct(256, 256, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        benchmark(_forced(lambda: unit(x)))
