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

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fuseformer._info import cpu_model, cpu_vector_isa

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
    return _cpu_turns({"": fn}, quick, errors=None)[""]


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def time_interleaved(fns: dict[str, Callable[[], Any]], device: str, quick: bool) -> tuple[dict, dict]:
    """(median ms per implementation, error per implementation that failed) for the
    implementations of one case. On a GPU each is timed by do_bench in turn. On the CPU they
    take turns, the first in turn rotating, so that a machine whose speed drifts within
    seconds (this VM's moved 30-50% between runs in a night) slows every implementation alike
    instead of whichever was timed in the slow second. Each turn is an untimed call and a
    timed one: a timed call finds the caches as the implementation's previous call left them,
    as when each was timed in a run of its own (right after another implementation, a kernel
    that keeps packed weights paid for re-reading them: LSTM 8x1024x16 training 2.4x -> 1.3x)."""
    times: dict[str, float] = {}
    errors: dict[str, str] = {}
    if device == "cuda":
        for name, fn in fns.items():
            try:
                times[name] = time_ms(fn, device, quick)
            except Exception as exc:  # a baseline that cannot run here (e.g. no compiler)
                errors[name] = _error(exc)
        return times, errors
    return _cpu_turns(fns, quick, errors), errors


def _cpu_turns(fns: dict[str, Callable[[], Any]], quick: bool, errors: dict[str, str] | None) -> dict[str, float]:
    """time_interleaved's CPU timing (time_ms's with one implementation): median ms per
    implementation. An implementation that raises is recorded in ``errors`` and dropped, or,
    with errors None, the exception propagates."""
    def failed(name: str, exc: Exception) -> None:
        if errors is None:
            raise exc
        errors[name] = _error(exc)

    live = {}
    for name, fn in fns.items():
        try:
            fn()  # warm-up (and compilation)
            fn()
            live[name] = fn
        except Exception as exc:
            failed(name, exc)
    samples: dict[str, list[float]] = {name: [] for name in live}
    budget_s = (0.3 if quick else 1.0) * max(1, len(live))
    start_all, rounds = time.perf_counter(), 0
    while live and (rounds < 3 or (time.perf_counter() - start_all < budget_s and rounds < 50)):
        names = list(live)
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            try:
                live[name]()
                start = time.perf_counter()
                live[name]()
                samples[name].append(time.perf_counter() - start)
            except Exception as exc:
                failed(name, exc)
                del live[name], samples[name]
        rounds += 1
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


# ---- ceilings ----------------------------------------------------------------------------


def _matmul_tflops(dtype: torch.dtype, device: str, quick: bool) -> float | None:
    """Dense matmul rate in ``dtype`` (fp8 through torch._scaled_mm, int8 through
    torch._int_mm), or None where this torch/device has no such matmul."""
    size = 8192 if device == "cuda" else (1024 if quick else 3072)
    try:
        if dtype == torch.float8_e4m3fn:
            if device != "cuda" or torch.cuda.get_device_capability() < (8, 9):
                return None
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype).t()
            one = torch.ones((), device=device)
            fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        elif dtype == torch.int8:
            a = torch.randint(-8, 8, (size, size), device=device, dtype=dtype)
            b = torch.randint(-8, 8, (size, size), device=device, dtype=dtype)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            fn = lambda: a @ b  # noqa: E731
        rate = 2 * size**3 / time_ms(fn, device, quick) / 1e9
    except (RuntimeError, TypeError, AttributeError):
        return None
    if device == "cpu" and dtype == torch.float32:
        # The CPU's float32 GEMM is whichever library is faster here: MKL (ATen's) runs AVX2
        # code on AMD CPUs, oneDNN (the LSTM kernels' GEMM) its AVX-512 code.
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), size)
            onednn = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")  # noqa: E731
            rate = max(rate, 2 * size**3 / time_ms(onednn, device, quick) / 1e9)
        except (RuntimeError, AttributeError):
            pass
    return rate


