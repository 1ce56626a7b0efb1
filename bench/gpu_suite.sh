#!/usr/bin/env bash
# The whole project on a GPU machine with no package index, in one command (under 10 minutes).
#
#   OUT=/some/dir bench/gpu_suite.sh [all|tests|sanitize|bench]     (default: all)
#
# Installs fastdit over the machine's own torch/triton (never resolving torch there), builds the
# CUDA extension for the card, runs the full test suite on the GPU (no interpreter), runs
# compute-sanitizer memcheck and racecheck over a small test subset, and runs `fastdit bench`.
# Writes at most 7 files into $OUT: suite.log, junit.xml, sanitizer.log, and the bench results
# (.json, .md, .png). Wheels for packages the machine lacks (diffusers, importlib_metadata) are
# taken from .whl/ if present: make them with bench/prepare_gpu_wheels.sh on the CPU machine.
set -uo pipefail
STAGE="${1:-all}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/suite.log") 2>&1
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

step "install (CUDA extension for this card)"
cc=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
arch="$cc"; [ "$cc" = "9.0" ] && arch="9.0a"
FASTDIT_BUILD_CUDA=1 FASTDIT_CUDA_ARCHS="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install -q --no-deps --no-build-isolation -e . || status=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
python3 -m fastdit info || status=1

if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  step "test suite on the GPU"
  python3 -m pytest -q -rs -n 4 --dist loadfile --timeout 600 tests --junitxml="$OUT/junit.xml" || status=1
fi

if [ "$STAGE" = all ] || [ "$STAGE" = sanitize ]; then
  step "compute-sanitizer (memcheck, racecheck) on a small subset"
  # Triton kernels (small registered cases) and every CUDA C++ kernel (the GPU-marked tests of the
  # csrc/ ops: linear attention, CLEAR / Re-ttention window attention, DiCo block).
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9 \
      python3 -m pytest -q -x -p no:xdist tests/test_registered_ops.py -k "N=7 or N=33 or 7x13" \
      >>"$OUT/sanitizer.log" 2>&1 && echo "$tool (triton subset): clean" \
      || { echo "$tool (triton subset): FAILED (see sanitizer.log)"; status=1; }
    compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9 \
      python3 -m pytest -q -x -p no:xdist -m gpu tests/test_cuda_backend.py tests/test_clear_cuda.py \
      tests/test_dico_cuda.py -k "not flux_scale and not fused_model" \
      >>"$OUT/sanitizer.log" 2>&1 && echo "$tool (CUDA C++ kernels): clean" \
      || { echo "$tool (CUDA C++ kernels): FAILED (see sanitizer.log)"; status=1; }
  done
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  step "fastdit bench"
  junit=(); [ -f "$OUT/junit.xml" ] && junit=(--tests-junit "$OUT/junit.xml")
  python3 -m fastdit bench --quiet --out "$OUT" "${junit[@]}" >/dev/null || status=1
  ls "$OUT"
fi

step "summary"
[ -f "$OUT/junit.xml" ] && python3 - "$OUT/junit.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(f"tests: {s.get('tests')} total, {s.get('failures')} failures, {s.get('errors')} errors, {s.get('skipped')} skipped")
PY
echo "gpu_suite: $([ $status = 0 ] && echo OK || echo FAILED) (stage $STAGE); results in $OUT"
exit $status
