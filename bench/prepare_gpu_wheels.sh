#!/usr/bin/env bash
# On the CPU machine, before a GPU run: download the wheels that the GPU image lacks (Python 3.12)
# into .whl/ (git-ignored); name .whl in the device run's `carry`. See ../shared/docs/gpu_runs.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata zipp
ls -la .whl
