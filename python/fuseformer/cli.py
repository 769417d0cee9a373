"""The ``fuseformer`` console command.

    fuseformer info                               versions, backends, defaults
    fuseformer bench [family ...] [--quick] [--out DIR] [--device cpu|cuda] [--dtype ...]
    fuseformer report DIR [--readme README.md]    one report from a folder of results
    fuseformer train gpt|resnet|lstm [--steps N]  both backends from the same weights: loss curves
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Terminated(BaseException):
    """SIGTERM (what `timeout` sends) arrived during a benchmark. A BaseException, as
    KeyboardInterrupt: the harness records an Exception from one implementation and goes on."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _bench(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from fuseformer.bench import FAMILIES, family_module, harness

    families = args.families or list(FAMILIES)
    for name in families:
        if name not in FAMILIES:
            print(f"fuseformer bench: unknown family {name!r}; expected one of {', '.join(FAMILIES)}", file=sys.stderr)
            return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fuseformer bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if device == "cuda":
        # Autotune candidates compile in worker processes at once (kernels/autotuning.py):
        # this command's main module is guarded, as spawned workers need.
        os.environ.setdefault("FUSEFORMER_COMPILE_WORKERS", str(min(16, os.cpu_count() or 1)))
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    out_dir = Path(args.out)
    env = harness.environment(device)
    print(f"fuseformer bench on {env['device_name']} ({device}, {dtype_name}); results -> {out_dir}/")
    ceilings = harness.measure_ceilings(device, args.quick)
    rates = ", ".join(f"{d} {v:.1f}" for d, v in ceilings["matmul_TFLOPs_by_dtype"].items() if v)
    print(f"measured ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, matmul TFLOP/s {rates}")
    # A time limit (the GPU suite runs each family under `timeout`) ends the run with the
    # finished cases written, not lost: device time is too scarce to measure twice.
    try:
        previous_handler, installed = signal.signal(signal.SIGTERM, _raise_terminated), True
    except ValueError:  # not the main thread: no handler, a SIGTERM ends the run as before
        previous_handler, installed = None, False
    terminated = False
    try:
        for name in families:
            module = family_module(name)
            cases = list(module.cases(device, dtype, args.quick))
            rows: list[dict] = []
            try:
                with Progress(transient=True) as progress:
                    task = progress.add_task(f"{name}", total=len(cases))
                    harness.run_cases(cases, device, args.quick, ceilings, lambda: progress.advance(task), rows=rows)
            except _Terminated:
                terminated = True
            done = len({(r["op"], r["direction"], tuple(r["shape"])) for r in rows})
            title = f"fuseformer {name} on {env['device_name']} ({dtype_name})"
            if terminated:
                title += f", stopped by SIGTERM after {done} of {len(cases)} cases"
                print(f"fuseformer bench: terminated during {name}: writing its {done} finished cases", file=sys.stderr)
            if rows:
                harness.print_table(rows, title)
                missing = module.missing_baselines(device) if hasattr(module, "missing_baselines") else {}
                for baseline, why in missing.items():
                    print(f"{name}: baseline {baseline} is missing ({why})")
                paths = harness.write_results(out_dir, name, rows, env, ceilings, title, missing)
                if hasattr(module, "write_extra") and not terminated:  # beyond timings (quant: accuracy)
                    paths += module.write_extra(out_dir, device, dtype, args.quick)
                print("wrote " + ", ".join(str(p) for p in paths))
            if terminated:
                break
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous_handler)
    from fuseformer.bench import report

    if any(out_dir.glob("*.json")):
        paths = report.write_report(out_dir)
        _print_targets(report.load_results(out_dir), device)
        print("report: " + ", ".join(str(p) for p in paths))
    return 124 if terminated else 0


def _print_targets(results: dict, device: str) -> None:
    """The issues' targets against everything in the output folder (this run and earlier ones)."""
    from rich.console import Console
    from rich.table import Table

    from fuseformer.bench import targets

    lines = targets.evaluate(results, device)
    if not lines:
        return
    counts = {status: sum(line[4] == status for line in lines) for status in ("met", "missed")}
    table = Table(title=f"targets: {counts['met']} met, {counts['missed']} missed, "
                        f"{len(lines) - counts['met'] - counts['missed']} not measured")
    for h in targets.TARGETS_HEADER:
        table.add_column(h, overflow="fold")
    for line in lines:
        if line[4] != "not measured in this run":
            table.add_row(*line)
    Console(width=max(140, Console().width)).print(table)


def _report(args: argparse.Namespace) -> int:
    from fuseformer.bench import report

    folder = Path(args.folder)
    try:
        paths = report.write_report(folder)
        if args.readme:
            report.update_readme(Path(args.readme), folder)
            paths.append(Path(args.readme))
    except (FileNotFoundError, ValueError) as exc:
        print(f"fuseformer report: {exc}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _train(args: argparse.Namespace) -> int:
    from fuseformer.models import train

    summary = train.compare(args.model, args.steps, Path(args.out), args.device, args.seed)
    for backend in ("torch", "fuseformer"):
        print(f"{args.model} [{backend}]: loss {summary['first_loss'][backend]:.4f} -> "
              f"{summary['last_loss'][backend]:.4f} in {summary['seconds'][backend]:.1f} s")
    print(f"largest per-step relative gap between the curves: {summary['max_relative_gap']:.2e}; "
          f"wrote {args.out}/train_{args.model}.{{json,md,png}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuseformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, available backends and defaults")
    bench = sub.add_parser("bench", help="benchmark op families against PyTorch eager and torch.compile")
    bench.add_argument("families", nargs="*", help="op families (default: all)")
    bench.add_argument("--quick", action="store_true", help="small shapes, short timing: a smoke run")
    bench.add_argument("--out", default="bench-out", help="folder for JSON, markdown and PNG results")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    bench.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    rep = sub.add_parser("report", help="build report.md/html and plots from a folder of benchmark results")
    rep.add_argument("folder", help="a folder with <family>.json results (fuseformer bench --out, the GPU suite)")
    rep.add_argument("--readme", help="also regenerate this README's results section from them")
    tr = sub.add_parser("train", help="train a reference model on both backends and compare the loss curves")
    tr.add_argument("model", choices=["gpt", "resnet", "lstm"])  # fuseformer.models.train.MODELS
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--out", default="train-out")
    tr.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present, else cpu")
    tr.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == "report":
        return _report(args)
    if args.command == "info":
        import fuseformer

        fuseformer.info()
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
