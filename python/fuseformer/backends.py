"""Which backend runs each op: what exists here, the defaults, and the overrides.

Backends:
  "torch"   the PyTorch reference (plain PyTorch ops; the ground truth of the tests)
  "triton"  Triton kernels (kernels/): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  "cpu"     C++ CPU kernels of the extension (csrc/cpu/)
  "cuda"    C++ CUDA kernels of the extension (csrc/cuda/)

Forcing: ``with fuseformer.use_backend("triton"): ...`` or ``FUSEFORMER_BACKEND=triton`` (read
when fuseformer is imported). A forced backend that cannot run here raises
``BackendUnavailableError``; it never falls back. Without forcing, each op family takes the
first available backend of its default list for the tensor's device (``DEFAULTS``).
"""

from __future__ import annotations

import functools
import os

import torch

from fuseformer import _extension

BACKENDS = ("torch", "triton", "cpu", "cuda")

# Preference per op family and device type, fastest measured first. Each list ends with
# "torch", which is always available.
DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    # CUDA (benchmarks/results/NVIDIA-H100-80GB-HBM3/norms.md): Triton forward reaches
    # 95-99% of copy bandwidth from N=4096 (1.2-1.6x eager); small rows and forward+backward
    # are host-overhead bound for now (benchmarks/NOTES.md), the C++ CUDA kernels next.
    # CPU (benchmarks/results/cpu/norms.md, AMD EPYC): the C++ kernels are 1.2-20x eager
    # forward and 1.1-21x forward+backward (outputs from a block cache, csrc/allocate.h); the
    # closest, LayerNorm 4096x1024, 1.0-1.2x forward and 1.0-1.1x forward+backward over runs,
    # both sides near the copy rate, so both take the kernels; LayerNorm calls under
    # CPU_LAYER_NORM_MIN_ELEMENTS stay on eager (ops/norms.py).
    "layer_norm": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    "rms_norm": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    # Attention (dense and packed): the Triton flash kernels on CUDA (not yet measured on a
    # GPU). On CPU (benchmarks/results/cpu/attention.md) the C++ kernels (tile GEMMs through
    # oneDNN) are 1.5-2.2x SDPA causal or not on AMD CPUs, and lose below ~128x128 scores per
    # head, so calls SDPA can run that are that small stay on SDPA (ops/attention.py) and
    # everything else takes the C++ kernels. On Intel CPUs (benchmarks/results/cpu-intel-xeon/)
    # SDPA's tiles run on MKL's fast kernels too: causal calls from 384x384 scores are 1.0-1.6x
    # SDPA there, non-causal ones 0.74-0.99x at every length, so where cpu_gemm_library() is
    # "aten" only causal calls from 384x384 take the kernels.
    "attention": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    # KV-cache decode: split-K Triton on CUDA. On CPU the C++ decode kernel (direct dot
    # products, a GQA group's heads share each key row, split-K over the threads): 1.1-1.9x
    # SDPA with and without GQA, 4.6 vs 7.6 us at GPT decode's smallest (benchmarks/NOTES.md).
    "attention_decode": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    # GEMM + bias + activation, plain and gated (linear_act, gated_linear). CUDA: the Triton
    # GEMM with the fused epilogue, then cuBLASLt with its epilogues (neither measured on a
    # GPU yet: benchmarks/gpu_suite.sh bench:linear decides); a plain projection (activation
    # "none") has nothing to fuse and takes cuBLAS (ops/linear.py). CPU
    # (benchmarks/results/cpu/linear.md, mlp.md): the C++ kernels' GEMM is oneDNN's with the
    # weight packed once and kept (csrc/cpu/gemm.h): linear_act 2.2-3.6x eager forward,
    # 1.5-1.8x forward+backward; MLP and GatedMLP 2.2-2.3x / 1.6-1.7x.
    "linear": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    # Convolution + bias (+ residual) + activation: the Triton implicit GEMM on CUDA (not yet
    # measured on a GPU). CPU (benchmarks/results/cpu/conv.md): float32 inference takes the
    # C++ kernels (one oneDNN convolution with the epilogue as post-ops and the weight packed
    # once); training stays on eager, which the forced kernels only match (forward+backward
    # 0.94-1.07x with relu's training forward the same oneDNN call and the autograd in C++;
    # ops/conv.py routes per call).
    "conv": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    # LSTM: the fused Triton kernels on CUDA (persistent up to hidden 128, else one step
    # kernel per step; not yet measured on a GPU: bench:lstm decides between them, the CUDA
    # cell and cuDNN). CPU (benchmarks/results/cpu/lstm.md): the C++ kernels for
    # variable-length batches (1.6-2.7x torch's packed path) and projections (1.3-1.7x) from
    # batch 8, and below batch 8 (small-batch loop in inference: 1.1-3.8x); dense float32 LSTMs
    # from batch 8 stay on torch's oneDNN RNN, which they do not beat (ops/lstm.py routes per call).
    "lstm": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
    # Linear + cross-entropy, chunked (an LM head's loss without its logits): on CUDA the
    # Triton row kernel between cuBLAS GEMMs (not yet measured on a GPU: bench:loss); on the
    # CPU the C++ kernel (benchmarks/results/cpu/loss.md).
    "linear_cross_entropy": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    # Weight-only quantized linear (int8 / int4): on CUDA the Triton GEMM with the
    # dequantization in its main loop, then the C++ CUDA GEMV (neither measured on a GPU yet:
    # bench:quant decides); CPU: the C++ GEMV (benchmarks/results/cpu/quant.md).
    "quant": {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")},
}


