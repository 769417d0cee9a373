"""Casting float32 results to the output dtype, correctly rounded everywhere.

On a GPU, ``x.to(tl.bfloat16)`` rounds to nearest even. The Triton interpreter (3.6-3.9,
measured here) truncates float32 -> bfloat16 instead, which makes CPU tests of bf16 outputs
fail by one ulp. Kernels therefore cast through ``to_output``: with ``SOFTWARE_BF16`` (set by
the launchers under TRITON_INTERPRET=1) it rounds to nearest even by integer arithmetic on
the float32 bits, after which truncation is exact; on a GPU it is a plain cast.
"""

import os

import triton
import triton.language as tl


def software_bf16() -> bool:
    """Whether kernels should round to bfloat16 in software (the interpreter truncates)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def to_output(x, DTYPE: tl.constexpr, SOFTWARE_BF16: tl.constexpr):
    if SOFTWARE_BF16:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            # Round half to even at bit 16; NaN and inf keep their class.
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(DTYPE)
