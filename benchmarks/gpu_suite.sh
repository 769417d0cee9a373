#!/usr/bin/env bash
# The GPU suite: on a machine with a CUDA GPU, build fuseformer there, run every test
# (GPU-marked and bf16 included) and the benchmarks, and write the results.
#
#   bash benchmarks/gpu_suite.sh [STAGE ...] [--out DIR]
#
# Stages (default: all, in this order): build, info, test, bench. Each finishes in well
# under 10 minutes and can be run alone; "test:<name>" runs tests/test_<name>.py alone (when
# the whole suite's first-time Triton compiles would not fit one call), "bench" runs every
# benchmark family, each under its own 10-minute limit, and "bench:<family>" (bench:norms,
# bench:attention, bench:linear, bench:mlp, bench:loss, bench:conv, bench:lstm, bench:quant, bench:models) one of them. Results go to DIR (default
# benchmarks/results/<gpu-name>/): build.log, info.txt, tests[-<name>].log, per benchmark family
# <family>.json / .md / .png, and report.md / report.html / roofline.png over all of them.
# Commit them with the versions they record, then regenerate the README's table:
#   fuseformer report benchmarks/results/<gpu-name> --readme README.md
#
# "lease" is the whole suite cut to one device call (LEASE_SECONDS, default 560): build, info,
# the GPU test cases (pytest -k "$TEST_SELECT", default "cuda"; up to TEST_SECONDS, default
# 240; TEST_SELECT= runs them all), every family's benchmark at --quick shapes,
# then full-size benchmarks family by family in the order below while time is left; all of
# it packed into DIR/gpu_results.tgz (the device tool returns at most 8 files):
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_suite.sh lease --out $OUT
# Unpack into benchmarks/results/<gpu-name>/ (the quick pass under quick/).
# The build stage takes a wheel prebuilt for this tree when one is carried in .whl/
# (benchmarks/prebuild_gpu_wheel.sh, here, with the GPU image's Python and torch: ~4 minutes
# on 2 cores that the lease keeps) and builds from source when there is none, it was built
# from other sources, or it does not load there.
set -uo pipefail
cd "$(dirname "$0")/.."

out=""
stages=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    info|build|test|test:*|bench|bench:*|all|lease) stages+=("$1"); shift ;;
    *) echo "gpu_suite: unknown argument '$1' (stages: info build test bench all lease; --out DIR)" >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -eq 0 ] && stages=(all)
[ "${stages[*]}" = "all" ] && stages=(build info test bench)

PY=${PYTHON:-python3}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$gpu" ]; then
  echo "gpu_suite: no CUDA device visible to $PY; this suite needs a GPU" >&2
  exit 2
