"""Backend selection, forcing, errors, info() and the CLI."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import fuseformer
from fuseformer import backends


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="expected one of torch, triton, cpu, cuda"):
        with fuseformer.use_backend("tpu"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_forcing_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(fuseformer.BackendUnavailableError, match="'cuda' is not available"):
        with fuseformer.use_backend("cuda"):
            pass


def test_forced_backend_on_the_wrong_device_raises_at_call():
    x = torch.randn(2, 8, device="meta")
    with fuseformer.use_backend("cpu"), pytest.raises(fuseformer.BackendUnavailableError, match="cannot run on meta"):
        fuseformer.ops.layer_norm(x, (8,))


def test_use_backend_nests_and_restores():
    assert backends.forced_backend() is None
    with fuseformer.use_backend("torch"):
        with fuseformer.use_backend("cpu"):
            assert backends.forced_backend() == "cpu"
        assert backends.forced_backend() == "torch"
    assert backends.forced_backend() is None


def test_default_falls_back_to_an_available_backend():
    assert backends.default_backend("layer_norm", "cpu") in backends.available_backends("cpu")


def _python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd="/")


def test_environment_variable_forces_a_backend():
    proc = _python("import fuseformer; print(fuseformer.backends.forced_backend())", FUSEFORMER_BACKEND="torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch"


def test_environment_variable_with_a_bad_name_fails_at_import():
    proc = _python("import fuseformer", FUSEFORMER_BACKEND="nope")
    assert proc.returncode != 0
    assert "FUSEFORMER_BACKEND: expected one of" in proc.stderr


def test_info_reports_versions_backends_and_defaults():
    facts = fuseformer.info(print_out=False)
    assert facts["torch"] == torch.__version__
    assert set(facts["backends"]) == set(backends.BACKENDS)
    assert facts["defaults"]["rms_norm"]["cpu"] in backends.BACKENDS


def test_cli_info_runs():
    proc = subprocess.run([sys.executable, "-m", "fuseformer.cli", "info"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert all(family in proc.stdout for family in ("rms_norm", "layer_norm", "attention", "attention_decode"))


def test_cli_bench_quick_writes_results_and_report(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fuseformer.cli", "bench", "norms", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd="/", timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "norms.json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"torch eager", "torch.compile"} <= impls
    timed = [r for r in data["results"] if r["time_ms"] is not None]
    assert timed and all(r["time_ms"] > 0 for r in timed)
    assert data["ceilings"]["copy_GBps"] > 0 and data["ceilings"]["matmul_TFLOPs_by_dtype"]["float32"] > 0
    # Peak memory on the CPU too: a forward holds at least its output (rows x cols float32).
    for r in timed:
        if r["direction"] == "fwd":
            assert r["peak_MiB"] >= r["shape"][0] * r["shape"][1] * 4 / 2**20, r
    # A peer library that is not installed is named as missing, not dropped silently.
    assert "liger-kernel" in data["missing_baselines"]
    assert (out / "norms.md").read_text().startswith("# fuseformer norms")
    assert (out / "norms.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## norms" in report and "Missing baselines: liger-kernel" in report
    assert "## Targets" in report and "norms forward >= 1.0x eager" in report
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert (out / "roofline.png").stat().st_size > 1000 and (out / "norms_speedup.png").stat().st_size > 1000

    # The README's generated section is rebuilt from the results folder.
    readme = tmp_path / "README.md"
    from fuseformer.bench import report as report_module

    begin, end = report_module.README_BEGIN.format(folder="out"), report_module.README_END.format(folder="out")
    readme.write_text(f"intro\n{begin}\nstale\n{end}\nrest\n")
    proc = subprocess.run([sys.executable, "-m", "fuseformer.cli", "report", str(out), "--readme", str(readme)],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "stale" not in text
    assert "| layer_norm fwd | 512x1024 | float32 |" in text


def test_tests_past_the_deadline_are_skipped_with_a_summary():
    # The GPU lease's time box (tests/conftest.py, benchmarks/gpu_suite.sh): tests that cannot
    # start in time are skipped, and the run still ends with pytest's summary.
    here = os.path.dirname(__file__)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(here, "test_backends.py"), "-q", "-rs", "-p", "no:cacheprovider",
         "-k", "info_reports_versions"],
        env=dict(os.environ, FUSEFORMER_TEST_DEADLINE="0"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 skipped" in proc.stdout and "no time left to start it" in proc.stdout, proc.stdout[-2000:]


def test_cpu_peak_memory_follows_allocations_and_frees():
    from fuseformer.bench.harness import _peak_memory_mib

    def step():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 8 MiB held
        del a
        c = torch.ones(3, 1024, 1024)  # 4 + 12 = 16 MiB held: the peak
        return b.sum() + c.sum()

    peak = _peak_memory_mib(step, "cpu")
    assert 16 <= peak < 16.1, peak


def test_cli_bench_terminated_writes_the_finished_cases(tmp_path, monkeypatch):
    # `timeout` (the GPU suite's limit per family) sends SIGTERM: the cases finished by then
    # are written, the run stops with 124, and the following families do not start.
    import signal
    import types

    from fuseformer import bench, cli
    from fuseformer.bench.harness import Case

    def case(i, impl):
        return Case("fake", "copy", "fwd", (i, 64), torch.float32, {"torch eager": impl}, bytes=512.0)

    def terminate():
        os.kill(os.getpid(), signal.SIGTERM)

    fake = types.SimpleNamespace(cases=lambda device, dtype, quick: [
        case(1, lambda: torch.ones(64).clone()), case(2, lambda: torch.ones(64).clone()), case(3, terminate),
        case(4, lambda: torch.ones(64).clone())])
    never = types.SimpleNamespace(cases=lambda *args: pytest.fail("a family after the terminated one ran"))
    monkeypatch.setattr(bench, "FAMILIES", ("fake", "never"))
    monkeypatch.setattr(bench, "family_module", {"fake": fake, "never": never}.__getitem__)
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["bench", "fake", "never", "--quick", "--device", "cpu", "--out", str(out)]) == 124
    assert signal.getsignal(signal.SIGTERM) is handler
    data = json.loads((out / "fake.json").read_text())
    assert [r["shape"] for r in data["results"]] == [[1, 64], [2, 64]]
    assert "stopped by SIGTERM after 2 of 4 cases" in (out / "fake.md").read_text()
    assert (out / "report.md").exists() and not (out / "never.json").exists()


def test_targets_report_met_missed_and_unmeasured():
    # Per case the best fuseformer backend counts; a target is met only when every case it
    # covers reaches the bar, and one with no case in the results says so.
    from fuseformer.bench import targets

    def row(impl, shape, speedup):
        return {"impl": impl, "op": "attention", "direction": "fwd", "shape": list(shape), "dtype": "float32",
                "speedup_vs_SDPA": speedup}

    results = {"attention": {"results": [
        row("fuseformer[cpu]", (1, 8, 512, 64), 1.4), row("fuseformer[triton]", (1, 8, 512, 64), 0.5),
        row("SDPA", (1, 8, 512, 64), None), row("fuseformer[cpu]", (1, 8, 64, 64), 0.8)]}}
    lines = {line[1]: line for line in targets.evaluate(results, "cpu")}
    attention = lines["attention forward >= 1.0x PyTorch CPU SDPA"]
    assert attention[2:] == ["0.80x (attention fwd 1x8x64x64)", "1 of 2", "missed"]
    assert lines["norms forward >= 1.0x eager"][4] == "not measured in this run"
    results["attention"]["results"][-1]["speedup_vs_SDPA"] = 1.1
    lines = {line[1]: line for line in targets.evaluate(results, "cpu")}
    assert lines["attention forward >= 1.0x PyTorch CPU SDPA"][3:] == ["2 of 2", "met"]
    assert all(t.device in ("cpu", "cuda") and t.bar > 0 for t in targets.TARGETS)
    assert not any(line[1].startswith("attention fwd D=128") for line in targets.evaluate(results, "cpu"))


def test_cli_rejects_unknown_family(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fuseformer.cli", "bench", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 2
    assert "unknown family" in proc.stderr


def test_bench_cases_bind_their_own_inputs():
    """The harness lists every case before it times any: each case's implementations must
    read that case's tensors, not the last case's (closures over a loop variable did)."""
    from fuseformer.bench import attention as attention_bench

    cases = [c for c in attention_bench._decode_cases("cpu", torch.float32, quick=False)]
    assert len({c.shape for c in cases}) > 1
    for case in cases:
        for name, impl in case.impls.items():
            if name == "torch eager":
                continue
            assert impl().shape[0] == case.shape[0], (name, case.label)


def test_cpu_timing_interleaves_the_implementations_of_a_case():
    """On the CPU the implementations of a case take turns (a drifting machine then slows
    them alike); one that fails, at its warm-up or later, is reported and the rest timed."""
    from fuseformer.bench import harness

    calls = []

    def impl(name, fail_at=None):
        def run():
            calls.append(name)
            if fail_at is not None and calls.count(name) >= fail_at:
                raise RuntimeError(f"{name} gave up")
        return run

    times, errors = harness.time_interleaved(
        {"a": impl("a"), "b": impl("b"), "broken": impl("broken", fail_at=1), "late": impl("late", fail_at=5)},
        "cpu", quick=True)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert errors == {"broken": "RuntimeError: broken gave up", "late": "RuntimeError: late gave up"}
    turns = [c for c in calls[7:] if c in ("a", "b")]  # after the warm-ups (2 each; broken's 1)
    runs = [len(list(group)) for _, group in itertools.groupby(turns)]
    # A turn is two calls (untimed, timed); a round's last turn may meet the next round's
    # first, of the same implementation, as the first in turn rotates.
    assert len(turns) >= 12 and len(runs) >= 4 and set(runs) <= {2, 4}


# The C++ CPU kernels' per-call GEMMs (attention tiles, weight gradients) come from oneDNN on
# AMD CPUs and from ATen's MKL on Intel CPUs (csrc/cpu/gemm.h); CI lands on either kind, so
# each library is forced once here: the CPU-kernel tests of the GEMM families, in a subprocess
# (the choice is read once per process).
@pytest.mark.skipif("cpu" not in backends.available_backends("cpu"), reason="needs the C++ CPU kernels")
@pytest.mark.parametrize("library", ["onednn", "aten"])
def test_cpu_kernels_under_each_gemm_library(library):
    tests = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu and not triton",
         "test_linear.py", "test_attention.py", "test_lstm.py"],
        cwd=tests, env=dict(os.environ, FUSEFORMER_CPU_GEMM=library), capture_output=True, text=True, timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@pytest.mark.skipif("cpu" not in backends.available_backends("cpu"), reason="needs the C++ CPU kernels")
def test_bad_cpu_gemm_library_is_a_clear_error():
    code = ("import torch, fuseformer\n"
            "with fuseformer.use_backend('cpu'):\n"
            "    fuseformer.ops.attention(*(torch.randn(1, 1, 256, 64) for _ in range(3)))\n")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FUSEFORMER_CPU_GEMM="mkl"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "FUSEFORMER_CPU_GEMM must be onednn, aten or auto, got 'mkl'" in run.stderr


def test_cpu_gemm_library_follows_the_environment(monkeypatch):
    for value in ("onednn", "aten"):
        monkeypatch.setenv("FUSEFORMER_CPU_GEMM", value)
        assert backends.cpu_gemm_library() == value
    monkeypatch.setenv("FUSEFORMER_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="FUSEFORMER_CPU_GEMM must be onednn, aten or auto, got 'mkl'"):
        backends.cpu_gemm_library()
    monkeypatch.delenv("FUSEFORMER_CPU_GEMM")
    assert backends.cpu_gemm_library() in ("onednn", "aten")


# The extension reads the vendor with cpuid; Linux names it in /proc/cpuinfo, an independent
# reading of the same fact: MKL (ATen) on Intel CPUs when torch has MKL, oneDNN otherwise.
@pytest.mark.skipif("cpu" not in backends.available_backends("cpu"), reason="needs the C++ CPU kernels")
@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the vendor from /proc/cpuinfo")
def test_vendor_cpu_gemm_library_is_the_cpus(monkeypatch):
    with open("/proc/cpuinfo") as cpuinfo:
        vendors = {line.split(":")[-1].strip() for line in cpuinfo if line.startswith("vendor_id")}
        cpuinfo.seek(0)
        avx512 = any(line.startswith("flags") and " avx512f" in line for line in cpuinfo)
    intel = vendors == {"GenuineIntel"}
    expected = "aten" if (intel or not avx512) and torch.backends.mkl.is_available() else "onednn"
    assert fuseformer._extension.vendor_cpu_gemm_library() == expected
    monkeypatch.delenv("FUSEFORMER_CPU_GEMM", raising=False)
    assert backends.cpu_gemm_library() == expected
