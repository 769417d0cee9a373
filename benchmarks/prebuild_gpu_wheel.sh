#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, the wheel the GPU machine would otherwise spend minutes
# of its lease compiling: CPU and CUDA kernels (sm_80, sm_90a) against the GPU image's
# versions (Python 3.12, torch 2.11.0+cu130; .library/device/KINDS.md), into .whl/ (ignored by
# git; the device tool carries it when the call names it):
#
#   bash benchmarks/prebuild_gpu_wheel.sh          # ~5 minutes on 2 cores (+1 the first time)
#   run(command="PYTHONUNBUFFERED=1 bash benchmarks/gpu_suite.sh lease --out $OUT", carry=[".whl"])
#
# The build runs in .venv-gpu-image/ (made here the first time, from a python3.12 on PATH or
# pyenv's), or under $PYTHON when set. .whl/SOURCE_HASH records what the wheel was built from
# (csrc, kernels, python, the build files): gpu_suite.sh's build stage installs the wheel only
# when the tree it runs on hashes the same and the installed extension loads with its CUDA
# kernels, and builds from source otherwise (a binary made here may not load against the GPU
# image's libraries). Rebuild after any change to those files.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  PYTHON=.venv-gpu-image/bin/python
  if [ ! -x "$PYTHON" ]; then
    py312=python3.12
    if ! python3.12 -c "" 2>/dev/null; then  # a pyenv shim answers even where 3.12 is not selected
      py312=$(PYENV_VERSION=$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1) pyenv which python3.12 2>/dev/null || true)
    fi
    [ -n "$py312" ] || { echo "prebuild_gpu_wheel: no python3.12 here (set PYTHON)" >&2; exit 2; }
    "$py312" -m venv .venv-gpu-image
    "$PYTHON" -m pip install -q "torch==2.11.0" "numpy<2.3" scikit-build-core pybind11 ninja
  fi
fi
"$PYTHON" - <<'EOF' || { echo "prebuild_gpu_wheel: $PYTHON must be Python 3.12 with a CUDA build of torch 2.11" >&2; exit 2; }
import sys, torch
assert sys.version_info[:2] == (3, 12) and torch.__version__.startswith("2.11") and torch.version.cuda
EOF
rm -rf .whl && mkdir -p .whl
# A build folder of its own: a CMake cache names one Python and one torch.
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -v -Cbuild-dir=build/gpu-wheel-py312 -w .whl . \
  > .whl/build.log 2>&1 || { tail -40 .whl/build.log; exit 1; }
grep -q "building CUDA kernels" .whl/build.log || { echo "prebuild_gpu_wheel: the CUDA kernels were not built"; exit 1; }
bash benchmarks/source_hash.sh > .whl/SOURCE_HASH
ls -l .whl/*.whl
echo "prebuild_gpu_wheel: built from sources $(cat .whl/SOURCE_HASH)"
