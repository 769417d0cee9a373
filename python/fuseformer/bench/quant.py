"""Benchmark cases for quantized linear layers: int8 per channel and int4 g128 (zero points)
weight-only, and W8A8 int8 with per-row dynamic activation scales, against F.linear with the float weight (cuBLAS bf16 on a GPU, float32 on the CPU) at
decode and prefill batch sizes, Llama-3-8B shapes on a GPU (K -> N: 4096 -> 4096, 4096 ->
14336, 14336 -> 4096, 4096 -> 128256) and smaller ones on the CPU; torchao's layers where
installed, and torch._scaled_mm (rowwise, activation quantization included) for fp8.

GB/s counts what an ideal kernel moves: the codes, scales and zero points (or the float
weight), x and the output; decode is bound by the weight bytes. Every implementation cycles
through copies of its weight larger together than the last-level cache. ``write_extra`` adds the
accuracy report: the held-out loss of a briefly trained reference GPT in float and under each
scheme (quant_accuracy.md / .json).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import fuseformer
from fuseformer import backends
from fuseformer.bench.harness import Case
from fuseformer.ops.quant import quantize_weight, quantized_linear

FAMILY = "quant"
SCHEMES = (("int8_weight_only", 128, True), ("int4_weight_only", 128, True), ("int8_dynamic", 128, True))
_LABELS = {"int8_weight_only": "int8 weight-only", "int4_weight_only": "int4 weight-only g128",
           "int8_dynamic": "W8A8 int8 dynamic", "fp8": "fp8 rowwise (W8A8 e4m3)"}


def _schemes(device: str):
    has_fp8 = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    return SCHEMES + ((("fp8", 128, True),) if has_fp8 else ())


def _scaled_mm(weight: torch.Tensor, x: torch.Tensor):
    """torch._scaled_mm with rowwise scales, the activation quantized in the timed call (as ours)."""
    from fuseformer.ops.quant import quantize_activation

    qw = quantize_weight(weight, "fp8")
    w_t, sw = qw.qweight.t(), qw.scales.view(1, -1)

    def run():
        qx, sx = quantize_activation(x, "fp8")
        return torch._scaled_mm(qx, w_t, scale_a=sx.view(-1, 1), scale_b=sw, out_dtype=x.dtype)
    try:
        run()
    except (RuntimeError, TypeError):
        return None
    return run


def _shapes(device: str, quick: bool) -> list[tuple[int, int, int]]:
    """(M rows, K in, N out)."""
    if device == "cuda":
        layers = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]
        batches = [1, 16, 1024] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 1024]
        if quick:
            layers = layers[:2]
        return [(m, k, n) for k, n in layers for m in batches]
    if quick:
        return [(1, 1024, 1024)]
    return [(1, 4096, 4096), (1, 4096, 11008), (1, 2048, 2048), (4, 2048, 2048), (16, 2048, 2048),
            (64, 2048, 2048)]


def _kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available_backends(device) if b != "torch" and b in backends.IMPLEMENTED["quant"]]


# Each implementation cycles through copies of its weight that together exceed the last-level
# cache (CPU L3 32 MiB here, H100 L2 50 MiB): a decode step's weights come from memory, as in a
# model whose other layers evicted them.
ROTATE_BYTES = 128 * 2**20


def _copies(nbytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // max(nbytes, 1)))


def _rotating(items: list):
    it = itertools.cycle(items)
    return lambda: next(it)


def _ours(backend: str, qw, x):
    copies = [dataclasses.replace(qw, qweight=qw.qweight.clone(), scales=qw.scales.clone(),
                                  zeros=None if qw.zeros is None else qw.zeros.clone())
              for _ in range(_copies(qw.nbytes()))]
    next_qw = _rotating(copies)

    def run():
        with fuseformer.use_backend(backend):
            return quantized_linear(x, next_qw())
    return run


def _eager(weight, x):
    next_w = _rotating([weight.clone() for _ in range(_copies(weight.numel() * weight.element_size()))])
    return lambda: F.linear(x, next_w())


def _torchao(scheme: str, weight: torch.Tensor, x: torch.Tensor):
    """torchao's layer for the scheme, or None when torchao (or its kernel here) is missing."""
    try:
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, quantize_)
    except ImportError:
        return None
    configs = {"int8_weight_only": Int8WeightOnlyConfig, "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
               "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=128)}
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=x.device, dtype=x.dtype)
    layer.weight.data.copy_(weight)
    try:
        quantize_(layer, configs[scheme]())
        layer(x)
    except Exception:  # noqa: BLE001 - a torchao without this kernel on this device
        return None

    def run():
        with torch.no_grad():
            return layer(x)
    return run


