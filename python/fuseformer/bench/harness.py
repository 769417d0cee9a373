"""The benchmark harness every op family uses: timing, baselines in the same run, hardware
ceilings, and results as JSON, markdown and a PNG plot.

A family module (``fuseformer.bench.<family>``) defines ``cases(device, dtype, quick)``, which
yields ``Case`` objects. A case holds the implementations to compare (fuseformer's backends
and the baselines: PyTorch eager, torch.compile) as zero-argument callables over inputs it
has already built, and the bytes / FLOPs an ideal kernel would move / do, from which GB/s,
TFLOP/s and the fraction of the measured ceiling follow.

Timing: on a GPU, ``triton.testing.do_bench`` (median; it clears L2 between runs); on the
CPU, the median of repeated wall-clock runs after warm-up.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

# Baselines every family names the same way (the table has a column for each); any other
# implementation whose name does not start with "fuseformer" is a baseline too.
BASELINES = ("torch eager", "torch.compile")


@dataclasses.dataclass
class Case:
    family: str
    op: str  # e.g. "layer_norm"
    direction: str  # "fwd" or "fwd+bwd"
    shape: tuple[int, ...]
    dtype: torch.dtype
    impls: dict[str, Callable[[], Any]]  # name -> callable; ours start with "fuseformer"
    bytes: float = 0.0  # moved by an ideal kernel (each input read once, each output written once)
    flops: float = 0.0
    tokens: float = 0.0  # tokens produced per call (decode), for tokens/s

    @property
    def label(self) -> str:
        return f"{self.op} {self.direction} {'x'.join(map(str, self.shape))} {dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- timing -------------------------------------------------------------------------------


def time_ms(fn: Callable[[], Any], device: str, quick: bool) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                             return_mode="median"))
    fn()  # warm-up (and compilation)
    fn()
    budget_s = 0.3 if quick else 1.0
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start_all < budget_s and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ---- ceilings ----------------------------------------------------------------------------


def measure_ceilings(device: str, quick: bool) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and dense matmul throughput, measured
    here, now: the denominators of "% of ceiling"."""
    if device == "cuda":
        n_bytes = 1 << 30
        src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src), device, quick)
        size = 8192
        a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        mm_ms = time_ms(lambda: a @ b, device, quick)
        del src, dst, a, b
        return {
            "copy_GBps": 2 * n_bytes / copy_ms / 1e6,
            "matmul_TFLOPs": 2 * size**3 / mm_ms / 1e9,
            "matmul_dtype": "bfloat16",
        }
    n = 1 << 26  # 256 MiB of float32: well past the caches
    src = torch.randn(n)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick)
    size = 1024 if quick else 2048
    a, b = torch.randn(size, size), torch.randn(size, size)
    mm_ms = time_ms(lambda: a @ b, device, quick)
    return {
        "copy_GBps": 2 * n * 4 / copy_ms / 1e6,
        "matmul_TFLOPs": 2 * size**3 / mm_ms / 1e9,
        "matmul_dtype": "float32",
    }


