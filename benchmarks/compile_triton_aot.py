"""Compile the attention, norm, linear, loss, conv, LSTM and quantization Triton kernels for a GPU target on a machine without a GPU.

    python benchmarks/compile_triton_aot.py [--arch 90 80] [--all-tiles] [--only norms quant ...] [--jobs N]

Triton compiles ahead of time for an explicit target (sm_90, sm_80) without a device, so
this catches what the interpreter cannot: compile errors in the real lowering, and tile
configs whose shared memory exceeds the GPU's (the untuned default of each kernel must fit;
autotuning skips the others at run time). It prints each kernel, dtype, head-dim class, tile
config, compile time and shared memory against the per-block limit. Exit status 1 if a
default config fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import inspect
import io
import multiprocessing
import sys
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import attention as A  # noqa: E402  (the source tree's kernels)
from kernels import conv as CV  # noqa: E402
from kernels import linear as L  # noqa: E402
from kernels import loss as LO  # noqa: E402
from kernels import lstm as LS  # noqa: E402
from kernels import norms as NR  # noqa: E402
from kernels import quant as Q  # noqa: E402

FAMILIES = ["attention", "decode", "norms", "linear", "loss", "conv", "lstm", "quant"]
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum): H100, A100
KERNELS = {"fwd": A._attn_fwd, "dkdv": A._attn_bwd_dkdv, "dq": A._attn_bwd_dq}
FLOAT_ARGS = ("scale", "softcap", "dropout_p")
DATA_ARGS = ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in DATA_ARGS:
            sig[name] = f"*{dtype}"
        elif name in ("LSE", "DELTA", "SLOPES", "PART_O", "PART_LSE"):
            sig[name] = "*fp32"
        elif name == "MASK":
            sig[name] = "*i1"
        elif name == "SEED":
            sig[name] = "*i64"
        elif name in ("CU_Q", "CU_K", "SEQLENS_K"):
            sig[name] = "*i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:  # strides and sizes
            sig[name] = "i32"
    return sig


def constexprs(dtype: str, block_d: int, tiles, everything: bool) -> dict:
    m, n, _w, _s = tiles
    flags = dict(IS_LOWER_RIGHT=False, VARLEN=False, HAS_SOFTCAP=False, HAS_ALIBI=False,
                 MASK_KIND=0, LIMIT_LEFT=False, LIMIT_RIGHT=False, HAS_DROPOUT=False)
    if everything:  # every feature at once: the largest kernel
        flags.update(IS_LOWER_RIGHT=True, VARLEN=True, HAS_SOFTCAP=True, HAS_ALIBI=True, MASK_KIND=2,
                     LIMIT_LEFT=True, LIMIT_RIGHT=True, HAS_DROPOUT=True)
    return dict(flags, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", SOFTWARE_BF16=False,
                BLOCK_D=block_d, BLOCK_M=m, BLOCK_N=n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--all-tiles", action="store_true", help="every autotune candidate, not only the defaults")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=FAMILIES, help="these kernel families only")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (output kept in order)")
    args = parser.parse_args()
    # One job per attention kernel (each 1-2 minutes for sm_90 on 2 cores, three quarters of the
    # whole) and per other family; the long ones first, so that a pool's workers end together.
    jobs = [("attention", arch, kind) for arch in args.arch if "attention" in args.only for kind in KERNELS]
    jobs += [(family, arch, None) for arch in args.arch for family in FAMILIES
             if family in args.only and family != "attention"]
    run = functools.partial(run_job, all_tiles=args.all_tiles)
    if args.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(run, jobs))
    else:
        results = [run(job) for job in jobs]
    for _ok, text in results:
        print(text, end="")
    return 0 if all(ok for ok, _text in results) else 1


def run_job(job, all_tiles: bool) -> tuple[bool, str]:
    """One family (or attention kernel) for one target: whether its defaults compiled and fit,
    and what it printed."""
    family, arch, kind = job
    target = GPUTarget("cuda", arch, 32)
    compilers = {"decode": compile_decode, "norms": compile_norms, "loss": compile_loss, "conv": compile_conv,
                 "lstm": compile_lstm, "quant": compile_quant}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if family == "attention":
            ok = compile_attention(target, kind, all_tiles)
            if kind == "dq":
                ok &= compile_bwd_delta(target)
        elif family == "linear":
            ok = compile_linear(target, all_tiles)
        else:
            ok = compilers[family](target)
    return ok, out.getvalue()


def compile_attention(target, kind: str, all_tiles: bool) -> bool:
    """One flash-attention kernel (forward, dK/dV or dQ) over dtypes and head-dim classes: the
    default tile with every feature on (the largest kernel), the other candidates plain."""
    ok = True
    fn = KERNELS[kind]
    for dtype in ("fp16", "bf16", "fp32"):
        for d_class in (64, 128, 256):
            if dtype == "fp32":
                candidates = [A._FP32_TILES[kind][d_class]]
            else:
                candidates = A._TILES[kind][d_class] if all_tiles else A._TILES[kind][d_class][:1]
            for i, tiles in enumerate(candidates):
                default = i == 0  # only the default must compile and fit: autotuning skips the others
                consts = constexprs(dtype, d_class, tiles, everything=default)
                ok &= _compile_one(fn, signature(fn, dtype, consts), consts, target,
                                   {"num_warps": tiles[2], "num_stages": tiles[3]},
                                   f"{dtype} D{d_class} {tiles}{' default' if default else ''}") or not default
    return ok


def compile_linear(target, all_tiles: bool) -> bool:
    """The GEMM + activation kernels (kernels/linear.py): forward plain and gated, both
    backward kernels; fp16/bf16 over the autotune tiles (the default at least), fp32 with
    its fixed full-precision tile."""
    ok = True
    for kind, heuristics in L._KERNELS.items():
        fn = heuristics.fn  # the jit function under @triton.heuristics (EVEN_LOOP)
        for dtype in ("fp16", "bf16", "fp32"):
            for gated in (False, True):
                if dtype == "fp32":
                    candidates = [L._FP32_TILE]
                else:
                    tiles = L._tile_list(kind, gated)
                    candidates = tiles if all_tiles else tiles[:1]
                # Every tile with whole loop tiles (the fast path); the default also with the
                # masked loop.
                runs = [(i, tile, even) for i, tile in enumerate(candidates) for even in ((True, False) if i == 0 else (True,))]
                for i, (m, n, k, w, st), even in runs:
                    consts = dict(ACT=2, GATED=gated, SOFTWARE_BF16=False, GROUP_M=L.GROUP_M,
                                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                                  BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, EVEN_LOOP=even)
                    params = inspect.signature(fn.fn).parameters
                    if "HAS_BIAS" in params:
                        consts.update(HAS_BIAS=True, HAS_BIAS2=gated)
                    if "SAVE" in params:
                        consts["SAVE"] = True
                    sig = {}
                    for name in params:
                        if name in consts:
                            sig[name] = "constexpr"
                        elif name.startswith("db"):
                            sig[name] = "*fp32"
                        elif name.endswith("_ptr"):
                            sig[name] = f"*{dtype}"
                        else:
                            sig[name] = "i32"
                    label = (f"{kind} {dtype} {'gated' if gated else 'plain'} {(m, n, k, w, st)}"
                             f"{'' if even else ' masked'}{' default' if i == 0 else ''}")
                    ok &= _compile_one(fn, sig, consts, target, {"num_warps": w, "num_stages": st}, label) or i > 0
    return ok


def compile_bwd_delta(target) -> bool:
    """The backward's delta = rowsum(dO O) (float64 sums for float32), the row tile the
    launcher uses on a GPU."""
    ok = True
    for dtype in ("fp16", "bf16", "fp32"):
        for block_d in (64, 128, 256):
            consts = dict(BLOCK_D=block_d, BLOCK_M=64, SUM_F64=dtype == "fp32")
            ok &= _compile_one(A._attn_bwd_delta, signature(A._attn_bwd_delta, dtype, consts), consts, target,
                               {"num_warps": 4, "num_stages": 1}, f"{dtype} D{block_d}")
    return ok


def compile_decode(target) -> bool:
    """The split-K decode kernels (fp16/bf16, D 64/128/256, a 16-row tile), all features on."""
    ok = True
    for dtype in ("fp16", "bf16"):
        for block_d in (64, 128, 256):
            split = dict(HAS_SOFTCAP=True, HAS_ALIBI=True, LIMIT_LEFT=True, LIMIT_RIGHT=True, DOT_PRECISION="tf32",
                         BLOCK_D=block_d, BLOCK_M=16, BLOCK_N=64 if block_d <= 128 else 32)
            combine = dict(SOFTWARE_BF16=False, BLOCK_D=block_d, BLOCK_S=32)
            for fn, consts in ((A._attn_decode_split, split), (A._attn_decode_combine, combine)):
                sig = signature(fn, dtype, consts)
                if fn is A._attn_decode_combine:
                    sig["O"] = f"*{dtype}"
                ok &= _compile_one(fn, sig, consts, target, {"num_warps": 4, "num_stages": 2}, f"{dtype} D{block_d}")
    return ok


def _compile_one(fn, sig: dict, consts: dict, target, options: dict, label: str) -> bool:
    """Compile one kernel for ``target``; print ok (time, shared memory), BIG (past the
    per-block limit) or FAIL (the error); whether it compiled and fits."""
    start = time.time()
    try:
        kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options=options)
    except Exception as exc:  # noqa: BLE001 - report every failure
        print(f"FAIL  sm_{target.arch} {fn.fn.__name__} {label}: {type(exc).__name__}: {str(exc)[:300]}")
        return False
    shared = kernel.metadata.shared
    fits = shared <= SHARED_LIMIT[target.arch]  # each of these is a config the GPU launches
    print(f"{'ok  ' if fits else 'BIG '}  sm_{target.arch} {fn.fn.__name__} {label}: {time.time() - start:5.1f} s, "
          f"shared {shared} B{'' if fits else f' > {SHARED_LIMIT[target.arch]}'}")
    return fits


def compile_norms(target) -> bool:
    """LayerNorm / RMSNorm forward and backward (kernels/norms.py): fp16/bf16/fp32, a row in one
    tile and a row streamed in chunks, residual, weight and bias on, the warps the launchers pick."""
    ok = True
    for dtype in ("fp16", "bf16", "fp32"):
        for rms in (False, True):
            for single in (True, False):
                block = 4096 if single else NR.CHUNK
                for fn, flags, warps in (
                    (NR._norm_fwd_kernel, dict(HAS_RES=True, HAS_W=True, HAS_B=not rms), NR._fwd_num_warps(block)),
                    (NR._norm_bwd_kernel, dict(HAS_DRES=True, HAS_W=True, HAS_DB=not rms), NR._bwd_num_warps(block)),
                ):
                    consts = dict(flags, IS_RMS=rms, BLOCK_N=block, SINGLE_TILE=single, SOFTWARE_BF16=False)
                    sig = {}
                    for name in inspect.signature(fn.fn).parameters:
                        if name in consts:
                            sig[name] = "constexpr"
                        elif name in ("MEAN", "RSTD", "DW_PART", "DB_PART"):
                            sig[name] = "*fp32"
                        elif name in ("n_float", "eps"):
                            sig[name] = "fp32"
                        elif name.isupper() and name not in ("M", "N"):
                            sig[name] = f"*{dtype}"
                        else:  # sizes
                            sig[name] = "i32"
                    label = f"{'rms' if rms else 'layer'} {dtype} {'one tile' if single else 'streamed'} {block}"
                    ok &= _compile_one(fn, sig, consts, target, {"num_warps": warps}, label)
    return ok


def compile_loss(target) -> bool:
    """The cross-entropy row kernel (kernels/loss.py): fp16/bf16/fp32 logits, the largest tile
    with every option on (gradient, mean, label smoothing, softcap) and a small one, the launcher's warps."""
    ok = True
    fn = LO._cross_entropy_rows_kernel
    for dtype in ("fp16", "bf16", "fp32"):
        for block in (LO.MAX_BLOCK, 1024):
            consts = dict(MEAN=True, GRAD=True, SMOOTHING=True, HAS_SOFTCAP=True, BLOCK=block, SOFTWARE_BF16=False)
            sig = {}
            for name in inspect.signature(fn.fn).parameters:
                if name in consts:
                    sig[name] = "constexpr"
                elif name in ("TARGET", "COUNTED"):
                    sig[name] = "*i64"
                elif name == "LOSS":
                    sig[name] = "*fp32"
                elif name == "Z":
                    sig[name] = f"*{dtype}"
                elif name in ("smoothing", "softcap"):
                    sig[name] = "fp32"
                else:  # strides, sizes, ignore_index
                    sig[name] = "i32"
            ok &= _compile_one(fn, sig, consts, target, {"num_warps": LO.num_warps(block)}, f"{dtype} block {block}")
    return ok


