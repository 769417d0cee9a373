"""kernels/autotuning.py: an autotuner's untuned configs compile at once in worker processes,
for the GPU target, before the autotuner times them. Here for sm_90 without a GPU: triton's
driver is replaced by one that names the target, so the compiles are real and only the
launches are left out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from fuseformer.kernels import autotuning

SM90 = GPUTarget("cuda", 90, 32)


def _scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


# A JITFunction even under TRITON_INTERPRET=1 (triton.jit would make an interpreted one), as a
# module attribute named after its function: the workers import it so.
_scale = JITFunction(_scale)


@pytest.fixture
def sm90(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FUSEFORMER_COMPILE_WORKERS", "2")
    previous = driver._active  # None until something asks (reset_active would look for a GPU)
    driver.set_active(autotuning._TargetDriver(SM90))
    yield tmp_path
    driver.set_active(previous)
    for pool in (autotuning._pool(SM90, 2),):
        pool.shutdown()
    autotuning._pool.cache_clear()  # the workers took this test's cache folder with them


def _tuned():
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((64, 2), (128, 4), (256, 4))]
    return triton.autotune(configs=configs, key=["n"])(_scale)


def _entries(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*.cubin")}


def test_workers_compile_every_config_into_the_cache_the_launch_reads(sm90):
    tuned = _tuned()
    x = torch.randn(1000)
    args = (x, torch.empty_like(x), x.numel())
    assert autotuning.compile_configs(tuned, args, {}, SM90)
    compiled = _entries(sm90)
    assert len(compiled) == 3  # one per config, by the workers
    # The autotuner's compiles in this process (a warm-up is its compile without the launch)
    # are cache hits: the workers computed the same keys.
    for config in tuned.configs:
        kernel = _scale.warmup(*args, grid=(1,), **config.all_kwargs())
        assert kernel.metadata.target.arch == 90 and "cubin" in kernel.asm
    assert _entries(sm90) == compiled


def test_launch_compiles_each_tuning_key_once_before_the_autotuner(sm90, monkeypatch):
    tuned = _tuned()
    compiled, launched = [], []
    real = autotuning.compile_configs
    monkeypatch.setattr(autotuning, "compile_configs", lambda *a: compiled.append(a[1]) or real(*a))
    # The autotuner's timing and launch need a GPU: each config "takes" its BLOCK in ms.
    monkeypatch.setattr(tuned, "_bench", lambda *a, config, **k: [float(config.kwargs["BLOCK"])])
    monkeypatch.setattr(tuned.fn, "run", lambda *a, **k: launched.append(k["BLOCK"]))
    x = torch.randn(1024)
    args = (x, torch.empty_like(x), x.numel())
    autotuning.launch(tuned, lambda meta: (1,), args, {})
    assert len(compiled) == 1 and launched == [64]
    assert list(tuned.cache) == [autotuning.tuning_key(tuned, args, {})]  # the autotuner's own key
    autotuning.launch(tuned, lambda meta: (1,), args, {})  # tuned: nothing compiled
    other = (x[:999], torch.empty_like(x[:999]), 999)
    autotuning.launch(tuned, lambda meta: (1,), other, {})  # a new key
    assert len(compiled) == 2 and launched == [64, 64, 64]
    assert len(_entries(sm90)) == 6  # 3 configs x 2 specializations (n = 1024 and 999)


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv("FUSEFORMER_COMPILE_WORKERS", raising=False)
    assert autotuning.workers() == 0
    tuned = _tuned()
    assert not autotuning.compile_configs(tuned, (torch.randn(4), torch.randn(4), 4), {}, SM90)
