"""Host-side cost per call of each layer of a norm op on the GPU (kernel launch, launcher,
custom op, public op, module), to see where small shapes lose to PyTorch eager.

    python benchmarks/profile_overhead.py
"""

import time

import torch

import fuseformer
from fuseformer.kernels import norms as triton_norms


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    rows = [
        ("torch F.layer_norm", lambda: torch.nn.functional.layer_norm(x, (1024,), w, b)),
        ("triton launcher", lambda: triton_norms.norm_fwd(x, None, w, b, 1e-5, False)),
        ("triton custom op", lambda: torch.ops.fuseformer.triton_norm_fwd(x, None, w, b, 1e-5, False)),
        ("cuda C++ op", lambda: torch.ops.fuseformer.norm_fwd(x, None, w, b, 1e-5, False)),
        ("ops.layer_norm (default)", lambda: fuseformer.ops.layer_norm(x, (1024,), w, b)),
    ]
    with fuseformer.use_backend("cuda"):
        cuda_public = host_us(lambda: fuseformer.ops.layer_norm(x, (1024,), w, b))
    for name, fn in rows:
        print(f"{name:32s} {host_us(fn):8.1f} us/call (host)")
    print(f"{'ops.layer_norm (cuda backend)':32s} {cuda_public:8.1f} us/call (host)")


if __name__ == "__main__":
    main()