def compile_conv(target) -> bool:
    """The implicit-GEMM convolution (kernels/conv.py): fp16/bf16 with its GPU tile, fp32 with the
    full-precision one; bias, residual and the saved derivative on."""
    ok = True
    for dtype in ("fp16", "bf16", "fp32"):
        for pointwise in (False, True):  # the general implicit GEMM and the 1x1 one
            m, n, k, w, st = CV._FP32_TILE if dtype == "fp32" else CV._GPU_TILE
            consts = dict(ACT=2, HAS_BIAS=True, HAS_RESIDUAL=True, SAVE=True, POINTWISE=pointwise, SOFTWARE_BF16=False,
                          DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=m, BLOCK_N=n, BLOCK_K=k,
                          GROUP_M=8)
            sig = {name: "constexpr" if name in consts else (f"*{dtype}" if name.endswith("_ptr") else "i32")
                   for name in inspect.signature(CV._conv_fwd.fn).parameters}
            ok &= _compile_one(CV._conv_fwd, sig, consts, target, {"num_warps": w, "num_stages": st},
                               f"{dtype} {(m, n, k, w, st)}{' 1x1' if pointwise else ''}")
    return ok


# The LSTM kernels' float32 pointers (cell state, saved gates); the others have the data dtype.
_LSTM_FP32 = ("cprev_ptr", "c0_ptr", "c_out_ptr", "c_n_ptr", "g_ptr", "dc_ptr", "c_ptr", "cells_ptr")
_LSTM_I32 = ("sizes_ptr", "offsets_ptr")