def measure_ceilings(device: str, quick: bool) -> dict[str, Any]:
    """What the hardware does here, now, in this run: copy bandwidth (bytes read + written
    per second) and the dense matmul rate per dtype: the denominators of "% of ceiling".
    ``matmul_TFLOPs`` is the rate of the run's default dtype (bf16 on GPU, fp32 on CPU)."""
    if device == "cuda":
        n_bytes = 1 << 30
        src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        copy_gbps = 2 * n_bytes / time_ms(lambda: dst.copy_(src), device, quick) / 1e6
        del src, dst
        dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int8)
        default = torch.bfloat16
    else:
        n = 1 << 26  # 256 MiB of float32: well past the caches
        src = torch.randn(n)
        dst = torch.empty_like(src)
        copy_gbps = 2 * n * 4 / time_ms(lambda: dst.copy_(src), device, quick) / 1e6
        del src, dst
        dtypes = (torch.float32, torch.bfloat16)
        default = torch.float32
    by_dtype = {dtype_name(d): _matmul_tflops(d, device, quick) for d in dtypes}
    return {
        "copy_GBps": copy_gbps,
        "matmul_TFLOPs": by_dtype[dtype_name(default)],
        "matmul_dtype": dtype_name(default),
        "matmul_TFLOPs_by_dtype": by_dtype,
    }


def matmul_ceiling(ceilings: dict[str, Any], dtype: str) -> float:
    """The matmul rate a case in ``dtype`` is measured against (the default one if that
    dtype's was not measured)."""
    return (ceilings.get("matmul_TFLOPs_by_dtype") or {}).get(dtype) or ceilings["matmul_TFLOPs"]