# The backends that implement each op family ("torch" implements all of them).
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "layer_norm": BACKENDS,
    "rms_norm": BACKENDS,
    "attention": ("torch", "triton", "cpu"),
    "attention_decode": ("torch", "triton", "cpu", "cuda"),
    "linear": BACKENDS,
    "conv": ("torch", "triton", "cpu"),
    "lstm": BACKENDS,
    "quant": BACKENDS,
    "linear_cross_entropy": ("torch", "triton", "cpu"),
}


# Read once at import: compiled callers (torch.compile traces cpu_gemm_library) see a constant.
_VENDOR_CPU_GEMM = _extension.vendor_cpu_gemm_library()


def cpu_gemm_library() -> str:
    """Where the C++ CPU kernels' per-call GEMMs run: "aten" (MKL) on Intel CPUs and on CPUs
    without AVX-512 when torch has MKL, else "onednn" (AMD EPYCs with AVX-512, where oneDNN's
    AVX-512 kernels beat MKL's AVX2 path); FUSEFORMER_CPU_GEMM overrides it. The vendor's choice is the
    extension's (csrc/cpu/gemm.h per_call_gemm_library(), which the kernels follow)."""
    forced = os.environ.get("FUSEFORMER_CPU_GEMM", "auto")
    if forced in ("onednn", "aten"):
        return forced
    if forced not in ("auto", ""):
        raise ValueError(f"FUSEFORMER_CPU_GEMM must be onednn, aten or auto, got {forced!r}")
    return _VENDOR_CPU_GEMM


class BackendUnavailableError(RuntimeError):
    """A backend was forced (use_backend / FUSEFORMER_BACKEND) that cannot run here."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401

        from fuseformer import kernels  # noqa: F401
    except Exception as exc:  # ImportError, or triton failing to find a driver
        return f"{type(exc).__name__}: {exc}"
    return None


_availability: dict[tuple[str, str], str | None] = {}


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run ops on tensors of ``device_type``, else the reason.

    Cached: what is installed and present does not change while the process runs (set
    TRITON_INTERPRET before the first call). A plain dict rather than lru_cache, which
    torch.compile would trace through with a warning."""
    key = (backend, device_type)
    if key not in _availability:
        _availability[key] = _why_unavailable(backend, device_type)
    return _availability[key]