def compile_lstm(target) -> bool:
    """The LSTM step kernel (recurrent GEMM + cell; both GPU tiles for fp16/bf16, the
    full-precision one for fp32) and the backward cell kernel, every option on."""
    ok = True
    for dtype in ("fp16", "bf16", "fp32"):
        tiles = [LS._FP32_FWD_TILE] if dtype == "fp32" else list(LS._GPU_FWD_TILE.values())
        jobs = [(LS._lstm_step_fwd, dict(SAVE=True, HAS_H2=True, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                                         SOFTWARE_BF16=False, BLOCK_B=b, BLOCK_H=h, BLOCK_K=k), w)
                for b, h, k, w in tiles]
        jobs.append((LS._lstm_cell_bwd, dict(HAS_DHB=True, HAS_HRAW=True, SOFTWARE_BF16=False,
                                             BLOCK_B=LS._CELL_TILE[0], BLOCK_H=LS._CELL_TILE[1]), 4))
        # The persistent kernel at its largest hidden size (four weight tiles in registers).
        block_h = LS.PERSISTENT_MAX_HIDDEN // (2 if dtype == "fp32" else 1)
        jobs.append((LS._lstm_persistent_fwd, dict(REVERSE=True, SAVE=True, SOFTWARE_BF16=False,
                                                   DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                                                   BLOCK_B=LS._PERSISTENT_BLOCK_B, BLOCK_H=block_h),
                     8 if block_h >= 128 else 4))
        for fn, consts, warps in jobs:
            sig = {name: "constexpr" if name in consts else
                   ("*i32" if name in _LSTM_I32 else "*fp32" if name in _LSTM_FP32 else f"*{dtype}")
                   if name.endswith("_ptr") else "i32"
                   for name in inspect.signature(fn.fn).parameters}
            ok &= _compile_one(fn, sig, consts, target, {"num_warps": warps},
                               f"{dtype} {consts.get('BLOCK_B')}x{consts.get('BLOCK_H')}")
    return ok


