"""Tuning sweep for the Triton norm kernels on a GPU: forward num_warps, backward num_warps x
program count, LayerNorm bf16 with weight and bias, 16384 rows. Prints a markdown table per
pass with GB/s (ideal traffic) for each configuration; the heuristics in kernels/norms.py
are chosen from these tables (see benchmarks/NOTES.md).

    python benchmarks/sweep_norms.py > sweep.md
"""

import torch
import triton.testing

from fuseformer.kernels import norms as tn


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    rows = 16384
    dtype = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# Triton norm sweep, {torch.cuda.get_device_name(0)}, LayerNorm bf16, {rows} rows\n")
    print("## forward: GB/s by num_warps\n")
    print("| N | " + " | ".join(f"w{w}" for w in (2, 4, 8, 16, 32)) + " |")
    print("|---|" + "---|" * 5)
    for n in (1024, 2048, 4096, 8192, 16384):
        x = torch.randn(rows, n, device="cuda", dtype=dtype)
        w = torch.randn(n, device="cuda", dtype=dtype)
        b = torch.randn(n, device="cuda", dtype=dtype)
        cells = []
        for warps in (2, 4, 8, 16, 32):
            try:
                ms = bench(lambda: tn.norm_fwd(x, None, w, b, 1e-5, False, num_warps=warps))
                cells.append(f"{2 * x.numel() * 2 / ms / 1e6:.0f}")
            except Exception as exc:  # noqa: BLE001 - out of resources etc.
                cells.append(type(exc).__name__)
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n## backward: GB/s by num_warps (rows) x programs per SM (columns)\n")
    per_sm = (1, 2, 4, 8, 16, 32)
    print("| N | warps | " + " | ".join(f"{p}/SM" for p in per_sm) + " |")
    print("|---|---|" + "---|" * len(per_sm))
    for n in (1024, 2048, 4096, 8192):
        x = torch.randn(rows, n, device="cuda", dtype=dtype)
        w = torch.randn(n, device="cuda", dtype=dtype)
        b = torch.randn(n, device="cuda", dtype=dtype)
        _, _, mean, rstd = tn.norm_fwd(x, None, w, b, 1e-5, False)
        dy = torch.randn_like(x)
        for warps in (2, 4, 8, 16):
            cells = []
            for p in per_sm:
                try:
                    ms = bench(lambda: tn.norm_bwd(dy, None, x, w, mean, rstd, False, True,
                                                   num_warps=warps, programs=p * sms))
                    cells.append(f"{3 * x.numel() * 2 / ms / 1e6:.0f}")
                except Exception as exc:  # noqa: BLE001
                    cells.append(type(exc).__name__)
            print(f"| {n} | {warps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
