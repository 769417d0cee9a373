"""``pytest benchmarks/``: the C++ CPU kernels as regression benchmarks (pytest-benchmark).

Each run is compared with the latest run saved under benchmarks/baselines/<machine>/ (the
committed baseline of this machine type), so a slowdown shows as a comparison column, not a
failure. Save a new baseline with ``pytest benchmarks/ --benchmark-save=<name>``.
"""

from pathlib import Path

import pytest

BASELINES = Path(__file__).parent / "baselines"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Before pytest-benchmark reads its options (its own pytest_configure).
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    option = config.option
    if option.benchmark_storage == "file://./.benchmarks":
        option.benchmark_storage = f"file://{BASELINES}"
    if not option.benchmark_compare and not option.benchmark_disable and any(BASELINES.glob("*/*.json")):
        option.benchmark_compare = True  # the latest saved run for this machine