fi
out=${out:-benchmarks/results/$gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: some stages run from another directory
echo "gpu_suite: $gpu, stages: ${stages[*]}, results -> $out"
status=0

# The wheel in .whl/ when it was built from this very tree (its SOURCE_HASH matches).
prebuilt_wheel() {
  local wheel
  wheel=$(ls .whl/fuseformer-*-cp"$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"-*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] && [ -f .whl/SOURCE_HASH ] || return 1
  if [ "$(cat .whl/SOURCE_HASH)" != "$(bash benchmarks/source_hash.sh)" ]; then
    echo "gpu_suite: .whl/ holds a wheel built from another tree; building from source" >&2
    return 1
  fi
  echo "$wheel"
}

if [ "${stages[*]}" = "lease" ]; then
  budget=${LEASE_SECONDS:-560}
  began=$(date +%s)
  left() { echo $(( budget - ($(date +%s) - began) )); }
  work=$(mktemp -d)/results
  mkdir -p "$work"
  pack() { tar czf "$out/gpu_results.tgz" -C "$work" . && echo "gpu_suite: packed $out/gpu_results.tgz ($(left) s left)"; }
  bash "$0" build info --out "$work" || { pack; exit 1; }
  tests=${TEST_SECONDS:-240}
  [ "$tests" -gt $(( $(left) - 120 )) ] && tests=$(( $(left) - 120 ))
  # The GPU-parametrized cases (ids carry the device: "triton-cuda", "cuda-cuda", ...); CI
  # runs the CPU ones on every change.
  TEST_TIMEOUT=$tests TEST_SELECT=${TEST_SELECT-cuda} bash "$0" test --out "$work" || status=1
  # timeout's SIGTERM makes bench write the cases it finished (-k: killed 10 s later if stuck).
  (cd /tmp && timeout -k 10 $(( $(left) - 20 )) $PY -m fuseformer.cli bench --quick --out "$work/quick") || status=1
  # Full-size benchmarks, the ones the issues' targets are judged on first.
  for family in attention linear quant models norms mlp lstm conv loss; do
    [ "$(left)" -lt 90 ] && { echo "gpu_suite: no time left for bench:$family and after"; break; }
    (cd /tmp && timeout -k 10 $(( $(left) - 20 )) $PY -m fuseformer.cli bench "$family" --out "$work") || status=1
  done
  if ls "$work"/*.json >/dev/null 2>&1; then (cd /tmp && $PY -m fuseformer.cli report "$work") || status=1; fi
  pack
  exit $status
fi

for stage in "${stages[@]}"; do
  start=$(date +%s)
  case "$stage" in
    build)
      # A wheel prebuilt for this tree (benchmarks/prebuild_gpu_wheel.sh, carried in .whl/)
      # saves the lease the compile; it is used only if the tree hashes as it did and its
      # extension loads here with the CUDA kernels.
      if prebuilt=$(prebuilt_wheel); then
        if $PY -m pip install --no-index --no-deps --force-reinstall "$prebuilt" >"$out/build.log" 2>&1 \
            && (cd /tmp && $PY -c "import fuseformer._extension as e, sys; sys.exit(0 if e.has_kernel('norm_fwd', 'CUDA') else f'extension: {e.LOAD_ERROR}')") >>"$out/build.log" 2>&1; then
          echo "gpu_suite: installed the prebuilt $(basename "$prebuilt")" | tee -a "$out/build.log"
          echo "gpu_suite: stage $stage took $(( $(date +%s) - start )) s"
          continue
        fi
        echo "gpu_suite: the prebuilt wheel does not load here (build.log); building from source" | tee -a "$out/build.log"
        mv "$out/build.log" "$out/build-prebuilt.log"
      fi
      # Non-editable, against the torch already installed there (no network on GPU hosts).
      MAX_JOBS=$(nproc) CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        $PY -m pip install --no-build-isolation --no-deps -v . >"$out/build.log" 2>&1 \
        || { echo "gpu_suite: build failed, see $out/build.log"; tail -40 "$out/build.log"; exit 1; }
      ;;
    info)
      (cd /tmp && $PY -m fuseformer.cli info) >"$out/info.txt" 2>&1
      cat "$out/info.txt"
      ;;
    test|test:*)
      # xdist spreads Triton's JIT compiles over the cores; the GPU is shared by the workers.
      workers=""
      $PY -c "import xdist" 2>/dev/null && workers="-n 8"
      target=tests log="$out/tests.log"
      if [ "$stage" != test ]; then
        target="tests/test_${stage#test:}.py" log="$out/tests-${stage#test:}.log"
      fi
      select=()
      [ -n "${TEST_SELECT:-}" ] && select=(-k "$TEST_SELECT")
      # Tests not started 45 s before the limit are skipped (tests/conftest.py), so pytest
      # still prints its summary and the failures' tracebacks; timeout is the backstop.
      limit=${TEST_TIMEOUT:-540}
      FUSEFORMER_TEST_DEADLINE=$(( $(date +%s) + limit - 45 )) timeout "$limit" $PY -m pytest "$target" -q -rfEs \
        $workers --durations=20 --continue-on-collection-errors "${select[@]}" >"$log" 2>&1 || status=1
      tail -30 "$log"
      ;;
    bench|bench:*)
      families=${stage#bench:}
      [ "$stage" = bench ] && families=$(cd /tmp && $PY -c "from fuseformer.bench import FAMILIES; print(' '.join(FAMILIES))")
      for family in $families; do
        (cd /tmp && timeout -k 10 560 $PY -m fuseformer.cli bench "$family" --out "$out") || status=1
      done
      # One report over every family's results in the folder (also those of earlier stages).
      (cd /tmp && $PY -m fuseformer.cli report "$out") || status=1
      # Host time per layer of a norm call (launcher, custom op, autograd, module).
      [ "$stage" = bench ] && { timeout 120 $PY benchmarks/profile_overhead.py >"$out/overhead.txt" 2>&1 || status=1; }
      ;;
  esac
  echo "gpu_suite: stage $stage took $(( $(date +%s) - start )) s"
done
exit $status
