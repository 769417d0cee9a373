#!/usr/bin/env bash
# One hash of everything a fuseformer wheel is built from (no git needed: the GPU machine gets
# a copy of the working tree without .git). Used by prebuild_gpu_wheel.sh and gpu_suite.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc kernels python CMakeLists.txt pyproject.toml -type f \
  ! -name '*.pyc' ! -path '*/__pycache__/*' ! -name '*.so' ! -path '*.egg-info/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
