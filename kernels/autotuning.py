"""Autotuned launches whose candidate configs compile at once, not one after another.

triton.autotune compiles each config the first time it meets a tuning key, serially, at
1-5 s a kernel (benchmarks/compile_triton_aot.py's timings for sm_90): a benchmark's first
call per shape class waits for 4-6 compiles in a row, which on a GPU lease of minutes is a
large share of it. With FUSEFORMER_COMPILE_WORKERS >= 2 (``fuseformer bench`` sets it),
``launch`` first has every config of a key it has not tuned yet compiled by a pool of worker
processes into triton's on-disk cache, then lets the autotuner time them as usual: its
compiles are then cache hits. Processes, not threads: triton holds the GIL for
most of a compile (two threads ran two sm_90 compiles in 0.65-0.75 of the serial time).

A worker compiles a config through the kernel's own warm-up (``warmup``: bind, specialize,
compile, no launch) for the parent's GPU target, with stand-ins for the tensors that carry
what triton specializes on (dtype, 16-byte alignment), so its cache key is the one the parent
computes. Anything that fails there is left to the autotuner's own compiles.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, wait

# Longest the launch waits for the workers before going on without them (a worker that
# hangs must not hang the benchmark).
COMPILE_TIMEOUT_S = 300.0


class TensorStandIn:
    """What triton's specialization reads of a tensor argument: its dtype and address."""

    def __init__(self, data_ptr: int, dtype) -> None:
        self._data_ptr, self.dtype = data_ptr, dtype

    def data_ptr(self) -> int:
        return self._data_ptr


class _TargetDriver:
    """The driver a worker gives triton: the parent's target, no device (nothing launches)."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _worker_init(target) -> None:
    from triton.runtime import driver

    driver.set_active(_TargetDriver(target))


def _compile_in_worker(module: str, name: str, args: tuple, kwargs: dict) -> None:
    kernel = getattr(importlib.import_module(module), name)
    kernel.warmup(*args, grid=(1,), **kwargs)


def tuning_key(tuned, args: tuple, kwargs: dict) -> tuple:
    """The key triton's Autotuner.run files its choice under (its key arguments, then the
    dtypes of the tensor arguments)."""
    named = {**dict(zip(tuned.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuned.arg_names}
    key = [named[k] for k in tuned.keys if k in named]
    key.extend(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
    return tuple(key)


def workers() -> int:
    """FUSEFORMER_COMPILE_WORKERS (0, off, unless set; ``fuseformer bench`` sets it to the
    core count, at most 16). Off by default because spawned workers import the main module
    of the program again, which runs a script's top level unless it is guarded by
    ``if __name__ == "__main__"``."""
    try:
        return int(os.environ.get("FUSEFORMER_COMPILE_WORKERS", "0"))
    except ValueError:
        return 0


@functools.lru_cache(maxsize=None)
def _pool(target, count: int) -> ProcessPoolExecutor | None:
    if count < 2:
        return None
    # spawn: the parent holds a CUDA context, which a forked child must not touch.
    return ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(target,))


def _stand_in(value):
    import torch

    return TensorStandIn(value.data_ptr(), value.dtype) if isinstance(value, torch.Tensor) else value


def compile_configs(tuned, args: tuple, kwargs: dict, target) -> bool:
    """Compile every config of ``tuned`` for these arguments and ``target`` in the worker
    pool, into triton's cache (nothing launches). False where there is no pool, a worker
    failed or the wait ran out (the autotuner then compiles, and reports, as it would)."""
    pool = _pool(target, workers())
    if pool is None or len(tuned.configs) < 2:
        return False
    base = tuned.base_fn  # the module attribute (a JITFunction, or heuristics around one) is named after it
    stand_ins = tuple(_stand_in(a) for a in args)
    plain_kwargs = {k: _stand_in(v) for k, v in kwargs.items()}
    try:
        futures = [pool.submit(_compile_in_worker, base.__module__, base.__name__, stand_ins,
                               {**plain_kwargs, **config.all_kwargs()}) for config in tuned.configs]
        done, pending = wait(futures, timeout=COMPILE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a broken pool: the autotuner compiles
        return False
    return not pending and all(f.exception() is None for f in done)


def launch(tuned, grid, args: tuple, kwargs: dict) -> None:
    """``tuned[grid](*args, **kwargs)``, its untuned configs compiled at once first."""
    if len(tuned.configs) > 1 and workers() > 1 and tuning_key(tuned, args, kwargs) not in tuned.cache:
        from triton.runtime import driver

        compile_configs(tuned, args, kwargs, driver.active.get_current_target())
    tuned[grid](*args, **kwargs)