def missing_cuda_peer(module: str, label: str, device: str) -> dict[str, str]:
    """{label: why} when peer library ``module`` (a CUDA-only baseline) cannot be timed here."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return {label: "not installed"}
    if device != "cuda":
        return {label: "CUDA only"}
    return {}


# ---- environment --------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    from fuseformer._info import collect

    facts = collect()
    env = {k: facts[k] for k in ("fuseformer", "python", "torch", "torch_cuda", "triton", "cpu", "cpu_threads")}
    env["device"] = device
    env["cpu_model"] = cpu_model()
    env["cpu_vector_isa"] = cpu_vector_isa()
    env["device_name"] = (torch.cuda.get_device_name(0) if device == "cuda" else
                          f"{env['cpu_model']}, {env['cpu_vector_isa'].upper()} ({facts['cpu_threads']} threads)")
    if device == "cuda":
        fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
        values = _nvidia_smi(fields)
        names = ["driver", "clock_sm_MHz", "clock_sm_max_MHz", "clock_mem_MHz", "clock_mem_max_MHz", "power_limit_W"]
        env.update(dict(zip(names, values or [None] * len(names))))
    # The GPU suite passes the commit in (a copied tree may have no .git).
    env["git_commit"] = os.environ.get("FUSEFORMER_GIT_COMMIT")
    if not env["git_commit"]:
        try:
            # The package's own checkout (an editable install), wherever the bench runs from.
            source = os.path.dirname(os.path.abspath(__file__))
            proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=source)
            env["git_commit"] = proc.stdout.strip() if proc.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            env["git_commit"] = None
    env["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return env


def _nvidia_smi(fields: str) -> list[str] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return [v.strip() for v in out[0].split(",")] if out else None


# ---- running ------------------------------------------------------------------------------


def _is_ours(impl: str) -> bool:
    return impl.startswith("fuseformer")


# An implementation named "ceiling: ..." is a reference that does less than the op (e.g. the
# GEMM alone, without the epilogue we fuse): rows get a "vs ceiling" ratio against it, and it
# never counts as the best baseline.
CEILING_PREFIX = "ceiling: "


def _is_ceiling(impl: str) -> bool:
    return impl.startswith(CEILING_PREFIX)


def _peak_memory_mib(fn: Callable[[], Any], device: str) -> float | None:
    """Extra memory one call allocates at its peak. CUDA: the caching allocator's peak. CPU:
    the running sum of torch.profiler's memory events (what PyTorch's CPU allocator and
    fuseformer's output cache hand out; oneDNN's own scratch memory is not seen); None where
    the profiler cannot say."""
    if device == "cpu":
        return _cpu_peak_memory_mib(fn)
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@contextlib.contextmanager
def _stderr_to_devnull():
    """The C++ side's stderr (fd 2) silenced: kineto logs two lines at every profiler start and
    stop (and one about the absent GPU on a CUDA build), hundreds per benchmark run."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_memory_mib(fn: Callable[[], Any]) -> float | None:
    from torch.profiler import ProfilerActivity, profile

    # The call has already run in the timing rounds; an exception still propagates.
    with _stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # the raw events: FunctionEvent folds allocations into the op that made them
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except AttributeError:
        return None
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def allow_recompiles(limit: int = 256) -> None:
    """The torch.compile baselines compile one function per shape (dynamic=False) and pass;
    past dynamo's recompile limit (8) it would silently run the rest eagerly, so the
    'torch.compile' column would time eager PyTorch."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(4 * limit, torch._dynamo.config.accumulated_recompile_limit)


def run_cases(cases: Iterable[Case], device: str, quick: bool, ceilings: dict[str, float], progress=None,
              rows: list[dict] | None = None) -> list[dict]:
    """Time every implementation of every case. Each row carries its speedup over each
    baseline of the case (every implementation that is not fuseformer's). Rows are appended
    to `rows` (a new list if None) case by case, so a caller interrupted midway keeps the
    finished cases."""
    allow_recompiles()
    rows = [] if rows is None else rows
    for case in cases:
        times, errors = time_interleaved(case.impls, device, quick)
        memory: dict[str, float | None] = {}
        for name in list(times):
            try:
                memory[name] = _peak_memory_mib(case.impls[name], device)
            except Exception as exc:
                errors[name] = _error(exc)
                del times[name]
        baselines = [n for n in case.impls if not _is_ours(n) and not _is_ceiling(n) and n in times]
        ceilings_here = [n for n in case.impls if _is_ceiling(n) and n in times]
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
            if case.bytes and case.flops:
                # Memory- or compute-bound by where the op's arithmetic intensity falls
                # against the measured ridge point (matmul rate / copy bandwidth).
                ridge = matmul_ceiling(ceilings, row["dtype"]) * 1e3 / ceilings["copy_GBps"]
                row["intensity"] = case.flops / case.bytes
                row["bound"] = "memory" if row["intensity"] < ridge else "compute"
            else:
                row["bound"] = "memory" if case.bytes else "compute"
            t = times.get(name)
            if t is not None:
                if case.bytes:
                    row["GBps"] = case.bytes / t / 1e6
                    row["pct_of_copy_bw"] = 100 * row["GBps"] / ceilings["copy_GBps"]
                if case.flops:
                    row["TFLOPs"] = case.flops / t / 1e9
                    row["pct_of_matmul"] = 100 * row["TFLOPs"] / matmul_ceiling(ceilings, row["dtype"])
                if case.tokens:
                    row["tokens_per_s"] = case.tokens / t * 1e3
                for base in baselines:
                    if base != name:
                        row[f"speedup_vs_{base}"] = times[base] / t
                if ceilings_here and not _is_ceiling(name):
                    row["ceiling_impl"] = ceilings_here[0]
                    row["speedup_vs_ceiling"] = times[ceilings_here[0]] / t
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
    with_ceiling = any(r.get("speedup_vs_ceiling") for r in rows)
    header += ["vs ceiling impl"] * with_ceiling + ["tokens/s"] * with_tokens + ["peak MiB"] * with_memory

    def ratio(value):
        return _fmt(value, ".2f") + ("x" if value else "")

    body = []
    for r in rows:
        if r.get("TFLOPs") and r.get("bound") != "memory":
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
        line += [ratio(r.get("speedup_vs_ceiling"))] * with_ceiling
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
        "'vs best baseline' compares with the fastest non-fuseformer implementation of the row's case; "
        "'vs ceiling impl' with the case's 'ceiling:' implementation, which does less than the op "
        "(e.g. the GEMM without the fused epilogue), so 1.00x means the fusion costs nothing. "
        "'peak MiB' is the most memory one call holds beyond what existed before it (CUDA: the caching "
        "allocator's peak; CPU: torch.profiler's memory events, which oneDNN's own scratch memory is not in).",
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

    metric = "TFLOPs" if any(r.get("TFLOPs") and r.get("bound") != "memory" for r in rows) else "GBps"
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


def write_results(out_dir: Path, name: str, rows: list[dict], env: dict, ceilings: dict, title: str,
                  missing: dict[str, str] | None = None) -> list[Path]:
    """<name>.json (environment, ceilings, missing baselines, rows), .md and .png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    png_path = out_dir / f"{name}.png"
    data = {"environment": env, "ceilings": ceilings, "missing_baselines": missing or {}, "results": rows}
    json_path.write_text(json.dumps(data, indent=1))
    text = markdown(rows, env, ceilings, title)
    if missing:
        text += "\nMissing baselines: " + "; ".join(f"{k} ({v})" for k, v in missing.items()) + ".\n"
    md_path.write_text(text)
    plot(rows, png_path, title)
    return [json_path, md_path, png_path]
