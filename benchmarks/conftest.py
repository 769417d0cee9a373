"""``pytest benchmarks/``: the C++ CPU kernels as regression benchmarks (pytest-benchmark).

Each run is compared with the latest run saved for this CPU model and vector ISA, under
benchmarks/baselines/<cpu-model>-<isa>/<machine>/ (e.g. amd-epyc-avx512/Linux-CPython-3.11-64bit/):
CI machines are AMD EPYC (with and without AVX-512) or Intel Xeon VMs, whose kernels differ by
up to 3x (benchmarks/NOTES.md), so a run compared with another kind's baseline would show a
regression that is not one. A
slowdown shows as a comparison column, not a failure; a CPU model without a baseline is said
and not compared. Save one with ``pytest benchmarks/ --benchmark-save=baseline``.
"""

import re
from pathlib import Path

import pytest

BASELINES = Path(__file__).parent / "baselines"


def cpu_baselines() -> Path:
    """This CPU model's (and vector ISA's) folder of baselines."""
    from fuseformer._info import cpu_model, cpu_vector_isa

    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\bprocessor\b", " ", cpu_model().lower())
    return BASELINES / f"{re.sub(r'[^a-z0-9]+', '-', name).strip('-') or 'unknown-cpu'}-{cpu_vector_isa()}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark reads its options (its own pytest_configure).
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    option = config.option
    if option.benchmark_storage == "file://./.benchmarks":
        folder = cpu_baselines()
        option.benchmark_storage = f"file://{folder}"
        if not option.benchmark_compare and not option.benchmark_disable:
            if any(folder.glob("*/*.json")):
                option.benchmark_compare = True  # the latest saved run for this CPU and Python
            else:
                config._fuseformer_no_baseline = folder


def pytest_report_header(config):
    folder = getattr(config, "_fuseformer_no_baseline", None)
    if folder is not None:
        return f"fuseformer: no saved baseline for this CPU ({folder.name}); timings are not compared"
    return None
