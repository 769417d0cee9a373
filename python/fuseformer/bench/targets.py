"""The issues' performance targets, checked against a folder of benchmark results.

Each target names the rows it judges (family, ops, pass, a shape filter), the figure (a
speedup over a named baseline, or a fraction of a measured ceiling) and the bar. Per case
(op, pass, shape, dtype) fuseformer's best backend counts; the target is met when every case
it covers reaches the bar. The report shows, per target, the worst case and how many cases
meet it, or that the run measured none of its cases: nothing is dropped without saying so.

Speedups are read from the rows as the harness wrote them (``speedup_vs_<baseline>``: the
baseline's time over ours, measured in the same run); ``pct_of_copy_bw`` / ``pct_of_matmul``
against the ceilings measured in that run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    issue: int
    device: str  # "cpu" or "cuda": the results it applies to
    what: str  # the bar as the issue states it (and what the benchmark measures of it)
    family: str
    ops: tuple[str, ...]
    metric: str  # a row field: "speedup_vs_torch eager", "pct_of_copy_bw", ...
    bar: float
    direction: str | None = None  # "fwd", "fwd+bwd", or either
    where: Callable[[tuple[int, ...]], bool] = field(default=lambda shape: True)


def _hidden_4k_16k(shape) -> bool:  # norms: (rows, hidden)
    return 4096 <= shape[1] <= 16384


def _attention_d128_2k(shape) -> bool:  # attention: (B, H, S, D)
    return shape[3] == 128 and shape[2] >= 2048


def _decode_1_16_4k_32k(shape) -> bool:  # decode: (B, H, KV heads, cache, D)
    return 1 <= shape[0] <= 16 and 4096 <= shape[3] <= 32768


def _cube_8192(shape) -> bool:  # linear / quant: (M, K, N)
    return tuple(shape) == (8192, 8192, 8192)


def _mlp_shapes(shape) -> bool:  # Transformer MLP projections (not the square or decode rows)
    return shape[0] >= 1024 and tuple(shape) != (8192, 8192, 8192)


def _rows(lo: int, hi: int) -> Callable[[tuple[int, ...]], bool]:
    return lambda shape: lo <= shape[0] <= hi


NORMS, ATTENTION = ("layer_norm", "rms_norm"), ("attention", "attention causal")
INT8_WO, INT4_WO = ("int8 weight-only",), ("int4 weight-only g128",)

TARGETS: list[Target] = [
    # ---- GPU (H100/H200, bf16) ----
    Target(2, "cuda", "LayerNorm/RMSNorm fwd+bwd, hidden 4k-16k: >= 85% of copy bandwidth", "norms", NORMS,
           "pct_of_copy_bw", 85.0, "fwd+bwd", _hidden_4k_16k),
    Target(2, "cuda", "LayerNorm/RMSNorm fwd+bwd, hidden 4k-16k: >= 1.0x torch.compile", "norms", NORMS,
           "speedup_vs_torch.compile", 1.0, "fwd+bwd", _hidden_4k_16k),
    Target(2, "cuda", "LayerNorm/RMSNorm backward >= 2x eager (measured: fwd+bwd)", "norms", NORMS,
           "speedup_vs_torch eager", 2.0, "fwd+bwd", _hidden_4k_16k),
    Target(3, "cuda", "attention fwd D=128, S >= 2k: >= 1.0x SDPA flash (FlashAttention-2)", "attention", ATTENTION,
           "speedup_vs_SDPA flash", 1.0, "fwd", _attention_d128_2k),
    Target(3, "cuda", "attention fwd D=128, S >= 2k: >= 60% of the measured bf16 matmul peak", "attention",
           ATTENTION, "pct_of_matmul", 60.0, "fwd", _attention_d128_2k),
    Target(3, "cuda", "attention backward >= 0.9x SDPA flash (measured: fwd+bwd)", "attention", ATTENTION,
           "speedup_vs_SDPA flash", 0.9, "fwd+bwd", _attention_d128_2k),
    Target(3, "cuda", "decode, batch 1-16, 4k-32k cache: >= 1.2x SDPA", "attention", ("decode",),
           "speedup_vs_SDPA", 1.2, "fwd", _decode_1_16_4k_32k),
    Target(4, "cuda", "linear_act fwd at 8192^3 within 5% of cuBLAS matmul alone", "linear",
           ("linear_act[gelu]", "linear_act[relu2]"), "speedup_vs_ceiling", 0.95, "fwd", _cube_8192),
    Target(4, "cuda", "linear_act / gated_linear at Transformer MLP shapes: >= 1.15x eager", "linear",
           ("linear_act[gelu]", "linear_act[relu2]", "gated_linear[silu]"), "speedup_vs_torch eager", 1.15, None,
           _mlp_shapes),
    Target(4, "cuda", "linear_act / gated_linear: >= 1.0x torch.compile", "linear",
           ("linear_act[gelu]", "linear_act[relu2]", "gated_linear[silu]"), "speedup_vs_torch.compile", 1.0),
    Target(4, "cuda", "GatedMLP fwd+bwd >= 1.2x eager", "mlp", ("GatedMLP[silu]",), "speedup_vs_torch eager", 1.2,
           "fwd+bwd"),
    Target(5, "cuda", "decode (batch 1-16): int8 weight-only >= 1.8x bf16 F.linear", "quant", INT8_WO,
           "speedup_vs_torch eager", 1.8, "fwd", _rows(1, 16)),
    Target(5, "cuda", "decode (batch 1-16): int4 g128 >= 3.0x bf16 F.linear", "quant", INT4_WO,
           "speedup_vs_torch eager", 3.0, "fwd", _rows(1, 16)),
    Target(5, "cuda", "batch 1: >= 85% of measured bandwidth (int8, int4)", "quant", INT8_WO + INT4_WO,
           "pct_of_copy_bw", 85.0, "fwd", _rows(1, 1)),
    Target(5, "cuda", "M >= 1024: W8A8 int8 and fp8 rowwise >= 1.6x bf16", "quant",
           ("W8A8 int8 dynamic", "fp8 rowwise (W8A8 e4m3)"), "speedup_vs_torch eager", 1.6, "fwd",
           _rows(1024, 1 << 30)),
    Target(6, "cuda", "GPT-2 124M training step >= 1.3x eager", "models", ("GPT train step",),
           "speedup_vs_torch eager", 1.3),
    Target(6, "cuda", "GPT-2 124M training step >= 1.0x torch.compile", "models", ("GPT train step",),
           "speedup_vs_torch.compile", 1.0),
    Target(6, "cuda", "GPT-2 124M training step >= 45% MFU", "models", ("GPT train step",), "pct_of_matmul", 45.0),
    Target(6, "cuda", "GPT decode >= 1.5x eager tokens/s", "models", ("GPT decode (KV cache)",),
           "speedup_vs_torch eager", 1.5),
    Target(6, "cuda", "BERT inference >= 1.3x eager", "models", ("BERT inference",), "speedup_vs_torch eager", 1.3),
    Target(6, "cuda", "ResNet-18 inference >= 1.0x eager cuDNN", "models", ("ResNet-18 inference",),
           "speedup_vs_torch eager", 1.0),
    Target(6, "cuda", "LSTM LM training >= 1.0x cuDNN", "models", ("LSTM LM train step",), "speedup_vs_torch eager",
           1.0),
    Target(7, "cuda", "LSTM fwd+bwd, padded batch >= 64: >= 1.0x cuDNN", "lstm", ("lstm",), "speedup_vs_torch eager",
           1.0, "fwd+bwd", _rows(64, 1 << 30)),
    Target(7, "cuda", "LSTM fwd+bwd, batch <= 8: >= 1.5x cuDNN (persistent kernel)", "lstm", ("lstm",),
           "speedup_vs_torch eager", 1.5, "fwd+bwd", _rows(1, 8)),
    Target(7, "cuda", "LSTM variable lengths >= 3x cuDNN's packed path", "lstm", ("lstm[varlen]",),
           "speedup_vs_torch eager", 3.0),
    Target(7, "cuda", "conv + bias + ReLU inference >= 1.0x eager cuDNN", "conv", ("conv2d+bias+relu",),
           "speedup_vs_torch eager", 1.0, "fwd"),
    Target(7, "cuda", "conv + bias + ReLU inference >= 1.0x torch.compile", "conv", ("conv2d+bias+relu",),
           "speedup_vs_torch.compile", 1.0, "fwd"),
    # ---- CPU (2 cores, float32; forced kernels: the defaults route around any that lose) ----
    Target(2, "cpu", "norms forward >= 1.0x eager", "norms", NORMS + ("add_rms_norm",), "speedup_vs_torch eager", 1.0,
           "fwd"),
    Target(2, "cpu", "norms forward+backward >= 1.5x eager", "norms", NORMS + ("add_rms_norm",),
           "speedup_vs_torch eager", 1.5, "fwd+bwd"),
    Target(3, "cpu", "attention forward >= 1.0x PyTorch CPU SDPA", "attention", ATTENTION, "speedup_vs_SDPA", 1.0,
           "fwd"),
    Target(4, "cpu", "fused GEMM epilogue >= 1.0x ATen's separate ops (eager)", "linear",
           ("linear_act[gelu]", "linear_act[relu2]", "gated_linear[silu]"), "speedup_vs_torch eager", 1.0),
    Target(5, "cpu", "decode (batch 1): int8 weight-only >= 2.5x fp32 F.linear", "quant", INT8_WO,
           "speedup_vs_torch eager", 2.5, "fwd", _rows(1, 1)),
    Target(5, "cpu", "decode (batch 1): int4 >= 4x fp32 F.linear", "quant", INT4_WO, "speedup_vs_torch eager", 4.0,
           "fwd", _rows(1, 1)),
    Target(6, "cpu", "every reference model's inference >= 1.0x backend=\"torch\"", "models",
           ("GPT inference", "GPT decode (KV cache)", "GPT-2 small decode (KV cache)", "BERT inference",
            "ResNet-18 inference", "LSTM LM inference", "LSTM classifier inference (variable lengths)"),
           "speedup_vs_torch eager", 1.0),
    Target(7, "cpu", "fused LSTM >= 1.0x PyTorch CPU (forced kernels)", "lstm", ("lstm", "lstm[varlen]"),
           "speedup_vs_torch eager", 1.0),
    Target(7, "cpu", "conv epilogues >= 1.0x PyTorch CPU (forced kernels)", "conv",
           ("conv2d+bias+relu", "conv2d+bias+residual+relu"), "speedup_vs_torch eager", 1.0),
]

TARGETS_HEADER = ["issue", "target", "measured (worst case)", "cases meeting it", "status"]


def _best_per_case(rows: list[dict], target: Target) -> dict[tuple, dict]:
    """fuseformer's best row (by the target's figure) per case the target covers."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if not r["impl"].startswith("fuseformer") or r.get(target.metric) is None or r["op"] not in target.ops:
            continue
        if (target.direction and r["direction"] != target.direction) or not target.where(tuple(r["shape"])):
            continue
        key = (r["op"], r["direction"], tuple(r["shape"]), r["dtype"])
        if key not in best or r[target.metric] > best[key][target.metric]:
            best[key] = r
    return best


def _figure(metric: str, value: float) -> str:
    return f"{value:.0f}%" if metric.startswith("pct_") else f"{value:.2f}x"


def evaluate(results: dict[str, dict], device: str) -> list[list[str]]:
    """The targets for ``device`` ("cpu" or "cuda") against ``results`` (family -> the JSON
    a benchmark wrote): one row of TARGETS_HEADER each."""
    lines = []
    for target in TARGETS:
        if target.device != device:
            continue
        rows = results.get(target.family, {}).get("results", [])
        best = _best_per_case(rows, target)
        if not best:
            lines.append([f"#{target.issue}", target.what, "-", "-", "not measured in this run"])
            continue
        worst_key, worst = min(best.items(), key=lambda item: item[1][target.metric])
        met = sum(r[target.metric] >= target.bar for r in best.values())
        op, direction, shape, _ = worst_key
        where = f"{_figure(target.metric, worst[target.metric])} ({op} {direction} {'x'.join(map(str, shape))})"
        status = "met" if met == len(best) else "missed"
        lines.append([f"#{target.issue}", target.what, where, f"{met} of {len(best)}", status])
    return lines
