"""fuseformer.info(): versions, devices, backends and the default backend per op family."""

from __future__ import annotations

import platform
from typing import Any

import torch

from fuseformer import _extension, backends


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"), else its architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vector_isa() -> str:
    """The widest vector ISA ATen dispatches to here: "avx512", "avx2", or "default" (which
    code the CPU kernels' vectorized loops run, csrc/cpu/vectorize.h, follows the same split)."""
    return torch.backends.cpu.get_cpu_capability().lower()


def collect() -> dict[str, Any]:
    from fuseformer import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "fuseformer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": backends.triton_interpreting(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": cpu_model(),
        "cpu_vector_isa": cpu_vector_isa(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_gemm_library": backends.cpu_gemm_library(),
        "cpu_output_cache": _cpu_output_cache(),
        "extension": "loaded" if _extension.loaded() else f"not loaded: {_extension.LOAD_ERROR}",
        "extension_cuda_kernels": _extension.has_kernel("norm_fwd", "CUDA"),
        "backends": {
            b: {d: backends.why_unavailable(b, d) or "available" for d in devices} for b in backends.BACKENDS
        },
        "forced_backend": backends.forced_backend(),
        "defaults": {
            family: {d: backends.default_backend(family, d) for d in devices} for family in backends.DEFAULTS
        },
    }


def _cpu_output_cache() -> str:
    """The C++ kernels' block cache for large CPU outputs (csrc/allocate.h): held / budget."""
    if not _extension.loaded():
        return "none (no extension)"
    try:
        budget, held = _extension.cpu_cache_budget(), _extension.cpu_cache_bytes()
    except ValueError as exc:  # a bad FUSEFORMER_CPU_CACHE_MIB: shown, not raised
        return f"error: {exc}"
    return f"{held / 2**20:.1f} MiB held of {budget >> 20} MiB" if budget else "off (FUSEFORMER_CPU_CACHE_MIB=0)"


def info(print_out: bool = True) -> dict[str, Any]:
    """Print (and return) versions, the device, available backends and default backends."""
    facts = collect()
    if print_out:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        versions = Table(title="fuseformer", show_header=False)
        for key in ("fuseformer", "python", "torch", "torch_cuda", "triton", "triton_interpret",
                    "gpu", "cpu", "cpu_vector_isa", "cpu_threads", "cpu_gemm_library", "cpu_output_cache", "extension", "extension_cuda_kernels", "forced_backend"):
            versions.add_row(key, str(facts[key]))
        console.print(versions)
        table = Table(title="backends")
        devices = list(next(iter(facts["backends"].values())))
        table.add_column("backend")
        for d in devices:
            table.add_column(f"{d} tensors")
        for b, per_device in facts["backends"].items():
            table.add_row(b, *(per_device[d] for d in devices))
        console.print(table)
        defaults = Table(title="default backend per op family")
        defaults.add_column("family")
        for d in devices:
            defaults.add_column(d)
        for family, per_device in facts["defaults"].items():
            defaults.add_row(family, *(per_device[d] for d in devices))
        console.print(defaults)
    return facts