def compile_quant(target) -> bool:
    """The weight-only GEMM (int8 and int4 codes, decode and prefill tiles, fp16/bf16; fp32 on
    its tile), the activation quantizer and the W8A8 GEMM (int8; e4m3 on sm_89+)."""
    ok = True
    jobs = []
    for dtype in ("fp16", "bf16", "fp32"):
        tiles = [Q._FP32_TILE] if dtype == "fp32" else [Q._DECODE_TILE, Q._PREFILL_TILE]
        for bits in (8, 4):
            for m, n, k, w, st in tiles:
                consts = dict(BITS=bits, HAS_ZEROS=bits == 4, HAS_BIAS=True, SOFTWARE_BF16=False,
                              DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=m, BLOCK_N=n,
                              BLOCK_K=min(k, 128) if bits == 4 else k)
                types = {"x_ptr": f"*{dtype}", "q_ptr": "*i8" if bits == 8 else "*u8", "s_ptr": "*fp32", "z_ptr": "*u8",
                         "b_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
                jobs.append((Q._quant_linear, consts, types, w, st, f"int{bits} {dtype} {m}x{n}x{k}"))
        # W8A8: int8 everywhere, e4m3 where the GPU has fp8 tensor cores (sm_89+).
        for code in ("i8", "fp8e4nv") if target.arch >= 89 else ("i8",):
            fp8 = code != "i8"
            jobs.append((Q._quantize_rows, dict(FP8=fp8, BLOCK_K=1024),
                         {"x_ptr": f"*{dtype}", "q_ptr": f"*{code}", "s_ptr": "*fp32"}, 4, 1,
                         f"quantize_rows {dtype} -> {code}"))
            m, n, k, w, st = Q._W8A8_GPU_TILE
            jobs.append((Q._w8a8_gemm, dict(FP8=fp8, HAS_BIAS=True, SOFTWARE_BF16=False, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k),
                         {"q_ptr": f"*{code}", "w_ptr": f"*{code}", "sx_ptr": "*fp32", "sw_ptr": "*fp32",
                          "b_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}, w, st, f"{code} gemm -> {dtype} {m}x{n}x{k}"))
    for fn, consts, types, warps, stages, label in jobs:
        sig = {name: "constexpr" if name in consts else types.get(name, "i32")
               for name in inspect.signature(fn.fn).parameters}
        ok &= _compile_one(fn, sig, consts, target, {"num_warps": warps, "num_stages": stages}, label)
    return ok


if __name__ == "__main__":
    sys.exit(main())