# ---- environment --------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    from fuseformer._info import collect

    facts = collect()
    env = {k: facts[k] for k in ("fuseformer", "python", "torch", "torch_cuda", "triton", "cpu", "cpu_threads")}
    env["device"] = device
    env["device_name"] = torch.cuda.get_device_name(0) if device == "cuda" else (facts["cpu"] + " CPU")
    if device == "cuda":
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    # The GPU suite passes the commit in (a copied tree may have no .git).
    env["git_commit"] = os.environ.get("FUSEFORMER_GIT_COMMIT")
    if not env["git_commit"]:
        try:
            proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            env["git_commit"] = proc.stdout.strip() if proc.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            env["git_commit"] = None
    env["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return env


# ---- running ------------------------------------------------------------------------------


def _is_ours(impl: str) -> bool:
    return impl.startswith("fuseformer")


def _peak_memory_mib(fn: Callable[[], Any], device: str) -> float | None:
    """Extra device memory one call allocates at its peak (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_cases(cases: Iterable[Case], device: str, quick: bool, ceilings: dict[str, float], progress=None) -> list[dict]:
    """Time every implementation of every case. Each row carries its speedup over each
    baseline of the case (every implementation that is not fuseformer's)."""
    rows: list[dict] = []
    for case in cases:
        times: dict[str, float] = {}
        memory: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        for name, fn in case.impls.items():
            try:
                times[name] = time_ms(fn, device, quick)
                memory[name] = _peak_memory_mib(fn, device)
            except Exception as exc:  # a baseline that cannot run here (e.g. no compiler)
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        baselines = [n for n in case.impls if not _is_ours(n) and n in times]
        for name in case.impls:
            row = {
                "family": case.family,
                "op": case.op,
                "direction": case.direction,
                "shape": list(case.shape),
                "dtype": dtype_name(case.dtype),
                "impl": name,
                "time_ms": times.get(name),
                "peak_MiB": memory.get(name),
                "error": errors.get(name),
            }
            t = times.get(name)
            if t is not None:
                if case.bytes:
                    row["GBps"] = case.bytes / t / 1e6
                    row["pct_of_copy_bw"] = 100 * row["GBps"] / ceilings["copy_GBps"]
                if case.flops:
                    row["TFLOPs"] = case.flops / t / 1e9
                    row["pct_of_matmul"] = 100 * row["TFLOPs"] / ceilings["matmul_TFLOPs"]
                if case.tokens:
                    row["tokens_per_s"] = case.tokens / t * 1e3
                for base in baselines:
                    if base != name:
                        row[f"speedup_vs_{base}"] = times[base] / t
                if _is_ours(name) and baselines:
                    best = min(baselines, key=lambda b: times[b])
                    row["best_baseline"] = best
                    row["speedup_vs_best"] = times[best] / t
            rows.append(row)
        if progress is not None:
            progress()
    return rows


# ---- reports ------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Throughput is TFLOP/s for compute-bound cases and GB/s for memory-bound ones, each
    with its fraction of the measured ceiling."""
    header = ["op", "pass", "shape", "dtype", "impl", "time (ms)", "throughput", "% of ceiling",
              "vs eager", "vs compile", "vs best baseline"]
    with_tokens = any(r.get("tokens_per_s") for r in rows)
    with_memory = any(r.get("peak_MiB") is not None for r in rows)
    header += ["tokens/s"] * with_tokens + ["peak MiB"] * with_memory

    def ratio(value):
        return _fmt(value, ".2f") + ("x" if value else "")

    body = []
    for r in rows:
        if r.get("TFLOPs"):
            throughput, pct = f"{r['TFLOPs']:.3g} TFLOP/s", _fmt(r.get("pct_of_matmul"), ".1f")
        elif r.get("GBps"):
            throughput, pct = f"{r['GBps']:.1f} GB/s", _fmt(r.get("pct_of_copy_bw"), ".1f")
        else:
            throughput, pct = "-", "-"
        best = f"{ratio(r['speedup_vs_best'])} ({r['best_baseline']})" if r.get("best_baseline") else "-"
        line = [
            r["op"], r["direction"], "x".join(map(str, r["shape"])), r["dtype"], r["impl"],
            _fmt(r["time_ms"], ".4f", r.get("error") and "error" or "-"), throughput, pct,
            ratio(r.get("speedup_vs_torch eager")), ratio(r.get("speedup_vs_torch.compile")), best,
        ]
        line += [_fmt(r.get("tokens_per_s"), ".0f")] * with_tokens + [_fmt(r.get("peak_MiB"), ".0f")] * with_memory
        body.append(line)
    return header, body


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = table_rows(rows)
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right" if h not in ("op", "pass", "impl", "dtype") else "left",
                         overflow="fold")
    for line in body:
        table.add_row(*line)
    Console(width=max(140, Console().width)).print(table)


def markdown(rows: list[dict], env: dict, ceilings: dict, title: str) -> str:
    header, body = table_rows(rows)
    lines = [
        f"# {title}",
        "",
        f"Device: **{env['device_name']}**; torch {env['torch']} (CUDA {env.get('torch_cuda')}), "
        f"triton {env.get('triton')}, Python {env['python']}, driver {env.get('driver', '-')}, "
        f"fuseformer {env['fuseformer']} at commit `{env.get('git_commit') or '-'}`, {env['date']}.",
        "",
        f"Measured ceilings in this run: copy {ceilings['copy_GBps']:.0f} GB/s (bytes read + written), "
        f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_TFLOPs']:.1f} TFLOP/s.",
        "GB/s counts the bytes an ideal kernel moves (each input read once, each output written once); "
        "TFLOP/s counts the FLOPs of the op's definition (attention: 4·B·H·S·L·D forward, halved when causal, "
        "backward 2.5x forward). 'vs X' is X's time divided by this row's time (above 1: faster than X); "
        "'vs best baseline' compares with the fastest non-fuseformer implementation of the row's case.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['op']} {r['direction']} {r['impl']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "TFLOPs" if any(r.get("TFLOPs") for r in rows) else "GBps"
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["direction"], r["dtype"]), []).append(r)
    n = len(groups)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, ((op, direction, dtype), group) in zip(axes.flat, groups.items()):
        impls = list(dict.fromkeys(r["impl"] for r in group))
        shapes = list(dict.fromkeys("x".join(map(str, r["shape"])) for r in group))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            values = []
            for s in shapes:
                match = [r for r in group if r["impl"] == impl and "x".join(map(str, r["shape"])) == s]
                values.append(match[0].get(metric) or 0.0 if match else 0.0)
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20, fontsize=8)
        ax.set_ylabel("TFLOP/s" if metric == "TFLOPs" else "GB/s")
        ax.set_title(f"{op} {direction} ({dtype})", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out_dir: Path, name: str, rows: list[dict], env: dict, ceilings: dict, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    png_path = out_dir / f"{name}.png"
    json_path.write_text(json.dumps({"environment": env, "ceilings": ceilings, "results": rows}, indent=1))
    md_path.write_text(markdown(rows, env, ceilings, title))
    plot(rows, png_path, title)
    return [json_path, md_path, png_path]
