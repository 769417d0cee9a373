"""Benchmarks shipped with the package (``fuseformer bench``): the harness and one module of
cases per op family."""

from __future__ import annotations

import importlib

FAMILIES = ("norms", "attention", "linear", "mlp", "loss", "conv", "lstm", "quant", "models")


def family_module(name: str):
    if name not in FAMILIES:
        raise ValueError(f"unknown benchmark family {name!r}; expected one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"fuseformer.bench.{name}")