def _why_unavailable(backend: str, device_type: str) -> str | None:
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"
    if backend == "torch":
        return None
    if backend == "triton":
        if (err := _triton_import_error()) is not None:
            return f"Triton cannot be imported ({err})"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is available"
        if device_type == "cpu":
            return (
                None
                if triton_interpreting()
                else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
            )
        return f"Triton does not run on {device_type} tensors"
    if backend == "cpu":
        if device_type != "cpu":
            return f"the C++ CPU kernels take CPU tensors, not {device_type} tensors"
        if not _extension.loaded():
            return f"the C++ extension fuseformer._C is not loaded ({_extension.LOAD_ERROR})"
        return None
    # backend == "cuda"
    if device_type != "cuda":
        return f"the C++ CUDA kernels take CUDA tensors, not {device_type} tensors"
    if not _extension.loaded():
        return f"the C++ extension fuseformer._C is not loaded ({_extension.LOAD_ERROR})"
    if not _extension.has_kernel("norm_fwd", "CUDA"):
        return "fuseformer was built without CUDA kernels (torch without CUDA, or nvcc not found)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _devices_here() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends that can run here: on ``device_type`` tensors, or on any device if None."""
    devices = [device_type] if device_type else _devices_here()
    return [b for b in BACKENDS if any(why_unavailable(b, d) is None for d in devices)]


# ---- forcing -----------------------------------------------------------------------------

_forced: list[str] = []  # use_backend stack (innermost last)
_usable_names: dict[str, None] = {}  # backends use_backend has checked and found available here


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    if name not in available_backends():
        reasons = "; ".join(f"{d}: {why_unavailable(name, d)}" for d in _devices_here())
        raise BackendUnavailableError(f"{source}: backend {name!r} is not available here ({reasons})")
    return name


_env_backend: str | None = None
if os.environ.get("FUSEFORMER_BACKEND"):
    _env_backend = _check_name(os.environ["FUSEFORMER_BACKEND"], "FUSEFORMER_BACKEND")


class use_backend:
    """Force every fuseformer op inside the block to run on backend ``name``.

    Raises ValueError for an unknown name and BackendUnavailableError for a backend that
    cannot run on this machine; an op on tensors the backend cannot take (say "cpu" with CUDA
    tensors) raises BackendUnavailableError when it is called. (A class, not a generator
    context manager, and the name checked once per process: entering and leaving costs 0.3 us
    instead of 4.5, which a forced call of a 60 us op would otherwise pay.)
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        # Availability does not change while the process runs (why_unavailable): a name that
        # passed the check once passes again.
        if name not in _usable_names:
            _usable_names[_check_name(name, "use_backend")] = None
        self._name = name

    def __enter__(self) -> None:
        _forced.append(self._name)

    def __exit__(self, *exc_info) -> None:
        _forced.pop()


def forced_backend() -> str | None:
    if _forced:
        return _forced[-1]
    return _env_backend


_default_choice: dict[tuple[str, str], str] = {}


def default_backend(family: str, device_type: str) -> str:
    """The backend an op family takes on ``device_type`` when nothing is forced (cached, as
    availability is: ops ask at every call)."""
    key = (family, device_type)
    choice = _default_choice.get(key)
    if choice is None:
        choice = next((b for b in DEFAULTS[family].get(device_type, ("torch",))
                       if why_unavailable(b, device_type) is None), "torch")
        _default_choice[key] = choice
    return choice


def resolve(family: str, device: torch.device) -> str:
    """The backend that runs ``family`` on tensors of ``device`` now."""
    forced = _forced[-1] if _forced else _env_backend
    if forced is None:
        choice = _default_choice.get((family, device.type))
        return choice if choice is not None else default_backend(family, device.type)
    if forced not in IMPLEMENTED[family]:
        raise BackendUnavailableError(
            f"fuseformer {family}: backend {forced!r} was forced but has no {family} kernels; "
            f"{family} runs on {', '.join(repr(b) for b in IMPLEMENTED[family])}"
        )
    reason = why_unavailable(forced, device.type)
    if reason is not None:
        raise BackendUnavailableError(
            f"fuseformer {family}: backend {forced!r} was forced but cannot run on "
            f"{device.type} tensors: {reason}"
        )
    return forced