def missing_baselines(device: str) -> dict[str, str]:
    return {} if importlib.util.find_spec("torchao") is not None else {"torchao": "not installed"}


def cases(device: str, dtype: torch.dtype, quick: bool) -> Iterator[Case]:
    elt = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in _shapes(device, quick):
        weight = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        for scheme, group, zero_points in _schemes(device):
            qw = quantize_weight(weight, scheme, group, zero_points)
            impls = {f"fuseformer[{be}]": _ours(be, qw, x) for be in _kernel_backends(device)}
            impls["torch eager"] = _eager(weight, x)
            peer = _scaled_mm(weight, x) if scheme == "fp8" else _torchao(scheme, weight, x)
            if peer is not None:
                impls["torch._scaled_mm" if scheme == "fp8" else "torchao"] = peer
            label = _LABELS[scheme]
            moved = qw.nbytes() + (m * k + m * n) * elt
            yield Case(FAMILY, label, "fwd", (m, k, n), dtype, impls, bytes=moved, flops=2 * m * k * n)


# ---- the accuracy report ----------------------------------------------------------------------


def write_extra(out_dir: Path, device: str, dtype: torch.dtype, quick: bool) -> list[Path]:
    """Held-out loss of a reference GPT trained briefly on the synthetic corpus, in float and
    with its linear layers quantized by each scheme (the tied head stays float)."""
    from fuseformer.models import GPT, ByteTokenizer, GPTConfig, synthetic_corpus, text_batches

    torch.manual_seed(0)
    config = GPTConfig(block_size=128, vocab_size=256, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config, backend="torch").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps = 20 if quick else 200
    train = ByteTokenizer.encode(synthetic_corpus(200_000, seed=0))
    for x, y in text_batches(train, 16, 128, steps, seed=1, device=device):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    held_out = list(text_batches(ByteTokenizer.encode(synthetic_corpus(50_000, seed=7)), 16, 128, 8, seed=2,
                                 device=device))
    model.eval()

    def evaluate(net) -> float:
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return sum(net(x, y)[1].item() for x, y in held_out) / len(held_out)

    rows = [{"scheme": "float", "loss": evaluate(model), "weight_MiB": None}]
    variants = [("int8_weight_only", 128, True), ("int4_weight_only", 128, True), ("int4_weight_only", 128, False),
                ("int4_weight_only", 32, True), ("int8_dynamic", 128, True)]
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        variants.append(("fp8", 128, True))
    for scheme, group, zero_points in variants:
        quantized = GPT(config, backend="torch").to(device)
        quantized.load_state_dict(model.state_dict())
        fuseformer.quantize(quantized.eval(), scheme, group_size=group, zero_points=zero_points)
        report = quantized.fuseformer_quantize_report
        name = scheme if scheme != "int4_weight_only" else f"{scheme} g{group}{'' if zero_points else ' symmetric'}"
        rows.append({"scheme": name, "loss": evaluate(quantized), "weight_MiB": report.bytes_after / 2**20,
                     "float_MiB": report.bytes_before / 2**20})
    lines = [f"# Quantization accuracy: reference GPT ({config.n_layer} layers, {config.n_embd} wide, {steps} "
             "training steps on synthetic_corpus), held-out loss", "",
             "| scheme | held-out loss | vs float | linear weights (MiB) |", "|---|---|---|---|"]
    base = rows[0]["loss"]
    for r in rows:
        mib = "-" if r["weight_MiB"] is None else f"{r['float_MiB']:.2f} -> {r['weight_MiB']:.2f}"
        lines.append(f"| {r['scheme']} | {r['loss']:.4f} | {r['loss'] - base:+.4f} | {mib} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant_accuracy.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "quant_accuracy.md").write_text("\n".join(lines) + "\n")
    return [out_dir / "quant_accuracy.md", out_dir / "quant_accuracy.json"]
